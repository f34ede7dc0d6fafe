"""optimum's GPTQ with the AFPQ grid: ``afpq_plugins.hf.AFPQGPTQQuantizer`` and quantize-on-load.

Stack-agnostic (run by the legacy venv here, by the modern venv through
``integration_tests/modern/test_hf_optimum.py``): optimum 2.0.0 runs GPTQ through the
AutoGPTQ adapter's ``AFPQGPTQ`` (auto-gptq 0.7.1), optimum 2.3.0 through gptqmodel
7.6.0's ``GPTQ.create_quantizer`` hook. Tiny random Llama, CPU.
"""

from __future__ import annotations

import logging
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")
optimum_gptq = pytest.importorskip("optimum.gptq")
os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")

from _tiny import TEXT, tiny_llama, tiny_tokenizer  # noqa: E402

import afpq_plugins  # noqa: E402,F401
from afpq_plugins.core.checkpoint import read_quant_config  # noqa: E402
from afpq_plugins.hf import AFPQConfig  # noqa: E402
from afpq_plugins.model import load_quantized, quantize_model_rtn  # noqa: E402
from afpq_plugins.nn import AFPQLinear  # noqa: E402

AutoModelForCausalLM = transformers.AutoModelForCausalLM
SEQLEN = 64


def _backend_or_skip():
    from afpq_plugins.hf import optimum as afpq_optimum

    if not afpq_optimum.uses_gptqmodel():
        import importlib.util

        if importlib.util.find_spec("auto_gptq") is None:
            pytest.skip("neither gptqmodel nor auto-gptq is installed")
        try:
            import afpq_plugins.autogptq  # noqa: F401
        except ImportError as exc:
            pytest.skip(f"afpq_plugins.autogptq (the AutoGPTQ adapter) is not importable yet: {exc}")
    return afpq_optimum


