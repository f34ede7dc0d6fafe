"""The output scale search streamed one decoder layer at a time (issue 23).

Reference: the in-memory output search (``rtn.run`` on the whole float32 model, energies
from one forward pass of the float model, then ``save_quantized``). The layer-by-layer path
propagates the float layers' outputs too, so every tensor of the checkpoint must be the
same bytes, on tied and untied tiny Llamas, sharded sources, with the output head quantized
or not, and through the CLI. Also: the energies each layer sees equal ``input_energies`` of
the whole model (float64 recomputation as an independent check of the accumulation).
"""

from __future__ import annotations

import json
import os

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from _tiny import tiny_llama, tiny_tokenizer  # noqa: E402
from afpq_plugins import cli, rtn  # noqa: E402
from afpq_plugins.core.checkpoint import load_checkpoint_tensors  # noqa: E402
from afpq_plugins.core.spec import QuantSpec  # noqa: E402
from afpq_plugins.methods import Calibration  # noqa: E402
from afpq_plugins.model import save_quantized  # noqa: E402
from afpq_plugins.streaming import NotStreamable, quantize_rtn_streaming  # noqa: E402

CALIB = Calibration(nsamples=3, seqlen=48)


def _src(path, tie, dtype=torch.bfloat16):
    tok = tiny_tokenizer()
    model = tiny_llama(vocab_size=len(tok), tie=tie).to(dtype)
    model.save_pretrained(str(path), max_shard_size="30KB")
    tok.save_pretrained(str(path))
    return str(path)


def _load_f32(path):
    from afpq_plugins.data import load_model_and_tokenizer

    return load_model_and_tokenizer(path, torch.float32)


def _raw(t):
    return t.reshape(-1).view(torch.uint8) if t.numel() else t


def _same_tensors(a_dir, b_dir):
    a, b = load_checkpoint_tensors(a_dir), load_checkpoint_tensors(b_dir)
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(_raw(a[k]), _raw(b[k])), k
    qa = json.load(open(os.path.join(a_dir, "config.json")))["quantization_config"]
    qb = json.load(open(os.path.join(b_dir, "config.json")))["quantization_config"]
    assert qa == qb
    return a


@pytest.mark.parametrize("tie,skip", [(False, ("lm_head",)), (True, ("lm_head",)), (False, ()), (True, ())],
                         ids=["untied", "tied", "untied-head-quantized", "tied-head-quantized"])
def test_layer_by_layer_equals_in_memory_bytes(tmp_path, tie, skip):
    src = _src(tmp_path / "src", tie)
    spec = QuantSpec("nf4", 32, skip=skip, scale_search="output")
    model, tok = _load_f32(src)
    qc = rtn.run(model, tok, spec, CALIB, progress=False)
    mem = save_quantized(model, str(tmp_path / "mem"), qc, dtype=torch.bfloat16)
    out = str(tmp_path / "stream")
    quantize_rtn_streaming(src, out, spec, max_shard_size="40KB",
                           calibration=rtn.calibration_samples(tok, CALIB))
    assert len([n for n in os.listdir(out) if n.endswith(".safetensors")]) >= 3
    t = _same_tensors(out, mem)
    assert ("lm_head.qweight" in t) == (not skip)
    # the output search changed something against plain RTN (else the test would prove little)
    plain = str(tmp_path / "plain")
    quantize_rtn_streaming(src, plain, QuantSpec("nf4", 32, skip=skip))
    p = load_checkpoint_tensors(plain)
    assert any(not torch.equal(p[k], t[k]) for k in t if k.endswith(".scales"))


