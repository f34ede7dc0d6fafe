"""GPTQ and AWQ through GPTQModel with its layer offload on (issue 23, calibrated methods at size).

GPTQModel's ``offload_to_disk`` onloads one decoder layer at a time from the source checkpoint and
puts each finished layer in an offload folder; the model object it returns holds meta tensors.
``afpq_plugins.gptqmodel.offloaded`` writes the checkpoint from there, tensor by tensor. The
reference is the in-memory path (the whole float32 model, ``quantize`` + ``save_quantized``), which
the other modern tests check against the engine and the loaders: the offloaded run must write the
same bytes, for GPTQ and AWQ, tied and untied heads, into several shards.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from _plain import afpq, plain_env

pytest.importorskip("gptqmodel")


def _folder(path, tok, tie: bool, seed: int = 0, layers: int = 3) -> str:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=layers, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=len(tok), tie_word_embeddings=tie,
                      max_position_embeddings=512)
    LlamaForCausalLM(cfg).to(torch.bfloat16).eval().save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def sources(tmp_path_factory, tok):
    root = tmp_path_factory.mktemp("offload-src")
    return {tie: _folder(str(root / f"tie{int(tie)}"), tok, tie) for tie in (True, False)}


def _spec(method: str):
    from afpq_plugins.core.formats import get_format
    from afpq_plugins.core.spec import QuantSpec

    return QuantSpec(get_format("nf4"), 64, "afpq", "float16", None, ("lm_head",), None).resolved(method)


def _calib(method: str):
    from afpq_plugins.methods import Calibration, get_method

    return Calibration(4, 64).resolved(get_method(method, "gptqmodel"))


def _in_memory(src: str, out: str, method: str) -> None:
    from afpq_plugins.data import load_model_and_tokenizer
    from afpq_plugins.methods import quantize
    from afpq_plugins.model import save_quantized

    model, tk = load_model_and_tokenizer(src, torch.float32)
    qc = quantize(model, tk, method, _spec(method), _calib(method), backend="gptqmodel")
    save_quantized(model, out, qc, tokenizer=tk, overwrite=True, dtype=torch.bfloat16, max_shard_size="100KB",
                   source_dir=src)


def _same_checkpoint(a: str, b: str) -> None:
    from afpq_plugins.core.checkpoint import load_checkpoint_tensors

    ta, tb = load_checkpoint_tensors(a), load_checkpoint_tensors(b)
    assert sorted(ta) == sorted(tb)
    for k in ta:
        assert ta[k].dtype == tb[k].dtype and ta[k].shape == tb[k].shape, k
        assert torch.equal(ta[k], tb[k]), k
    ca, cb = (json.load(open(os.path.join(p, "config.json"))) for p in (a, b))
    assert ca == cb


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_offloaded_run_writes_the_in_memory_bytes(sources, tmp_path, method, tie):
    from afpq_plugins.gptqmodel.offloaded import quantize_offloaded
    from afpq_plugins.model import load_quantized

    src = sources[tie]
    lines = []
    res = quantize_offloaded(src, str(tmp_path / "off"), _spec(method), _calib(method), method,
                             max_shard_size="100KB", log=lines.append)
    assert "layer offload" in lines[0] and "torch.float32" in lines[0] and "written as torch.bfloat16" in lines[0]
    files = os.listdir(res.path)
    assert "model.safetensors.index.json" in files and sum(f.endswith(".safetensors") for f in files) >= 3
    assert not [f for f in os.listdir(tmp_path) if ".offload-" in f]  # the offload folder is gone
    _in_memory(src, str(tmp_path / "mem"), method)
    _same_checkpoint(res.path, str(tmp_path / "mem"))
    cfg = json.load(open(os.path.join(res.path, "config.json")))
    assert cfg["tie_word_embeddings"] is tie and cfg["dtype"] == "bfloat16"
    assert len(res.qc.quantized_modules) == 21 and res.coverage.quantized == res.qc.quantized_modules
    # the sharded result loads, and its head is the source's (GPTQModel keeps lm_head float)
    model = load_quantized(res.path)
    from safetensors.torch import load_file

    src_sd = {}
    for f in os.listdir(src):
        if f.endswith(".safetensors"):
            src_sd.update(load_file(os.path.join(src, f)))
    head = src_sd["model.embed_tokens.weight" if tie else "lm_head.weight"]
    assert torch.equal(model.lm_head.weight.to(torch.bfloat16), head)
    with torch.no_grad():
        assert torch.isfinite(model(torch.arange(16)[None]).logits).all()


def test_the_python_api_saves_an_offloaded_model(sources, tmp_path, tok):
    """``GPTQModel.load(src, QuantizeConfig(..., offload_to_disk=True))`` + ``save``: the meta tensors are
    read back from the offload folder and the source."""
    from afpq_plugins.gptqmodel import GPTQModel, QuantizeConfig
    from afpq_plugins.methods import Calibration

    src = sources[True]
    cfg = QuantizeConfig(fmt="nf4", group_size=64, offload_to_disk=True,
                         offload_to_disk_path=str(tmp_path / "offload"))
    qm = GPTQModel.load(src, cfg, dtype=torch.float32)
    rows = [{"input_ids": s.tolist(), "attention_mask": [1] * s.numel()}
            for s in Calibration(4, 64).samples(tok)]
    qm.quantize(rows, tokenizer=tok, batch_size=1)
    assert any(t.device.type == "meta" for t in qm.model.state_dict().values())  # really offloaded
    qm.save(str(tmp_path / "api"))
    _in_memory(src, str(tmp_path / "mem"), "gptq")
    from afpq_plugins.core.checkpoint import load_checkpoint_tensors

    a, b = load_checkpoint_tensors(str(tmp_path / "api")), load_checkpoint_tensors(str(tmp_path / "mem"))
    assert sorted(a) == sorted(b)
    for k in a:  # the API writes the source dtype too
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def test_the_cli_takes_the_offloaded_path_in_a_plain_shell(sources, tmp_path):
    out = tmp_path / "cli"
    r = afpq(["quantize", sources[False], str(out), "--method", "awq", "--backend", "gptqmodel", "--format", "nf4",
              "--group-size", "64", "--nsamples", "4", "--calib-seqlen", "64", "--max-shard-size", "100KB"],
             cwd=str(tmp_path), env=plain_env())
    assert r.returncode == 0, r.stderr[-3000:]
    assert "awq through gptqmodel, layer offload on" in r.stderr
    assert "GPTQModel with layer offload" in r.stdout
    assert "quantized 21 layers: 0 expert and 21 non-expert" in r.stderr
    assert not [f for f in os.listdir(tmp_path) if ".offload-" in f]
    _in_memory(sources[False], str(tmp_path / "mem"), "awq")
    _same_checkpoint(str(out), str(tmp_path / "mem"))


def test_a_bits_budget_stays_in_memory_and_says_so(sources, tmp_path):
    r = afpq(["quantize", sources[True], str(tmp_path / "b"), "--method", "gptq", "--backend", "gptqmodel",
              "--bits-budget", "4.25", "--nsamples", "4", "--calib-seqlen", "64"],
             cwd=str(tmp_path), env=plain_env())
    assert r.returncode == 0, r.stderr[-3000:]
    assert "layer offload" not in r.stderr and "in memory" in r.stderr


def test_a_tensor_found_nowhere_is_named(tmp_path):
    from accelerate.hooks import attach_align_device_hook  # noqa: F401  (accelerate is GPTQModel's)
    from afpq_plugins.core.checkpoint import CheckpointError
    from afpq_plugins.gptqmodel.offloaded import offloaded_tensor_reader

    with torch.device("meta"):
        m = torch.nn.Sequential(torch.nn.Linear(4, 3))
    keys, read = offloaded_tensor_reader(m, None)
    assert keys == ["0.weight", "0.bias"]
    with pytest.raises(CheckpointError, match=r"'0\.weight'.*neither its offload folder nor the source"):
        read("0.weight")


def test_reads_come_from_the_disk_offload_hook(tmp_path):
    """The accelerate disk-offload path, checked on its own: the tensor read is the one offloaded."""
    from accelerate import disk_offload

    from afpq_plugins.gptqmodel.offloaded import offloaded_tensor_reader

    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.LayerNorm(6))
    want = {k: v.clone() for k, v in m.state_dict().items()}
    disk_offload(m, str(tmp_path / "off"), execution_device="cpu")
    assert m[0].weight.device.type == "meta"
    keys, read = offloaded_tensor_reader(m, None)
    assert sorted(keys) == sorted(want)
    for k in keys:
        assert torch.equal(read(k), want[k]), k


def test_fused_moe_experts_take_the_in_memory_path(tmp_path, tok):
    """A transformers-5 MoE folder (fused 3-D experts): the offloaded run refuses before GPTQModel
    loads anything (its loader would unfuse the experts into a layout no AFPQ loader reads)."""
    from transformers import MixtralConfig, MixtralForCausalLM

    from afpq_plugins.gptqmodel.offloaded import quantize_offloaded
    from afpq_plugins.streaming import NotStreamable

    torch.manual_seed(0)
    cfg = MixtralConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, vocab_size=len(tok),
                        max_position_embeddings=256)
    src = str(tmp_path / "moe")
    MixtralForCausalLM(cfg).save_pretrained(src)
    tok.save_pretrained(src)
    with pytest.raises(NotStreamable, match="fused 3-D expert module.*unfuses"):
        quantize_offloaded(src, str(tmp_path / "out"), _spec("gptq"), _calib("gptq"), "gptq")
    assert not os.path.exists(tmp_path / "out") and not [f for f in os.listdir(tmp_path) if ".offload-" in f]


def test_a_pickled_source_falls_back_to_memory_and_says_why(tmp_path, tok, capsys):
    from transformers import LlamaConfig, LlamaForCausalLM

    from afpq_plugins.cli import main

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=256)
    src = str(tmp_path / "bin")
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(src)
    tok.save_pretrained(src)
    os.remove(os.path.join(src, "model.safetensors"))  # transformers 5 writes safetensors only: the .bin by hand
    torch.save(model.state_dict(), os.path.join(src, "pytorch_model.bin"))
    assert os.path.isfile(os.path.join(src, "pytorch_model.bin"))
    rc = main(["quantize", src, str(tmp_path / "out"), "--method", "gptq", "--format", "nf4", "--group-size", "32",
               "--nsamples", "2", "--calib-seqlen", "32"])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "gptq in memory (cannot use GPTQModel's layer offload:" in err and "pickled .bin" in err
    assert json.load(open(tmp_path / "out" / "config.json"))["quantization_config"]["method"] == "gptq"


def test_an_occupied_output_is_refused_before_the_run(sources, tmp_path):
    from afpq_plugins.gptqmodel.offloaded import quantize_offloaded

    out = tmp_path / "taken"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="already exists and is not empty"):
        quantize_offloaded(sources[True], str(out), _spec("gptq"), _calib("gptq"), "gptq")
    assert (out / "notes.txt").read_text() == "mine" and not [f for f in os.listdir(tmp_path) if ".offload-" in f]
