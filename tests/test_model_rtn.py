"""RTN on a tiny random Llama: quantize, save, load, run, and loader errors."""

from __future__ import annotations

import json
import os
import re
import shutil

import pytest
import torch
from torch import nn

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from safetensors.torch import load_file as st_load_file  # noqa: E402
from safetensors.torch import save_file as st_save_file  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from afpq_plugins.core.checkpoint import AFPQConfigDict, CheckpointError  # noqa: E402
from afpq_plugins.core.quantize import fake_quantize  # noqa: E402
from afpq_plugins.model import load_quantized, quantize_model_rtn, save_quantized  # noqa: E402
from afpq_plugins.nn import AFPQLinear  # noqa: E402

LINEARS = [
    f"model.layers.{i}.{m}"
    for i in range(2)
    for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
              "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
]


@pytest.fixture(scope="module")
def tiny():
    """(config, float state dict) of a tiny random Llama with tied embeddings."""
    cfg = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=256, tie_word_embeddings=True, max_position_embeddings=64,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    return cfg, sd


def _fresh(tiny):
    cfg, sd = tiny
    model = LlamaForCausalLM(cfg)
    model.load_state_dict(sd)
    model.tie_weights()
    return model.eval()


def _ids():
    g = torch.Generator().manual_seed(1)
    return torch.randint(3, 256, (2, 7), generator=g)


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits


def _generate(model, ids):
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4,
                              do_sample=False, pad_token_id=0)


CASES = [
    ("nf4", "afpq", 32, "gptq"),
    ("fp4", "afpq", 64, "awq"),
    ("nf3", "afpq", -1, "gptq"),
    ("fp3", "sym", 64, "gptq"),
    ("int4", "zp", 32, "gptq"),
    ("nf4", "zp", 16, "awq"),
]


@pytest.mark.parametrize("fmt,mode,gs,layout", CASES)
def test_rtn_save_load_round_trip(tiny, tmp_path, fmt, mode, gs, layout):
    model = _fresh(tiny)
    float_w = {n: model.get_submodule(n).weight.detach().clone() for n in LINEARS}
    embed = model.model.embed_tokens.weight.detach().clone()
    ids = _ids()

    qc = quantize_model_rtn(model, fmt, gs, mode, layout, progress=False)
    assert (qc.format, qc.mode, qc.group_size, qc.layout, qc.bits) == (fmt, mode, gs, layout, model.get_submodule(LINEARS[0]).bits)
    assert qc.quantized_modules == LINEARS
    for n in LINEARS:
        layer = model.get_submodule(n)
        assert isinstance(layer, AFPQLinear) and layer.layout == layout
        assert torch.equal(layer.dequantize(), fake_quantize(float_w[n], fmt, gs, mode)), n
    assert type(model.lm_head) is nn.Linear
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    logits = _logits(model, ids)
    assert torch.isfinite(logits).all()

    out = save_quantized(model, str(tmp_path / "ck"), qc)
    files = set(os.listdir(out))
    assert {"config.json", "model.safetensors"} <= files
    cfg = json.load(open(os.path.join(out, "config.json")))
    q = cfg["quantization_config"]
    assert (q["quant_method"], q["format"], q["mode"], q["group_size"], q["layout"]) == ("afpq", fmt, mode, gs, layout)
    tensors = st_load_file(os.path.join(out, "model.safetensors"))  # the real safetensors reads it
    assert "lm_head.weight" not in tensors  # tied: stored once, as the embedding
    assert torch.equal(tensors["model.embed_tokens.weight"], embed)
    second = {"afpq": "scales_neg", "zp": "zeros", "sym": None}[mode]
    for n in LINEARS:
        assert f"{n}.qweight" in tensors and f"{n}.scales" in tensors
        for ph in (f"{n}.weight", f"{n}.qzeros"):  # refusal placeholders, not a float weight
            assert tensors[ph].dtype == torch.uint8 and tensors[ph].tolist() == [0], ph
        assert (f"{n}.scales_neg" in tensors) == (second == "scales_neg")
        assert (f"{n}.zeros" in tensors) == (second == "zeros")
        assert (f"{n}.g_idx" in tensors) == (layout == "gptq")

    loaded = load_quantized(out)
    assert not loaded.training
    for n in LINEARS:
        layer = loaded.get_submodule(n)
        assert isinstance(layer, AFPQLinear)
        assert (layer.fmt.name, layer.mode, layer.group_size, layer.layout) == (fmt, mode, gs, layout)
        # The reloaded weights are the fake-quantized float weights.
        assert torch.equal(layer.dequantize(), fake_quantize(float_w[n], fmt, gs, mode)), n
    assert type(loaded.lm_head) is nn.Linear
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    assert torch.equal(loaded.lm_head.weight, embed)
    assert torch.equal(loaded.model.norm.weight, model.model.norm.weight)
    assert torch.equal(_logits(loaded, ids), logits)
    gen = _generate(loaded, ids)
    assert gen.shape == (2, 11)
    assert torch.equal(gen[:, :7], ids)
    assert torch.equal(gen, _generate(model, ids))
    assert loaded.config.quantization_config["format"] == fmt


