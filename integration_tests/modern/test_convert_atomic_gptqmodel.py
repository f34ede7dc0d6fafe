"""GPTQModel 7.6: the processors' conversion (``submodule_finalize`` / ``pack_module`` ->
``_pack``) checks the engine's result before it replaces the module.

GPTQModel finalizes one module per task (worker threads, then an optional disk offload of
that module), so the conversion's unit is one module: a bad result (NaN scale, wrong
shape, ``g_idx`` out of range) raises ``EngineResultError`` naming the module and no
module of the model changes (types and state dict compared). A good result packs what
the RTN path packs from the same parameters (independent reference:
``AFPQLinear.from_quantized`` of core's ``quantize_weight``).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

pytest.importorskip("gptqmodel")

from _tiny import tiny_llama  # noqa: E402

from afpq_plugins.core.errors import EngineResultError  # noqa: E402
from afpq_plugins.core.quantize import quantize_weight  # noqa: E402
from afpq_plugins.core.spec import QuantSpec  # noqa: E402
from afpq_plugins.gptqmodel.processors import _pack, gptq_processor_class  # noqa: E402
from afpq_plugins.nn import AFPQLinear  # noqa: E402

NAME = "model.layers.1.self_attn.k_proj"


def _snapshot(model):
    return ({n: type(m) for n, m in model.named_modules()},
            {k: v.detach().clone() for k, v in model.state_dict().items()})


def _result(lin, spec):
    qw = quantize_weight(lin.weight.data, spec.fmt, spec.group_size, spec.mode, spec.torch_scale_dtype, name=NAME)
    with torch.no_grad():
        lin.weight.copy_(qw.dequantize(lin.weight.dtype))  # GPTQ leaves its fake-quantized weight
    return qw, qw.scales.t().float(), qw.scales2.t().float(), qw.g_idx.clone()


@pytest.mark.parametrize("bad", ["nan", "shape", "g_idx"])
def test_bad_result_named_and_model_unchanged(bad):
    spec = QuantSpec("nf4", 32).resolved("gptq")
    cls = gptq_processor_class(spec)
    model = tiny_llama(tie=False)
    lin = model.get_submodule(NAME)
    _, p1, p2, g_idx = _result(lin, spec)
    if bad == "nan":
        p1[2, 1] = float("nan")
    elif bad == "shape":
        p2 = p2[:, :1]
    else:
        g_idx[0] = -1
    snap = _snapshot(model)
    with pytest.raises(EngineResultError, match=rf"^{NAME}: "):
        _pack(cls, model, SimpleNamespace(module=lin, full_name=NAME), p1, p2, g_idx)
    types, sd = snap
    assert {n: type(m) for n, m in model.named_modules()} == types
    for k, v in model.state_dict().items():
        assert torch.equal(v, sd[k]), k
    assert cls.quantized_modules == []


def test_good_result_packs_like_rtn():
    spec = QuantSpec("nf4", 32).resolved("gptq")
    cls = gptq_processor_class(spec)
    model = tiny_llama(tie=False)
    lin = model.get_submodule(NAME)
    qw, p1, p2, g_idx = _result(lin, spec)
    _pack(cls, model, SimpleNamespace(module=lin, full_name=NAME), p1, p2, g_idx)
    got = model.get_submodule(NAME)
    ref = AFPQLinear.from_quantized(qw, None, spec.resolved().layout, name=NAME)
    assert isinstance(got, AFPQLinear) and cls.quantized_modules == [NAME] and cls.mismatches == 0
    for k, v in ref.state_dict().items():
        assert torch.equal(got.state_dict()[k], v), k
    assert isinstance(model.get_submodule("model.layers.1.self_attn.q_proj"), nn.Linear)
