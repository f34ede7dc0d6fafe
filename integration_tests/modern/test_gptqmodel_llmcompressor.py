"""GPTQModel 7.6 (GPTQ, AWQ) and llm-compressor 0.14 (GPTQ) on AFPQ grids, through the
methods registry, the CLI and the Python APIs, on tiny random Llama and Qwen2 models.

Each run is checked end to end: the engine's own fake-quantized weight of every layer
(captured where the engine hands it over) equals what the saved checkpoint decodes to,
after reloading through the project loader and through transformers; forward and
generate run; an INT config in the same process still gives GPTQModel's stock result.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

pytest.importorskip("gptqmodel")
transformers = pytest.importorskip("transformers")

from _tiny import TEXT  # noqa: E402

import afpq_plugins  # noqa: E402,F401
from afpq_plugins.methods import Calibration, FormatSpec, quantize  # noqa: E402
from afpq_plugins.model import load_quantized, save_quantized  # noqa: E402
from afpq_plugins.nn import AFPQLinear  # noqa: E402

CALIB = Calibration(nsamples=6, seqlen=48)


def _one_error(err: str) -> bool:
    """One ``afpq: error`` line and no traceback (progress bars of the model load aside)."""
    return sum("afpq: error" in line for line in err.splitlines()) == 1 and "Traceback" not in err


def _float(path):
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.fixture()
def engine_weights(monkeypatch):
    """{layer name: the engine's fake-quantized weight}, captured before AFPQ packs it."""
    from afpq_plugins.gptqmodel import processors
    from afpq_plugins.llmcompressor import gptq as lc

    seen = {}
    pack = processors._pack

    def spy_pack(cls, root, module, *a, **k):
        seen[module.full_name] = getattr(module, "module", module).weight.detach().float().cpu().clone()
        return pack(cls, root, module, *a, **k)

    swap = lc.AFPQGPTQModifier._swap_in_afpq

    def spy_swap(self, model):
        for name in self._afpq_params:
            seen[name] = model.get_submodule(name).weight.detach().float().cpu().clone()
        return swap(self, model)

    monkeypatch.setattr(processors, "_pack", spy_pack)
    monkeypatch.setattr(lc.AFPQGPTQModifier, "_swap_in_afpq", spy_swap)
    return seen


def _check_roundtrip(model, qc, seen, tok, tmp_path, tag):
    layers = {n: m for n, m in model.named_modules() if isinstance(m, AFPQLinear)}
    assert sorted(layers) == sorted(qc.quantized_modules) == sorted(seen) and len(layers) == 14
    path = save_quantized(model, str(tmp_path / tag), qc, tokenizer=tok)
    ids = torch.randint(0, model.config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(ids).logits
        mine = load_quantized(path)
        hf = transformers.AutoModelForCausalLM.from_pretrained(path)
        for name in layers:  # every reloaded weight is the engine's fake-quantized weight
            assert torch.equal(mine.get_submodule(name).dequantize(), seen[name]), name
            assert torch.equal(hf.get_submodule(name).dequantize(), seen[name]), name
        assert torch.equal(mine(ids).logits, want)
        assert torch.allclose(hf(ids).logits, want, atol=1e-5, rtol=1e-5)
        out = hf.generate(ids[:1, :4], attention_mask=torch.ones(1, 4, dtype=torch.long), max_new_tokens=4,
                          min_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 8)
    return path


@pytest.mark.parametrize("arch,method,backend,fmt,group", [
    ("llama", "gptq", "gptqmodel", "nf3", 32),
    ("qwen2", "gptq", "gptqmodel", "fp4", -1),
    ("llama", "awq", "gptqmodel", "nf4", 32),
    ("qwen2", "awq", "gptqmodel", "nf3", 32),
    ("llama", "gptq", "llmcompressor", "nf3", 32),
    ("qwen2", "gptq", "llmcompressor", "nf4", -1),
])
def test_engine_quantize_save_reload(folders, tok, tmp_path, engine_weights, arch, method, backend, fmt, group):
    model = _float(folders[arch])
    qc = quantize(model, tok, method, FormatSpec(fmt, group), CALIB, backend=backend, progress=False)
    assert (qc.format, qc.group_size, qc.method, qc.mode) == (fmt, group, method, "afpq")
    assert qc.layout == ("awq" if method == "awq" and fmt == "nf4" else "gptq")
    _check_roundtrip(model, qc, engine_weights, tok, tmp_path, f"{arch}-{method}-{backend}")


def _int_gptqmodel(path, tok):
    """GPTQModel's stock INT4 GPTQ of the float model: the packed tensors it produces (its disk
    offload off: with it on, finished modules stay on the meta device until GPTQModel's own save,
    so the state dict would hold no data: seen when this is the process's first GPTQModel run)."""
    from gptqmodel import GPTQModel, QuantizeConfig

    m = GPTQModel.load(path, QuantizeConfig(bits=4, group_size=32, offload_to_disk=False), device="cpu",
                       dtype=torch.float32)
    m.quantize([TEXT[i * 150:(i + 1) * 150] for i in range(6)], tokenizer=tok, batch_size=1)
    return {k: v.clone() for k, v in m.model.state_dict().items() if k.endswith(("qweight", "scales", "qzeros"))}


def test_python_api_and_int_config_unaffected(folders, tok, tmp_path, engine_weights):
    """``afpq_plugins.gptqmodel``: QuantizeConfig(fmt=...) + GPTQModel.load/quantize/save; INT runs
    before and after it in the same process give identical stock results."""
    from afpq_plugins.gptqmodel import GPTQModel, QuantizeConfig

    before = _int_gptqmodel(folders["llama"], tok)
    assert before and any(k.endswith("qzeros") for k in before)  # really gptqmodel's INT modules
    cfg = QuantizeConfig(bits=3, group_size=32, fmt="nf3")
    assert cfg.afpq.fmt == "nf3" and cfg.sym
    model = GPTQModel.load(folders["llama"], cfg, device="cpu", dtype=torch.float32)
    model.quantize([TEXT[i * 150:(i + 1) * 150] for i in range(6)], tokenizer=tok, batch_size=1)
    out = model.save(str(tmp_path / "api"))
    qc = model._afpq_config
    assert qc.method == "gptq" and qc.format == "nf3" and model._afpq_mismatches == 0
    _check_roundtrip(model.model, qc, engine_weights, tok, tmp_path, "api-check")
    reloaded = GPTQModel.load(out)  # an AFPQ checkpoint: the project loader
    assert isinstance(reloaded.get_submodule(qc.quantized_modules[0]), AFPQLinear)
    after = _int_gptqmodel(folders["llama"], tok)
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), k
    with pytest.raises(ValueError, match="has 3 bits, but bits=4"):
        QuantizeConfig(bits=4, fmt="nf3")


def test_cli_modern_backends_and_errors(folders, tmp_path, capsys):
    from afpq_plugins.cli import main

    out = str(tmp_path / "cli")
    rc = main(["quantize", folders["qwen2"], out, "--method", "awq", "--format", "nf3", "--group-size", "32",
               "--nsamples", "4", "--calib-seqlen", "48"])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "awq through gptqmodel" in err and "4 x 48 tokens" in err and "the first of 2 layers took" in err
    with open(os.path.join(out, "config.json"), encoding="utf-8") as fh:
        qc = json.load(fh)["quantization_config"]
    assert (qc["method"], qc["format"], qc["quantizer"] if "quantizer" in qc else qc["awq"]["upstream"]) == (
        "awq", "nf3", "gptqmodel 7.6")
    # an engine that is not installed here, and flags the engine does not take: one line each
    assert main(["quantize", folders["llama"], str(tmp_path / "x"), "--method", "gptq", "--backend", "autogptq"]) == 2
    err = capsys.readouterr().err
    assert _one_error(err) and "autogptq is not installed in this environment" in err and ".venv-legacy" in err
    assert main(["quantize", folders["llama"], str(tmp_path / "y"), "--method", "gptq", "--backend",
                 "llmcompressor", "--desc-act", "--quiet"]) == 2
    assert "--desc-act is not supported by --backend llmcompressor" in capsys.readouterr().err


def test_unsupported_model_type_is_one_line(tmp_path, tok, capsys):
    """A model type GPTQModel 7.6 does not know (XGLM): one line naming the type and the engine."""
    from gptqmodel.models.auto import MODEL_MAP
    from transformers import XGLMConfig, XGLMForCausalLM

    from afpq_plugins.cli import main
    from afpq_plugins.methods import MethodUnavailable

    assert "xglm" not in MODEL_MAP
    model = XGLMForCausalLM(XGLMConfig(vocab_size=len(tok), d_model=64, num_layers=2, attention_heads=4,
                                       ffn_dim=128, max_position_embeddings=128))
    with pytest.raises(MethodUnavailable, match="'xglm' is not supported by GPTQModel 7.6"):
        quantize(model, tok, "gptq", FormatSpec("nf4", 32), CALIB, backend="gptqmodel")
    path = str(tmp_path / "xglm")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    capsys.readouterr()  # (save_pretrained's progress bar)
    assert main(["quantize", path, str(tmp_path / "o"), "--method", "awq", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert _one_error(err) and "'xglm' is not supported by GPTQModel 7.6 (--backend gptqmodel)" in err
    assert not (tmp_path / "o").exists()