def test_save_is_deterministic(tiny, tmp_path):
    model = _fresh(tiny)
    qc = quantize_model_rtn(model, "nf4", 32, progress=False)
    a = save_quantized(model, str(tmp_path / "a"), qc)
    b = save_quantized(model, str(tmp_path / "b"), qc)
    for f in ("config.json", "model.safetensors"):
        assert open(os.path.join(a, f), "rb").read() == open(os.path.join(b, f), "rb").read(), f
    with pytest.raises(FileExistsError):
        save_quantized(model, a, qc)
    save_quantized(model, a, qc, overwrite=True)


def test_quantize_model_rtn_validates_before_touching(tiny):
    model = _fresh(tiny)
    with pytest.raises(ValueError, match="group_size 48"):
        quantize_model_rtn(model, "nf4", 48, progress=False)  # 64 % 48 != 0
    assert not any(isinstance(m, AFPQLinear) for m in model.modules())
    with pytest.raises(ValueError, match="no nn.Linear"):
        quantize_model_rtn(model, "nf4", 32, skip=("lm_head", "model"), progress=False)
    with pytest.raises(ValueError, match="does not support mode"):
        quantize_model_rtn(model, "int4", 32, "afpq", progress=False)
    assert not any(isinstance(m, AFPQLinear) for m in model.modules())


def test_skip_list_keeps_layers_float(tiny, tmp_path):
    model = _fresh(tiny)
    qc = quantize_model_rtn(model, "fp4", 32, skip=("lm_head", "down_proj"), progress=False)
    assert type(model.model.layers[0].mlp.down_proj) is nn.Linear
    assert isinstance(model.model.layers[0].mlp.up_proj, AFPQLinear)
    out = save_quantized(model, str(tmp_path / "ck"), qc)
    loaded = load_quantized(out)
    assert type(loaded.model.layers[1].mlp.down_proj) is nn.Linear
    ids = _ids()
    assert torch.equal(_logits(loaded, ids), _logits(model, ids))


# -- loader errors ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def saved(tiny, tmp_path_factory):
    model = _fresh(tiny)
    qc = quantize_model_rtn(model, "nf4", 32, progress=False)
    return save_quantized(model, str(tmp_path_factory.mktemp("ck") / "nf4"), qc)


def _copy(saved, tmp_path):
    dst = str(tmp_path / "broken")
    shutil.copytree(saved, dst)
    return dst


def _edit_tensors(path, fn):
    f = os.path.join(path, "model.safetensors")
    t = st_load_file(f)
    fn(t)
    st_save_file(t, f, metadata={"format": "pt"})


def _edit_config(path, fn):
    f = os.path.join(path, "config.json")
    cfg = json.load(open(f))
    fn(cfg["quantization_config"])
    json.dump(cfg, open(f, "w"))


