"""AFPQLinear: packing a quantized weight, decoding it back, and the forward pass.

The forward reference is float64 ``x @ W_fq.T + b``; the act-order reference is a
float64 decode, written here from the grids in docs/format.md, of codes and scales
chosen by hand.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from afpq_plugins.core.quantize import QuantizedWeight, fake_quantize, quantize_weight
from afpq_plugins.core.formats import get_format
from afpq_plugins.nn import AFPQLinear

FP4_MAG = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
NF3 = [-1, -0.5350227355957031, -0.2469314038753510, 0, 0.1833375245332718, 0.3819939494132996, 0.6229856610298157, 1]
TABLES = {
    "fp4": FP4_MAG + [-m for m in FP4_MAG],
    "nf3": [float(v) for v in NF3],
    "int4": [float(i) for i in range(16)],
    "int3": [float(i) for i in range(8)],
}

CONFIGS = [
    # fmt, mode, group_size, layout
    ("nf4", "afpq", 32, "gptq"),
    ("fp4", "afpq", 16, "awq"),
    ("fp4", "sym", -1, "gptq"),
    ("nf3", "afpq", 32, "gptq"),
    ("fp3", "zp", 64, "gptq"),
    ("int4", "zp", 16, "gptq"),
    ("int4", "zp", 32, "awq"),
    ("int3", "zp", -1, "gptq"),
    ("int8", "zp", 32, "gptq"),
    ("int2", "zp", 16, "gptq"),
    ("nf4", "zp", 32, "awq"),
]


def _linear(in_f=64, out_f=48, bias=True, seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(in_f, out_f, bias=bias)
    with torch.no_grad():
        lin.weight.mul_(4.0).add_(0.01)
    return lin


@pytest.mark.parametrize("fmt,mode,gs,layout", CONFIGS)
def test_from_linear_dequantize_equals_fake_quantize(fmt, mode, gs, layout):
    lin = _linear()
    layer = AFPQLinear.from_linear(lin, fmt, gs, mode, layout)
    assert layer.layout == layout and layer.mode == mode and layer.bits == get_format(fmt).bits
    fq = fake_quantize(lin.weight.detach(), fmt, gs, mode)
    assert torch.equal(layer.dequantize(), fq)
    assert layer.dequantize().shape == (48, 64)
    qw = quantize_weight(lin.weight.detach(), fmt, gs, mode)
    assert torch.equal(layer.codes(), qw.codes)
    assert torch.equal(layer.scales, qw.scales)
    if mode == "sym":
        assert layer.second is None and not hasattr(layer, "scales_neg") and not hasattr(layer, "zeros")
    else:
        assert torch.equal(layer.second, qw.scales2)
    assert torch.equal(layer.bias, lin.bias.detach())


def _tol(dtype, k):
    """Per-element bound factor: output rounding of ``dtype`` plus fp32 accumulation over k terms."""
    out_eps = {torch.float32: 2**-24, torch.float16: 2**-11, torch.bfloat16: 2**-8}[dtype]
    return out_eps + k * 2**-23


@pytest.mark.parametrize("fmt,mode,gs,layout", CONFIGS[:6])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(5,), (2, 3), (1,)])
def test_forward_matches_float64_matmul(fmt, mode, gs, layout, dtype, shape):
    lin = _linear()
    layer = AFPQLinear.from_linear(lin, fmt, gs, mode, layout)
    w_fq = fake_quantize(lin.weight.detach(), fmt, gs, mode).double()
    torch.manual_seed(1)
    x = torch.randn(*shape, 64).to(dtype)
    y = layer(x)
    assert y.dtype == dtype and y.shape == (*shape, 48)
    x64 = x.double()
    ref = x64 @ w_fq.T + lin.bias.detach().double()
    bound = (x64.abs() @ w_fq.abs().T + lin.bias.detach().double().abs()) * _tol(dtype, 64)
    err = (y.double() - ref).abs()
    assert (err <= bound + 1e-30).all(), f"max err {err.max().item():.3g}, bound {bound.max().item():.3g}"


def test_forward_without_bias_and_half_bias():
    lin = _linear(bias=False)
    layer = AFPQLinear.from_linear(lin, "nf4", 32)
    assert layer.bias is None
    x = torch.randn(3, 64)
    ref = x.double() @ layer.dequantize().double().T
    torch.testing.assert_close(layer(x).double(), ref, rtol=1e-5, atol=1e-5)
    lin16 = _linear().half()
    layer16 = AFPQLinear.from_linear(lin16, "fp4", 32)
    assert layer16.bias.dtype == torch.float16  # the bias keeps the model's dtype
    y = layer16(x.half())
    assert y.dtype == torch.float16
    ref = x.half().double() @ layer16.dequantize().double().T + lin16.bias.double()
    torch.testing.assert_close(y.double(), ref, rtol=2e-3, atol=2e-3)


def test_forward_rejects_wrong_feature_count():
    layer = AFPQLinear.from_linear(_linear(), "nf4", 32)
    with pytest.raises(ValueError, match="63 features.*64"):
        layer(torch.randn(2, 63))


# -- act-order ---------------------------------------------------------------------------------------------
def _decode64(fmt, mode, codes, scales, scales2, g_idx):
    """float64 decode of [out, in] codes with [groups, out] parameters and g_idx."""
    tbl = np.array(TABLES[fmt], dtype=np.float64)
    codes = codes.numpy().astype(np.int64)
    s1 = scales.double().numpy()[g_idx.numpy()].T  # [out, in]
    s2 = None if scales2 is None else scales2.double().numpy()[g_idx.numpy()].T
    if mode == "afpq":
        v = tbl[codes]
        return np.where(v > 0, v * s1, v * s2)
    if mode == "sym":
        return tbl[codes] * s1
    return (tbl[codes] - tbl.min() - s2) * s1


def _act_order_weight(fmt, mode, seed=0):
    out_f, in_f, gs = 8, 64, 16
    g = np.random.default_rng(seed)
    bits = get_format(fmt).bits
    codes = torch.from_numpy(g.integers(0, 2**bits, (out_f, in_f))).to(torch.uint8)
    g_idx = torch.from_numpy(g.permutation(np.arange(in_f) // gs)).to(torch.int32)  # 16 columns per group, shuffled
    assert not torch.equal(g_idx, torch.arange(in_f, dtype=torch.int32) // gs)
    scales = torch.from_numpy(0.25 + 0.125 * g.integers(1, 20, (in_f // gs, out_f))).half()
    if mode == "afpq":
        scales2 = torch.from_numpy(0.125 * g.integers(1, 20, (in_f // gs, out_f))).half()
    elif mode == "zp":
        scales2 = torch.from_numpy(g.integers(0, 2**bits, (in_f // gs, out_f)).astype(np.float64)).half()
    else:
        scales2 = None
    qw = QuantizedWeight(codes, scales, scales2, g_idx, get_format(fmt), mode, gs)
    return qw, _decode64(fmt, mode, codes, scales, scales2, g_idx)


@pytest.mark.parametrize("fmt,mode", [("fp4", "afpq"), ("nf3", "afpq"), ("fp4", "sym"), ("int4", "zp"), ("int3", "zp"), ("nf3", "zp")])
def test_act_order_g_idx(fmt, mode):
    qw, ref = _act_order_weight(fmt, mode)
    # core decode honours g_idx
    np.testing.assert_allclose(qw.dequantize().double().numpy(), ref, rtol=2**-22, atol=1e-7)
    # and the packed layer too (dequantize and forward)
    bias = torch.linspace(-1, 1, 8)
    layer = AFPQLinear.from_quantized(qw, bias=bias, layout="gptq")
    assert torch.equal(layer.g_idx, qw.g_idx)
    assert not layer.has_default_order()
    np.testing.assert_allclose(layer.dequantize().double().numpy(), ref, rtol=2**-22, atol=1e-7)
    x = torch.randn(3, 64)
    y = layer(x).double()
    expect = x.double() @ torch.from_numpy(ref).T + bias.double()
    bound = (x.double().abs() @ torch.from_numpy(np.abs(ref)).T + 1) * _tol(torch.float32, 64)
    assert ((y - expect).abs() <= bound).all()


def test_awq_layout_rejects_act_order():
    qw, _ = _act_order_weight("fp4", "afpq")
    with pytest.raises(ValueError) as exc:
        AFPQLinear.from_quantized(qw, layout="awq", name="blocks.0.q")
    msg = str(exc.value)
    assert "blocks.0.q" in msg and "g_idx" in msg and "gptq" in msg
    # The default order is fine in awq.
    qw.g_idx = torch.arange(64, dtype=torch.int32) // 16
    layer = AFPQLinear.from_quantized(qw, layout="awq")
    assert layer.g_idx is None and layer.has_default_order()


# -- buffers, memory ---------------------------------------------------------------------------------------
def test_bits_per_weight_4bit_g128_fp16():
    """qweight + scales + scales_neg = 4 + 2 * 16 / 128 = 4.25 bits per weight (notes, "Storage")."""
    in_f, out_f = 512, 256
    layer = AFPQLinear(in_f, out_f, bias=False, fmt="fp4", group_size=128, mode="afpq")
    bits = sum(getattr(layer, n).numel() * getattr(layer, n).element_size() * 8 for n in ("qweight", "scales", "scales_neg"))
    assert bits / (in_f * out_f) == 4.25
    assert layer.scales.dtype == layer.scales_neg.dtype == torch.float16
    assert layer.qweight.dtype == torch.int32 and layer.qweight.shape == (in_f * 4 // 32, out_f)
    assert layer.g_idx.shape == (in_f,) and layer.g_idx.dtype == torch.int32
    awq = AFPQLinear(in_f, out_f, bias=False, fmt="nf4", group_size=128, mode="afpq", layout="awq")
    bits = sum(getattr(awq, n).numel() * getattr(awq, n).element_size() * 8 for n in ("qweight", "scales", "scales_neg"))
    assert bits / (in_f * out_f) == 4.25 and awq.qweight.shape == (in_f, out_f // 8)


@pytest.mark.parametrize("mode,second", [("afpq", "scales_neg"), ("zp", "zeros"), ("sym", None)])
def test_buffers_per_mode(mode, second):
    layer = AFPQLinear(64, 16, bias=True, fmt="nf3", group_size=32, mode=mode)
    names = dict(layer.named_buffers())
    expect = {"qweight", "scales", "g_idx", "bias"} | ({second} if second else set())
    assert set(names) == expect
    assert names["qweight"].shape == (64 * 3 // 32, 16)
    assert names["scales"].shape == (2, 16)
    assert set(layer.state_dict()) == expect


def test_constructor_errors():
    with pytest.raises(ValueError, match="group_size"):
        AFPQLinear(64, 16, fmt="nf4", group_size=48)
    with pytest.raises(ValueError, match="awq"):
        AFPQLinear(64, 12, fmt="nf4", group_size=32, layout="awq")
    with pytest.raises(ValueError, match="awq"):
        AFPQLinear(64, 16, fmt="nf3", group_size=32, layout="awq")
    with pytest.raises(ValueError, match="multiple of 32"):
        AFPQLinear(48, 16, fmt="nf3", group_size=16)
    with pytest.raises(ValueError, match="does not support mode"):
        AFPQLinear(64, 16, fmt="int4", mode="afpq", group_size=32)
    with pytest.raises(ValueError, match="layout"):
        AFPQLinear(64, 16, fmt="nf4", group_size=32, layout="marlin")


def test_state_dict_round_trip_into_fresh_layer():
    lin = _linear()
    layer = AFPQLinear.from_linear(lin, "nf4", 32, "afpq", "gptq")
    fresh = AFPQLinear(64, 48, bias=True, fmt="nf4", group_size=32, mode="afpq", bias_dtype=torch.float32)
    fresh.load_state_dict(layer.state_dict())
    assert torch.equal(fresh.dequantize(), fake_quantize(lin.weight.detach(), "nf4", 32, "afpq"))
    x = torch.randn(2, 64)
    assert torch.equal(fresh(x), layer(x))