def test_energies_match_a_float64_recomputation(tmp_path, monkeypatch):
    """The energies each layer's Linears get are diag(X^T X) of their inputs in the whole
    float model (recomputed in float64 from hooks on the in-memory model)."""
    from afpq_plugins import streaming_output as so
    from afpq_plugins.core import output_search as O

    src = _src(tmp_path / "src", False, torch.float32)
    model, tok = _load_f32(src)
    samples = rtn.calibration_samples(tok, CALIB)
    xs = {}
    lins = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"}
    hs = [m.register_forward_pre_hook(lambda mod, a, n=n: xs.setdefault(n, []).append(a[0].double()))
          for n, m in lins.items()]
    with torch.no_grad():
        for s in samples:
            model(s.reshape(1, -1))
    for h in hs:
        h.remove()
    ref = {n: sum((x.reshape(-1, x.shape[-1]) ** 2).sum(0) for x in v) for n, v in xs.items()}
    seen = {}
    orig = O.BoundOutputSearch.__init__

    def record(self, search, energies=None, second_moment=None, name="weight"):
        seen[name] = energies.reshape(-1).double()
        orig(self, search, energies, second_moment, name)

    monkeypatch.setattr(O.BoundOutputSearch, "__init__", record)
    quantize_rtn_streaming(src, str(tmp_path / "o"), QuantSpec("nf4", 32, scale_search="output"),
                           calibration=samples)
    assert set(seen) == set(ref)
    for n in ref:
        torch.testing.assert_close(seen[n], ref[n], rtol=1e-5, atol=0, msg=n)
    assert so  # the module under test


def test_cli_output_search_streams_layer_by_layer(tmp_path, capsys):
    src = _src(tmp_path / "src", False)
    out = str(tmp_path / "cli")
    rc = cli.main(["quantize", src, out, "--method", "rtn", "--group-size", "32", "--scale-search", "output",
                   "--nsamples", "3", "--calib-seqlen", "48", "--max-shard-size", "40KB", "--quiet"])
    assert rc == 0
    model, tok = _load_f32(src)
    spec = QuantSpec("nf4", 32, scale_search="output")
    qc = rtn.run(model, tok, spec, CALIB, progress=False)
    mem = save_quantized(model, str(tmp_path / "mem"), qc, dtype=torch.bfloat16)
    _same_tensors(out, mem)
    rc = cli.main(["quantize", src, str(tmp_path / "cli2"), "--method", "rtn", "--group-size", "32",
                   "--scale-search", "output", "--nsamples", "3", "--calib-seqlen", "48"])
    err = capsys.readouterr().err
    assert rc == 0 and "layer by layer (output search" in err and "in memory" not in err


def test_without_calibration_it_does_not_stream(tmp_path):
    src = _src(tmp_path / "src", False)
    with pytest.raises(NotStreamable, match="output scale search needs calibration"):
        quantize_rtn_streaming(src, str(tmp_path / "o"), QuantSpec("nf4", 32, scale_search="output"))
    assert not os.path.exists(tmp_path / "o")


def test_mixed_layer_types_take_the_in_memory_path(tmp_path, capsys):
    """Sliding-window and full-attention layers get different masks: replaying the first
    layer's inputs would be wrong, so the run says so and takes the in-memory path (same result)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tok = tiny_tokenizer()
    torch.manual_seed(0)
    cfg = Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=512,
                      use_sliding_window=True, sliding_window=16, max_window_layers=1)
    assert len(set(cfg.layer_types)) == 2
    src = str(tmp_path / "qwen2")
    Qwen2ForCausalLM(cfg).eval().save_pretrained(src)
    tok.save_pretrained(src)
    with pytest.raises(NotStreamable, match="2 types"):
        quantize_rtn_streaming(src, str(tmp_path / "o"), QuantSpec("nf4", 32, scale_search="output"),
                               calibration=[torch.arange(40)])
    assert not os.path.exists(tmp_path / "o")
    assert cli.main(["quantize", src, str(tmp_path / "cli"), "--group-size", "32", "--scale-search", "output",
                     "--nsamples", "2", "--calib-seqlen", "48"]) == 0
    assert "rtn in memory (cannot stream: its decoder layers are of 2 types" in capsys.readouterr().err
