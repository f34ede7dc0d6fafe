"""Validate, then mutate: the legacy adapters' own conversions leave the model as it was on a bad layer.

* AutoGPTQ 0.7.1: ``pack_model`` (inside :func:`afpq_plugins.autogptq.afpq_hooks`) turns
  GPTQ's per-layer results into AFPQ layers for the whole model at once. A result that does
  not fit (NaN scale, wrong scale shape, ``g_idx`` out of range, a group size that does not
  divide the layer) in a layer in the middle of the model raises ``EngineResultError``
  naming that layer, and every module of the model is unchanged (types and state dict
  compared before and after). Upstream's own ``pack_model`` replaces every Linear by an
  empty ``QuantLinear`` first, so there a failure left a half-built model.
* The happy path packs exactly what the RTN path packs from the same fake-quantized weight
  and parameters (independent reference: ``AFPQLinear.from_quantized`` of core's
  ``quantize_weight``).
* End to end: ``AutoGPTQForCausalLM.quantize`` whose GPTQ returns a NaN scale for one layer
  raises the named error and leaves no AFPQ module in the model.
* AutoAWQ 0.2.9: ``AFPQAwqQuantizer._apply_quant`` (one decoder layer's Linears) with a
  non-finite weight in its middle Linear raises naming it; no Linear of the layer is replaced.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from _tiny import TEXT, tiny_llama, tiny_llama_folder, tiny_tokenizer

with warnings.catch_warnings(record=True):
    auto_gptq = pytest.importorskip("auto_gptq")
    import afpq_plugins.autogptq as A
    from auto_gptq.modeling import _base
    from auto_gptq.modeling._utils import find_layers

from afpq_plugins.core.errors import EngineResultError
from afpq_plugins.core.quantize import quantize_weight
from afpq_plugins.nn import AFPQLinear

FMT, BITS, GS = "nf4", 4, 32
MIDDLE = "model.layers.1.self_attn.k_proj"


def _snapshot(model):
    return ({n: type(m) for n, m in model.named_modules()},
            {k: v.detach().clone() for k, v in model.state_dict().items()})


def _assert_unchanged(model, snap):
    types, sd = snap
    assert {n: type(m) for n, m in model.named_modules()} == types
    now = model.state_dict()
    assert set(now) == set(sd)
    for k, v in sd.items():
        assert now[k].dtype == v.dtype and torch.equal(now[k], v), k


def _engine_results(model, cfg):
    """What AutoGPTQ's quantize hands pack_model: each layer's weight replaced by its
    fake-quantized value, and ``{name: (quantizer, scale [out, groups], zero, g_idx)}``.
    Also ``{name: reference AFPQLinear}`` built independently from the same QuantizedWeight."""
    quantizers, refs = {}, {}
    for name, lin in find_layers(model).items():
        if name == "lm_head":
            continue
        qw = quantize_weight(lin.weight.data, FMT, GS, cfg.mode, cfg.torch_scale_dtype, name=name)
        with torch.no_grad():
            lin.weight.copy_(qw.dequantize(lin.weight.dtype))
        quantizers[name] = (None, qw.scales.t().float(), qw.scales2.t().float(), qw.g_idx.clone())
        refs[name] = AFPQLinear.from_quantized(qw, lin.bias, "gptq", name=name)
    return quantizers, refs


def _pack(model, quantizers, cfg):
    with A.afpq_hooks(cfg):
        _base.pack_model(model=model, quantizers=quantizers, bits=BITS, group_size=GS, use_triton=False,
                         desc_act=False, force_layer_back_to_cpu=True)


@pytest.fixture
def setup():
    cfg = A.AFPQQuantizeConfig(bits=BITS, fmt=FMT, group_size=GS, desc_act=False)
    model = tiny_llama(tie=False)
    quantizers, refs = _engine_results(model, cfg)
    return cfg, model, quantizers, refs


def test_pack_model_packs_what_rtn_packs(setup):
    cfg, model, quantizers, refs = setup
    _pack(model, quantizers, cfg)
    for name, ref in refs.items():
        got = model.get_submodule(name)
        assert isinstance(got, A.AFPQQuantLinear) and got.pack_mismatches == 0, name
        want = ref.state_dict()
        have = got.state_dict()
        for k, v in want.items():
            assert torch.equal(have[k], v), f"{name}.{k}"
    assert isinstance(model.lm_head, nn.Linear)


def _nan_scale(q):
    q, s, z, g = q
    s = s.clone()
    s[3, 0] = float("nan")
    return (q, s, z, g)


def _wrong_shape(q):
    q, s, z, g = q
    return (q, s[:, :1].clone(), z, g)


def _bad_g_idx(q):
    q, s, z, g = q
    g = g.clone()
    g[5] = s.shape[1]
    return (q, s, z, g)


def _negative_zero(q):
    q, s, z, g = q
    return (q, s, -z.clone(), g)


@pytest.mark.parametrize("corrupt,words", [
    (_nan_scale, "scale holds 1 non-finite"), (_wrong_shape, "scale has shape"),
    (_bad_g_idx, "g_idx holds group indices outside"), (_negative_zero, "zero holds"),
], ids=["nan-scale", "scale-shape", "g_idx-range", "negative-s_neg"])
def test_bad_middle_layer_leaves_model_unchanged(setup, corrupt, words):
    cfg, model, quantizers, _ = setup
    assert list(quantizers).index(MIDDLE) not in (0, len(quantizers) - 1)
    quantizers[MIDDLE] = corrupt(quantizers[MIDDLE])
    snap = _snapshot(model)
    before = dict(quantizers)
    with pytest.raises(EngineResultError, match=rf"{MIDDLE}: {words}"):
        _pack(model, quantizers, cfg)
    _assert_unchanged(model, snap)
    assert quantizers == before  # upstream's bookkeeping untouched too


def test_group_size_not_dividing_middle_layer(setup):
    cfg, model, quantizers, _ = setup
    odd = nn.Linear(40, 64, bias=False)  # 40 input columns: group size 32 does not divide them
    model.model.layers[1].self_attn.k_proj = odd
    quantizers[MIDDLE] = (None, torch.ones(64, 1), torch.ones(64, 1), torch.zeros(40, dtype=torch.int32))
    snap = _snapshot(model)
    with pytest.raises(EngineResultError, match=rf"{MIDDLE}: .*group_size 32 must be -1 or a positive divisor of in_features 40"):
        _pack(model, quantizers, cfg)
    _assert_unchanged(model, snap)


def test_quantize_end_to_end_bad_layer_is_named(tmp_path, monkeypatch):
    """AutoGPTQ's own quantize loop: the third layer's GPTQ hands back a NaN scale."""
    from auto_gptq import AutoGPTQForCausalLM

    from afpq_plugins.autogptq.quantizer import AFPQGPTQ

    path = tiny_llama_folder(str(tmp_path / "m"))
    cfg = A.AFPQQuantizeConfig(bits=BITS, fmt=FMT, group_size=GS, desc_act=False)
    model = AutoGPTQForCausalLM.from_pretrained(path, cfg, torch_dtype=torch.float32)
    tok = tiny_tokenizer()
    ids = tok(TEXT, return_tensors="pt").input_ids[0]
    examples = A.examples_from_ids([ids[i:i + 32] for i in range(0, 2 * 32, 32)])
    calls = []
    orig = AFPQGPTQ.fasterquant

    def fasterquant(self, *args, **kwargs):
        scale, zero, g_idx = orig(self, *args, **kwargs)
        calls.append(self.layer)
        if len(calls) == 3:
            scale = scale.clone()
            scale[0, 0] = float("nan")
        return scale, zero, g_idx

    monkeypatch.setattr(AFPQGPTQ, "fasterquant", fasterquant)
    with pytest.raises(EngineResultError, match="non-finite") as exc:
        model.quantize(examples)
    bad = next(n for n, m in model.model.named_modules() if m is calls[2])
    assert str(exc.value).startswith(f"{bad}: scale")
    assert not any(isinstance(m, AFPQLinear) for m in model.model.modules())
    assert all(isinstance(m, nn.Linear) for n, m in find_layers(model.model).items())
    assert not model.quantized


def test_awq_apply_quant_bad_middle_linear():
    awq = pytest.importorskip("awq")  # noqa: F841
    from afpq_plugins.autoawq import AFPQAwqQuantizer

    model = tiny_llama(tie=False, hidden=128)
    from afpq_plugins.core.formats import get_format, resolve_mode

    q = AFPQAwqQuantizer.__new__(AFPQAwqQuantizer)  # only the state the conversion reads
    q.model, q.layout, q.scale_dtype = model, "awq", torch.float16
    q.fmt = get_format(FMT)
    q.mode = resolve_mode(q.fmt, None)
    q.group_size, q.search, q._output, q._layer_search, q.quantized_modules = GS, None, None, {}, []
    layer = model.model.layers[0]
    named = {n: m for n, m in layer.named_modules() if isinstance(m, nn.Linear)}
    names = list(named)
    middle = names[len(names) // 2]
    with torch.no_grad():
        named[middle].weight[1, 2] = float("inf")
    snap = _snapshot(model)
    with pytest.raises(ValueError, match=rf"model.layers.0.{middle}.weight: 1 non-finite"):
        q._apply_quant(layer, named)
    _assert_unchanged(model, snap)
    assert q.quantized_modules == []
    # the same layer without the bad value converts every Linear
    with torch.no_grad():
        named[middle].weight[1, 2] = 0.0
    q._apply_quant(layer, named)
    assert all(isinstance(layer.get_submodule(n), AFPQLinear) for n in names)
    assert q.quantized_modules == [f"model.layers.0.{n}" for n in names]
