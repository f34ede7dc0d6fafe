"""GPTQModel 7.6: the processors' conversion checks the engine's result before any module changes.

gptqmodel ends the interpreter (``os._exit(1)``) on an exception in its worker threads, where
processing and finalizing (the module swap) run, so the AFPQ processors record the first bad
result (NaN scale, wrong shape, ``g_idx`` out of range: ``EngineResultError`` naming the
module), swap nothing after it, and the error is raised in the caller's thread when gptqmodel
returns. GPTQ results are checked when GPTQ computes them, before gptqmodel finalizes any
module of that decoder layer: a whole run with a bad result in layer 1 raises, layer 1 keeps
all its Linears (layer 0 was finalized before layer 1 ran: gptqmodel's unit is the layer).
The conversion of one module (``_pack``) leaves the model unchanged on a bad result (types and
state dict compared); a good result packs what the RTN path packs from the same parameters
(independent reference: ``AFPQLinear.from_quantized`` of core's ``quantize_weight``).
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
    _pack(cls, model, SimpleNamespace(module=lin, full_name=NAME), p1, p2, g_idx)  # in a worker thread
    assert isinstance(cls.error, EngineResultError) and str(cls.error).startswith(f"{NAME}: ")
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


def test_gptq_run_stops_before_the_bad_layer_changes(tmp_path, monkeypatch):
    """A whole GPTQModel GPTQ run whose result for layer 1's k_proj has a NaN scale: the
    processor checks each result when GPTQ computes it, before gptqmodel finalizes (swaps) any
    module of that decoder layer: the error names the module and layer 1 keeps its Linears."""
    from gptqmodel.quantization import gptq as upstream

    from _tiny import TEXT, tiny_tokenizer
    from afpq_plugins.methods import Calibration, FormatSpec, quantize

    tok = tiny_tokenizer()
    model = tiny_llama(vocab_size=len(tok), tie=False)
    seen = []
    orig = upstream.GPTQ.quantize

    def bad_quantize(self, *args, **kwargs):
        res = list(orig(self, *args, **kwargs))
        seen.append(self.name)
        if str(self.name).endswith("k_proj") and sum(str(n).endswith("k_proj") for n in seen) == 2:
            res[1] = res[1].clone()
            res[1].view(-1)[0] = float("nan")
        return tuple(res)

    monkeypatch.setattr(upstream.GPTQ, "quantize", bad_quantize)
    with pytest.raises(EngineResultError, match=rf"^{NAME}: scale holds 1 non-finite"):
        quantize(model, tok, "gptq", FormatSpec("nf4", 32), Calibration(nsamples=4, seqlen=48),
                 backend="gptqmodel", progress=False)
    # layer 0 was finalized before layer 1 ran (gptqmodel's unit); nothing of layer 1 changed
    assert all(isinstance(m, AFPQLinear) for n, m in model.model.layers[0].named_modules()
               if n.endswith("_proj"))
    assert not any(isinstance(m, AFPQLinear) for m in model.model.layers[1].modules())
    assert TEXT  # the calibration text the methods registry draws from
