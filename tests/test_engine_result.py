"""``check_engine_result``: an engine's per-layer result is checked before any AFPQ layer is built.

Each bad case (shapes, non-finite or negative parameters, ``g_idx`` out of range or not an
integer tensor, a group size that does not divide the layer, a non-finite weight) is an
``EngineResultError`` naming the layer and the tensor, raised by ``quantized_from_engine``
too (every adapter's conversion goes through it). A good result, taken from core's
``quantize_weight`` (the independent reference), passes and re-encodes to the same codes.
"""

from __future__ import annotations

import pytest
import torch

from afpq_plugins.core.errors import EngineResultError
from afpq_plugins.core.quantize import quantize_weight
from afpq_plugins.core.spec import QuantSpec
from afpq_plugins.nn.convert import check_engine_result, quantized_from_engine

NAME = "model.layers.3.mlp.up_proj"


def _result(mode="afpq", gs=32, out_f=16, in_f=64):
    spec = QuantSpec("nf4", gs, mode)
    torch.manual_seed(0)
    w = torch.randn(out_f, in_f)
    qw = quantize_weight(w, "nf4", gs, spec.mode, torch.float16, name=NAME)
    p2 = qw.scales2 if qw.scales2 is not None else qw.scales
    return spec, qw, qw.dequantize(), qw.scales.t().float(), p2.t().float(), qw.g_idx.clone()


@pytest.mark.parametrize("mode", ["afpq", "sym", "zp"])
def test_good_result_passes_and_reencodes(mode):
    spec, qw, W, s, z, g = _result(mode)
    check_engine_result(spec, W, s, z, g, NAME)
    check_engine_result(spec, W, s, z, None, NAME)
    got, mismatches = quantized_from_engine(spec, W, s, z, g, NAME)
    assert mismatches == 0 and torch.equal(got.codes, qw.codes)


def _cases():
    def nan_scale(W, s, z, g):
        s[1, 0] = float("nan")
        return W, s, z, g

    def inf_weight(W, s, z, g):
        W[0, 0] = float("inf")
        return W, s, z, g

    def neg_scale(W, s, z, g):
        s[0, 1] = -0.5
        return W, s, z, g

    def neg_sneg(W, s, z, g):
        z[0, 1] = -0.5
        return W, s, z, g

    return [
        (nan_scale, "scale holds 1 non-finite value"),
        (inf_weight, "weight holds 1 non-finite value"),
        (neg_scale, "scale holds 1 negative scale"),
        (neg_sneg, "zero holds 1 negative scale"),
        (lambda W, s, z, g: (W, s.t().contiguous(), z, g), r"scale has shape \(2, 16\), expected \(16, 2\)"),
        (lambda W, s, z, g: (W, s, z[:, :1], g), r"zero has shape \(16, 1\)"),
        (lambda W, s, z, g: (W, s, z, g[:10]), r"g_idx has shape \(10,\), expected \(64,\)"),
        (lambda W, s, z, g: (W, s, z, g.float()), "g_idx is torch.float32"),
        (lambda W, s, z, g: (W, s, z, g + 1), r"g_idx holds group indices outside \[0, 2\)"),
        (lambda W, s, z, g: (W[None], s, z, g), "weight has shape"),
    ]


@pytest.mark.parametrize("corrupt,words", _cases())
def test_bad_result_is_named(corrupt, words):
    spec, _, W, s, z, g = _result()
    W, s, z, g = corrupt(W.clone(), s.clone(), z.clone(), g.clone())
    with pytest.raises(EngineResultError, match=rf"^{NAME}: {words}"):
        check_engine_result(spec, W, s, z, g, NAME)
    with pytest.raises(EngineResultError, match=rf"^{NAME}: "):
        quantized_from_engine(spec, W, s, z, g, NAME)


def test_zero_point_may_be_any_finite_value_in_zp_mode():
    spec, _, W, s, z, g = _result("zp")
    z = z - 100.0  # a zero-point, not a scale: only finiteness is required
    check_engine_result(spec, W, s, z, g, NAME)
    z[0, 0] = float("nan")
    with pytest.raises(EngineResultError, match="zero holds 1 non-finite"):
        check_engine_result(spec, W, s, z, g, NAME)


def test_group_size_not_dividing():
    spec = QuantSpec("nf4", 48)
    W = torch.zeros(16, 64)
    with pytest.raises(EngineResultError, match=rf"^{NAME}: group_size 48 must be -1 or a positive divisor"):
        check_engine_result(spec, W, torch.ones(16, 1), torch.ones(16, 1), None, NAME)