def test_missing_scales_neg_named(saved, tmp_path):
    path = _copy(saved, tmp_path)
    key = "model.layers.1.self_attn.v_proj.scales_neg"
    _edit_tensors(path, lambda t: t.pop(key))
    with pytest.raises(CheckpointError) as exc:
        load_quantized(path)
    assert repr(key) in str(exc.value) and "missing" in str(exc.value)


def test_misshapen_tensor_named(saved, tmp_path):
    path = _copy(saved, tmp_path)
    key = "model.layers.0.mlp.down_proj.scales"

    def shrink(t):
        t[key] = t[key][:, :32].contiguous()

    _edit_tensors(path, shrink)
    with pytest.raises(CheckpointError) as exc:
        load_quantized(path)
    assert repr(key) in str(exc.value) and "(4, 32)" in str(exc.value) and "(4, 64)" in str(exc.value)


def test_misshapen_float_tensor_named(saved, tmp_path):
    path = _copy(saved, tmp_path)
    key = "model.layers.0.input_layernorm.weight"

    def grow(t):
        t[key] = torch.ones(65)

    _edit_tensors(path, grow)
    with pytest.raises(CheckpointError) as exc:
        load_quantized(path)
    assert repr(key) in str(exc.value)


def test_missing_float_tensor_and_unexpected_tensor_named(saved, tmp_path):
    path = _copy(saved, tmp_path)
    _edit_tensors(path, lambda t: t.pop("model.norm.weight"))
    with pytest.raises(CheckpointError, match="'model.norm.weight' is missing"):
        load_quantized(path)
    path2 = str(tmp_path / "extra")
    shutil.copytree(saved, path2)
    _edit_tensors(path2, lambda t: t.__setitem__("model.layers.0.mlp.up_proj.weight", torch.ones(128, 64)))
    with pytest.raises(CheckpointError, match="model.layers.0.mlp.up_proj.weight"):
        load_quantized(path2)


def test_checkpoint_without_placeholders_still_loads(saved, tmp_path):
    """Checkpoints written before the refusal placeholders existed load unchanged."""
    old = _copy(saved, tmp_path)
    _edit_tensors(old, lambda t: [t.pop(k) for k in [k for k in t if k.endswith((".qzeros", "proj.weight"))]])
    assert not any(k.endswith("_proj.weight") for k in st_load_file(os.path.join(old, "model.safetensors")))
    ids = _ids()
    new_model, old_model = load_quantized(saved), load_quantized(old)
    assert torch.equal(_logits(old_model, ids), _logits(new_model, ids))
    assert set(old_model.state_dict()) == set(new_model.state_dict())
    assert not any(k.endswith(("_proj.weight", ".qzeros")) for k in new_model.state_dict())
    # saving it again writes the placeholders
    again = save_quantized(old_model, str(tmp_path / "again"), AFPQConfigDict.from_dict(old_model.config.quantization_config))
    assert st_load_file(os.path.join(again, "model.safetensors"))["model.layers.1.mlp.up_proj.qzeros"].dtype == torch.uint8


def test_wrong_placeholder_named(saved, tmp_path):
    path = _copy(saved, tmp_path)
    key = "model.layers.1.self_attn.k_proj.qzeros"
    _edit_tensors(path, lambda t: t.__setitem__(key, torch.zeros(2, 4, dtype=torch.int32)))
    with pytest.raises(CheckpointError, match=re.escape(repr(key))):
        load_quantized(path)


def test_foreign_quant_method_named(saved, tmp_path):
    path = _copy(saved, tmp_path)
    _edit_config(path, lambda q: q.update(quant_method="gptq"))
    with pytest.raises(CheckpointError) as exc:
        load_quantized(path)
    msg = str(exc.value)
    assert "quant_method" in msg and "'gptq'" in msg and "config.json" in msg


def test_unknown_format_named(saved, tmp_path):
    path = _copy(saved, tmp_path)

    def rename(q):
        q["format"] = "nf5"
        q.pop("table")

    _edit_config(path, rename)
    with pytest.raises(CheckpointError) as exc:
        load_quantized(path)
    msg = str(exc.value)
    assert "format" in msg and "'nf5'" in msg and "config.json" in msg


