"""The AutoGPTQ 0.7.1 adapter end to end, on tiny random Llama (nn.Linear) and GPT-2 (Conv1D).

Every case: ``AutoGPTQForCausalLM.from_pretrained(folder, AFPQQuantizeConfig)`` ->
``quantize`` -> ``save_quantized`` -> ``from_quantized(device="cpu")`` -> forward and
generate, on CPU. Checked:

* every reloaded layer decodes exactly (bit for bit, in the model's dtype) to the
  fake-quantized weight GPTQ wrote into the float layer;
* each reloaded layer's output matches a float64 reference ``x @ W_q.T + b`` (``W_q``: the
  grid values times the stored scales) within
  ``|err| <= eps_out * |ref| + 8 * in_features * 2**-24 * (|x| @ |W_q|.T + |b|)``:
  float32 accumulation (at most ``in_features`` roundings of relative size 2**-24, times
  8 for slack) plus one rounding to the output dtype (``eps_out``: 0 for float32,
  2**-11 for float16);
* the whole model's logits equal the in-process quantized model's;
* the config's fields survive ``save_quantized`` / ``from_pretrained``.
"""

from __future__ import annotations

import os
import warnings

import pytest
import torch

from _tiny import TEXT, tiny_llama_folder, tiny_tokenizer

with warnings.catch_warnings(record=True):
    auto_gptq = pytest.importorskip("auto_gptq")
    import afpq_plugins.autogptq as A
    from auto_gptq import AutoGPTQForCausalLM
    from auto_gptq.modeling._utils import find_layers

from afpq_plugins.nn import AFPQLinear


def tiny_gpt2_folder(path: str, seed: int = 0) -> str:
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = tiny_tokenizer()
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=len(tok), n_positions=256, n_embd=64, n_layer=2, n_head=4)
    GPT2LMHeadModel(cfg).eval().save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("autogptq_models")
    return {
        "llama": tiny_llama_folder(str(root / "llama")),
        "gpt2": tiny_gpt2_folder(str(root / "gpt2")),
    }


@pytest.fixture(scope="module")
def examples():
    tok = tiny_tokenizer()
    ids = tok(TEXT, return_tensors="pt").input_ids[0]
    return A.examples_from_ids([ids[i : i + 64] for i in range(0, 4 * 64, 64)])


# (arch, torch dtype, config kwargs): Llama and GPT-2, each with and without desc_act;
# between them 3 and 4 bits, fp16 and fp32, groups 32 and -1, static groups,
# true_sequential on and off, AFPQ (two scales), sym (one scale), and FP and NF grids.
CASES = [
    ("llama", torch.float32, dict(bits=3, fmt="nf3", group_size=32, desc_act=False)),
    ("llama", torch.float16, dict(bits=4, fmt="fp4", group_size=32, desc_act=True, static_groups=True)),
    ("llama", torch.float32, dict(bits=4, fmt="nf4", group_size=-1, desc_act=True, true_sequential=False, sym=True)),
    ("gpt2", torch.float16, dict(bits=4, fmt="nf4", group_size=-1, desc_act=False, true_sequential=False)),
    ("gpt2", torch.float32, dict(bits=3, fmt="fp3", group_size=32, desc_act=True)),
]


def _ids(case):
    arch, dt, kw = case
    return f"{arch}-{str(dt)[6:]}-{kw['fmt']}-g{kw['group_size']}-{'act' if kw['desc_act'] else 'noact'}"


def _weight_oi(layer):
    """[out, in] weight of an nn.Linear or a transformers Conv1D."""
    from transformers.pytorch_utils import Conv1D

    w = layer.weight.data
    return w.t() if isinstance(layer, Conv1D) else w


@pytest.fixture(scope="module", params=CASES, ids=[_ids(c) for c in CASES])
def quantized(request, folders, examples, tmp_path_factory):
    arch, dtype, kw = request.param
    cfg = A.AFPQQuantizeConfig(**kw)
    model = AutoGPTQForCausalLM.from_pretrained(folders[arch], cfg, torch_dtype=dtype)
    float_layers = {n: m for n, m in find_layers(model.model).items() if not n.startswith(model.lm_head_name)}
    model.quantize(examples)
    # GPTQ writes its fake-quantized weight into each float layer before packing.
    fake = {n: _weight_oi(m).clone() for n, m in float_layers.items()}
    out = str(tmp_path_factory.mktemp("ckpt") / "q")
    model.save_quantized(out)
    reloaded = AutoGPTQForCausalLM.from_quantized(out, device="cpu")
    return dict(arch=arch, dtype=dtype, cfg=cfg, model=model, fake=fake, out=out, reloaded=reloaded)


def test_layers_are_afpq_and_pack_exactly(quantized):
    model = quantized["model"]
    qlayers = {n: m for n, m in model.model.named_modules() if isinstance(m, A.AFPQQuantLinear)}
    assert set(qlayers) == set(quantized["fake"])
    for name, layer in qlayers.items():
        assert layer.pack_mismatches == 0, name
        assert layer.fmt.name == quantized["cfg"].fmt and layer.mode == quantized["cfg"].mode