def _texts():
    return [TEXT[i * 180:(i + 1) * 180] for i in range(6)]


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def float_folder(tmp_path_factory, tok):
    path = str(tmp_path_factory.mktemp("float") / "tiny")
    tiny_llama(vocab_size=len(tok)).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def quantized(tmp_path_factory, tok):
    """(model quantized by AFPQGPTQQuantizer, quantizer, checkpoint path, pack warnings)."""
    afpq_optimum = _backend_or_skip()
    model = tiny_llama(vocab_size=len(tok))
    q = afpq_optimum.AFPQGPTQQuantizer(fmt="nf3", group_size=32, dataset=_texts(), model_seqlen=SEQLEN, desc_act=True)
    records = []

    class _Catch(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    h = _Catch(level=logging.WARNING)
    logging.getLogger(afpq_optimum.__name__).addHandler(h)
    try:
        q.quantize_model(model, tok)
    finally:
        logging.getLogger(afpq_optimum.__name__).removeHandler(h)
    path = q.save(model, str(tmp_path_factory.mktemp("optimum") / "nf3-g32"), tokenizer=tok)
    return model, q, path, records


def _ids(vocab, n=12):
    return torch.randint(0, vocab, (2, n), generator=torch.Generator().manual_seed(3))


def test_quantize_model_swaps_in_afpq_modules_on_the_grid(quantized):
    model, q, _, records = quantized
    layers = [n for n, m in model.named_modules() if isinstance(m, AFPQLinear)]
    assert len(layers) == 14 and layers == q.quantized_modules
    assert isinstance(model.lm_head, torch.nn.Linear)
    # every GPTQ weight re-encoded exactly onto the nf3 grid with GPTQ's own scales
    assert not [r for r in records if "do not decode back" in r], records
    layer = model.get_submodule("model.layers.1.mlp.down_proj")
    assert layer.fmt.name == "nf3" and layer.mode == "afpq" and not layer.has_default_order()  # act-order g_idx


def test_save_writes_the_project_format_and_loads_everywhere(quantized):
    model, q, path, _ = quantized
    _, qc = read_quant_config(path)
    assert (qc.format, qc.bits, qc.group_size, qc.mode, qc.layout, qc.method, qc.desc_act) == (
        "nf3", 3, 32, "afpq", "gptq", "gptq", True)
    assert qc.quantized_modules == q.quantized_modules
    ids = _ids(model.config.vocab_size)
    with torch.no_grad():
        want = model(ids).logits
        assert torch.equal(load_quantized(path)(ids).logits, want)
        hf = AutoModelForCausalLM.from_pretrained(path)
        assert torch.equal(hf(ids).logits, want)
        out = hf.generate(ids[:1, :4], attention_mask=torch.ones(1, 4, dtype=torch.long), max_new_tokens=5,
                          min_new_tokens=5, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 9)
    hf.save_pretrained(path + "-resaved")  # transformers writes the same quantization_config back
    assert read_quant_config(path + "-resaved")[1].to_dict() == qc.to_dict()
    assert qc.extra["damp_percent"] == 0.01


def test_gptq_beats_rtn_on_the_calibration_text(quantized, tok):
    model, _, _, _ = quantized
    ref = tiny_llama(vocab_size=len(tok))
    rtn = tiny_llama(vocab_size=len(tok))
    quantize_model_rtn(rtn, "nf3", 32, progress=False)
    ids = tok("".join(_texts()), return_tensors="pt").input_ids[:, :SEQLEN]
    with torch.no_grad():
        f = ref(ids).logits
        err_gptq = (model(ids).logits - f).pow(2).mean().item()
        err_rtn = (rtn(ids).logits - f).pow(2).mean().item()
    assert err_gptq < err_rtn, (err_gptq, err_rtn)


def test_upstream_names_are_restored(quantized):
    from optimum.gptq import quantizer as oq

    afpq_optimum = _backend_or_skip()
    if afpq_optimum.uses_gptqmodel():
        from gptqmodel.quantization import GPTQ
    else:
        from auto_gptq.quantization import GPTQ
    assert oq.GPTQ is GPTQ
    assert oq.is_gptqmodel_available.__module__ == "optimum.utils.import_utils"
    assert torch.cuda.synchronize.__module__ == "torch.cuda"


def test_names_are_restored_when_quantization_fails(tok):
    from optimum.gptq import quantizer as oq

    afpq_optimum = _backend_or_skip()
    before = (oq.GPTQ, oq.is_gptqmodel_available, torch.cuda.synchronize)
    q = afpq_optimum.AFPQGPTQQuantizer(fmt="fp4", group_size=32, dataset=_texts(), model_seqlen=SEQLEN,
                                       block_name_to_quantize="model.no_such_blocks")
    with pytest.raises(Exception):
        q.quantize_model(tiny_llama(vocab_size=len(tok)), tok)
    assert (oq.GPTQ, oq.is_gptqmodel_available, torch.cuda.synchronize) == before


def test_quantize_on_load_through_afpq_config(float_folder, tok, tmp_path):
    _backend_or_skip()
    cfg = AFPQConfig(bits=4, fmt="fp4", group_size=32, dataset=_texts(), tokenizer=tok, model_seqlen=SEQLEN)
    model = AutoModelForCausalLM.from_pretrained(float_folder, quantization_config=cfg)
    assert isinstance(model.model.layers[0].mlp.up_proj, AFPQLinear)
    qc = model.config.quantization_config
    assert isinstance(qc, AFPQConfig) and qc.format == "fp4" and qc.method == "gptq" and len(qc.quantized_modules) == 14
    out = str(tmp_path / "on-load")
    model.save_pretrained(out)
    _, saved = read_quant_config(out)
    assert saved.format == "fp4" and saved.method == "gptq"
    ids = _ids(model.config.vocab_size)
    with torch.no_grad():
        want = model(ids).logits
        assert torch.equal(load_quantized(out)(ids).logits, want)
        assert torch.equal(AutoModelForCausalLM.from_pretrained(out)(ids).logits, want)


def test_quantize_on_load_without_dataset_is_an_error(float_folder):
    with pytest.raises(ValueError, match="dataset"):
        AutoModelForCausalLM.from_pretrained(float_folder, quantization_config=AFPQConfig(bits=4, fmt="fp4"))


def test_bad_arguments():
    afpq_optimum = _backend_or_skip()
    with pytest.raises(ValueError, match="3 bits"):
        afpq_optimum.AFPQGPTQQuantizer(bits=4, fmt="nf3")
    with pytest.raises(ValueError, match="awq layout"):
        afpq_optimum.AFPQGPTQQuantizer(fmt="fp4", layout="awq", desc_act=True)


def _int_gptq_run(tok):
    """Stock optimum INT4 GPTQ on the tiny model: one layer's result (packed where upstream can pack)."""
    from optimum.gptq import GPTQQuantizer

    afpq_optimum = _backend_or_skip()
    model = tiny_llama(vocab_size=len(tok))
    kw = dict(bits=4, group_size=32, dataset=_texts(), model_seqlen=SEQLEN, damp_percent=0.01)
    if afpq_optimum.uses_gptqmodel():
        GPTQQuantizer(**kw).quantize_model(model, tok)
        layer = model.model.layers[0].self_attn.q_proj
        assert not isinstance(layer, AFPQLinear)
        return {k: v.clone() for k, v in layer.state_dict().items()}

    # optimum 2.0.0 cannot pack with auto-gptq 0.7.1 at all (its select_quant_linear passes
    # sym= to auto-gptq's dynamically_import_QuantLinear, a TypeError), so the stock INT
    # GPTQ result is taken just before packing: the quantized weights, scales and zeros.
    class Capture(GPTQQuantizer):
        def pack_model(self, model, quantizers):
            self.captured = {n: (model.get_submodule(n).weight.detach().clone(), s.clone(), z.clone(), g.clone())
                             for n, (_, s, z, g) in quantizers.items()}

        def post_init_model(self, model):
            return model

        def to_dict(self):  # stock to_dict reads gptqmodel's version under the CPU shim
            return {"quant_method": "gptq", "bits": self.bits}

    from afpq_plugins.hf import compat

    q = Capture(**kw)
    with compat.cpu_calibration_optimum_2_0(), compat.no_cuda_synchronize():  # CPU shims only, no AFPQ hook
        q.quantize_model(model, tok)
    w, scale, zero, g_idx = q.captured["model.layers.0.self_attn.q_proj"]
    levels = torch.round(w.t() / scale[:, g_idx.long()].t()).t()  # INT: (q - z) * s, integer steps
    assert torch.allclose(levels, w / scale[:, g_idx.long()], atol=1e-3)
    return {"weight": w, "scales": scale, "zeros": zero, "g_idx": g_idx}


def test_int_gptq_in_the_same_process_is_unaffected(quantized, tok):
    after = _int_gptq_run(tok)
    assert {"scales", "g_idx"} <= set(after)
    # the AFPQ run (module fixture) happened before; run AFPQ again between two INT runs
    afpq_optimum = _backend_or_skip()
    afpq_optimum.AFPQGPTQQuantizer(fmt="nf4", group_size=32, dataset=_texts(), model_seqlen=SEQLEN).quantize_model(
        tiny_llama(vocab_size=len(tok)), tok)
    again = _int_gptq_run(tok)
    assert set(after) == set(again) and all(torch.equal(after[k], again[k]) for k in after)


def test_scale_search_goes_through_optimum(tok):
    """``scale_search="mse"`` reaches the engine's per-layer quantizer (it once silently did not):
    every group's parameters are core's searched ones for the block GPTQ hands over, and
    the checkpoint records the search."""
    from afpq_plugins.core.gptq import GridQuantizerMixin
    from afpq_plugins.core.quantize import find_params, round_params

    afpq_optimum = _backend_or_skip()
    seen = []
    orig = GridQuantizerMixin.find_params

    def spy(self, x, weight=False):
        orig(self, x, weight)
        # independent of the quantizer's state: core's search on the same block
        want = round_params(*find_params(x.flatten(1), "nf3", "afpq", search="mse"), mode="afpq")
        plain = round_params(*find_params(x.flatten(1), "nf3", "afpq"), mode="afpq")
        seen.append((torch.equal(self.scale, want[0]) and torch.equal(self.zero, want[1]),
                     not (torch.equal(want[0], plain[0]) and torch.equal(want[1], plain[1]))))

    model = tiny_llama(vocab_size=len(tok))
    q = afpq_optimum.AFPQGPTQQuantizer(fmt="nf3", group_size=32, dataset=_texts()[:2], model_seqlen=SEQLEN,
                                       scale_search="mse")
    GridQuantizerMixin.find_params = spy
    try:
        q.quantize_model(model, tok)
    finally:
        GridQuantizerMixin.find_params = orig
    assert seen and all(ok for ok, _ in seen)
    assert any(changed for _, changed in seen)  # the search moved some group's scales
    assert q.checkpoint_config.extra["scale_search"]["method"] == "mse"
    assert "scale_search" not in afpq_optimum.AFPQGPTQQuantizer(fmt="nf3").checkpoint_config.extra  # as before
    with pytest.raises(ValueError, match="scale_search"):
        afpq_optimum.AFPQGPTQQuantizer(fmt="nf3", scale_search="best")