def test_bits_mismatch_named(saved, tmp_path):
    path = _copy(saved, tmp_path)
    _edit_config(path, lambda q: q.update(bits=3))
    with pytest.raises(CheckpointError, match="quantization_config.bits"):
        load_quantized(path)


def test_truncated_weights_named(saved, tmp_path):
    path = _copy(saved, tmp_path)
    f = os.path.join(path, "model.safetensors")
    raw = open(f, "rb").read()
    open(f, "wb").write(raw[:-100])
    with pytest.raises(ValueError, match="truncated"):
        load_quantized(path)


def test_custom_format_with_biases_reloads_in_a_fresh_registry(tiny, tmp_path, restore_format_registry):
    """A custom grid travels in config.json's table: it reloads after the registry forgets it.
    attention_bias=True exercises the bias tensors."""
    from afpq_plugins.core.formats import register_format

    cfg, _ = tiny
    cfg = LlamaConfig(**{**cfg.to_dict(), "attention_bias": True})
    torch.manual_seed(3)
    model = LlamaForCausalLM(cfg).eval()
    table = [-1.0, -0.75, -0.5, -0.25, 0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0]
    register_format("t_grid4", table)
    q_w = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    q_b = model.model.layers[0].self_attn.q_proj.bias.detach().clone()
    qc = quantize_model_rtn(model, "t_grid4", 32, progress=False)
    assert qc.mode == "afpq" and qc.table == table
    out = save_quantized(model, str(tmp_path / "ck"), qc)
    del restore_format_registry._REGISTRY["t_grid4"]
    loaded = load_quantized(out)
    layer = loaded.model.layers[0].self_attn.q_proj
    assert list(layer.fmt.values) == table
    assert torch.equal(layer.bias, q_b)
    # Independent decode: nearest table value per weight with the stored scales.
    tbl = torch.tensor(table, dtype=torch.float64)
    codes = layer.codes().long()
    s_pos = layer.scales.double().repeat_interleave(32, 0).t()
    s_neg = layer.scales_neg.double().repeat_interleave(32, 0).t()
    v = tbl[codes]
    ref = torch.where(v > 0, v * s_pos, v * s_neg)
    torch.testing.assert_close(layer.dequantize().double(), ref, rtol=2**-22, atol=0)
    # Each weight took the nearest of its group's candidate values (brute force, float64).
    cand = torch.where(tbl > 0, tbl * s_pos[..., None], tbl * s_neg[..., None])  # [out, in, 16]
    best = (q_w.double()[..., None] - cand).abs().min(-1).values
    got = (q_w.double() - layer.dequantize().double()).abs()
    assert (got <= best + 1e-6 * q_w.double().abs() + 1e-12).all()
    ids = _ids()
    assert torch.equal(_logits(loaded, ids), _logits(model, ids))


def test_load_with_dtype(saved):
    loaded = load_quantized(saved, dtype=torch.bfloat16)
    assert loaded.model.embed_tokens.weight.dtype == torch.bfloat16
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    layer = loaded.model.layers[0].mlp.up_proj
    assert layer.scales.dtype == torch.float16 and layer.qweight.dtype == torch.int32  # stored params untouched
    ref = load_quantized(saved)
    ids = _ids()
    a, b = _logits(loaded, ids), _logits(ref, ids)
    assert a.dtype == torch.bfloat16 and torch.isfinite(a).all()
    assert (a.float() - b).abs().max() < 0.05 * b.abs().max()


def test_save_names_the_architecture_of_a_model_built_from_config(tmp_path):
    """A model built with ``from_config`` has ``architectures=None``; the checkpoint names its
    class as transformers' ``save_pretrained`` does (engines such as vLLM pick the class by it)."""
    from _tiny import tiny_llama

    model = tiny_llama()
    assert not model.config.architectures
    qc = quantize_model_rtn(model, "nf4", 32, progress=False)
    out = save_quantized(model, str(tmp_path / "q"), qc)
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["architectures"] == ["LlamaForCausalLM"]
    assert type(load_quantized(out)).__name__ == "LlamaForCausalLM"