def test_checkpoint_format(quantized):
    import json

    with open(os.path.join(quantized["out"], "config.json"), encoding="utf-8") as fh:
        qc = json.load(fh)["quantization_config"]
    cfg = quantized["cfg"]
    assert qc["quant_method"] == "afpq" and qc["method"] == "gptq" and qc["layout"] == "gptq"
    assert (qc["format"], qc["bits"], qc["group_size"], qc["mode"], qc["desc_act"]) == (
        cfg.fmt, cfg.bits, cfg.group_size, cfg.mode, cfg.desc_act)
    assert sorted(qc["quantized_modules"]) == sorted(quantized["fake"])
    assert not os.path.exists(os.path.join(quantized["out"], "quantize_config.json"))


def test_config_round_trip(quantized):
    cfg = quantized["cfg"]
    back = A.AFPQQuantizeConfig.from_pretrained(quantized["out"])
    for f in ("bits", "group_size", "desc_act", "static_groups", "sym", "true_sequential", "damp_percent",
              "fmt", "mode", "scale_dtype"):
        assert getattr(back, f) == getattr(cfg, f), f
    assert quantized["reloaded"].quantize_config.fmt == cfg.fmt


def test_reloaded_weights_equal_gptq_fake_quant(quantized):
    rl = quantized["reloaded"].model
    for name, w in quantized["fake"].items():
        layer = rl.get_submodule(name)
        assert isinstance(layer, AFPQLinear), name
        got = layer.dequantize(w.dtype)
        assert torch.equal(got, w), f"{name}: {int((got != w).sum())} weights differ"


def test_act_order_g_idx(quantized):
    rl = quantized["reloaded"].model
    cfg = quantized["cfg"]
    layers = [rl.get_submodule(n) for n in quantized["fake"]]
    permuted = [not m.has_default_order() for m in layers]
    if cfg.desc_act and cfg.group_size != -1 and not cfg.static_groups:
        assert any(permuted)  # act-order reorders the groups of some layer
    elif not cfg.desc_act or cfg.group_size == -1:
        assert not any(permuted)


def test_layer_outputs_match_float64_reference(quantized):
    rl = quantized["reloaded"].model
    torch.manual_seed(1)
    for name, w in quantized["fake"].items():
        layer = rl.get_submodule(name)
        x = torch.randn(5, layer.in_features).to(w.dtype)
        y = layer(x)
        assert y.dtype == x.dtype
        # The grid values times the stored scales, exact in float32 (for a float16
        # model GPTQ's weight is this rounded to float16, checked above).
        wq = layer.dequantize(torch.float32)
        assert torch.equal(wq.to(w.dtype), w)
        xd, wd = x.double(), wq.double()
        bd = layer.bias.double() if layer.bias is not None else torch.zeros(layer.out_features, dtype=torch.float64)
        ref = xd @ wd.t() + bd
        mag = xd.abs() @ wd.abs().t() + bd.abs()
        eps_out = 2.0**-11 if w.dtype == torch.float16 else 0.0
        bound = eps_out * ref.abs() + 8 * layer.in_features * 2.0**-24 * mag
        err = (y.double() - ref).abs()
        assert bool((err <= bound).all()), f"{name}: max excess {(err - bound).max().item():.3g}"


def test_forward_and_generate(quantized, folders):
    x = torch.tensor([[5, 6, 7, 8, 9, 10]])
    with torch.no_grad():
        a = quantized["model"].model(x).logits
        b = quantized["reloaded"].model(x).logits
    assert torch.isfinite(b).all()
    assert torch.equal(a, b)
    model = quantized["reloaded"]
    # fp16 too: stock AutoGPTQ's generate() autocasts to bfloat16 on CPU and fails there;
    # the AFPQ loader's wrapper generates without CPU autocast (compat.generate_without_cpu_autocast)
    kw = dict(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=4, do_sample=False)
    out = model.generate(**kw)
    assert out.shape == (1, x.shape[1] + 4)
    with torch.no_grad():
        assert torch.equal(out, model.model.generate(**kw))  # the same as transformers' own generate
    if quantized["dtype"] == torch.float16:
        from auto_gptq.modeling._base import BaseGPTQForCausalLM

        with pytest.raises(RuntimeError):  # why the shim exists: upstream's method on this model
            BaseGPTQForCausalLM.generate(model, **kw)


def test_project_loader_reads_gptq_checkpoint(quantized):
    """``afpq_plugins.model.load_quantized`` (what ``afpq eval`` uses) reads the adapter's
    checkpoints, nn.Linear (Llama) and transformers Conv1D (GPT-2) alike."""
    from afpq_plugins.model import load_quantized

    m = load_quantized(quantized["out"])
    x = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        assert torch.equal(m(x).logits, quantized["reloaded"].model(x).logits)


def test_hooks_are_scoped(quantized):
    from auto_gptq.modeling import _base, _utils
    from auto_gptq.quantization.gptq import GPTQ
    from auto_gptq.utils.import_utils import dynamically_import_QuantLinear

    assert _base.GPTQ is GPTQ
    assert _utils.dynamically_import_QuantLinear is dynamically_import_QuantLinear
    assert _base.CUDA_0 == torch.device("cuda:0")
    assert "synchronize" not in torch.cuda.__dict__ or torch.cuda.synchronize.__module__ == "torch.cuda"
    assert torch.cuda.is_available.__module__ == "torch.cuda"
