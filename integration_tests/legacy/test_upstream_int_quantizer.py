"""Our INT ``zp`` mode vs AutoGPTQ 0.7.1's own ``Quantizer``, bit for bit (CPU only).

Upstream code called: ``auto_gptq.quantization.quantizer.Quantizer`` with
``configure(bits, perchannel=True, sym=False, mse=False)``, ``find_params(x,
weight=True)`` and ``quantize(x)``, applied group by group to ``W[:, i:i + group_size]``
exactly as ``GPTQ.fasterquant`` does (its round-to-nearest part; the Hessian update is
not ours to compare).

What is compared:

* ``find_params`` / ``encode`` / ``decode`` on GPTQ's ``[out, group]`` slices: scale and
  zero-point bitwise equal to ``Quantizer.scale`` / ``.zero``, and ``decode(encode(x))``
  bitwise equal to ``Quantizer.quantize(x)``.
* ``fake_quantize`` / ``quantize_weight`` with ``scale_dtype=torch.float32``: bitwise
  equal to the upstream fake-quantized weight (fp32 and fp16 weights).
* The default ``scale_dtype=torch.float16`` rounds each scale to fp16 *before*
  encoding (so the fake-quantized weight equals what a checkpoint with fp16 scales
  decodes to). That is the only difference from AutoGPTQ, proven by bitwise equality
  with an upstream ``Quantizer`` whose ``scale`` is replaced by ``scale.half().float()``
  after ``find_params``; against the unmodified upstream the difference is bounded
  element-wise by ``s16 + maxq * |s16 - s|`` (at most one code step, plus the scale
  error times the code distance to the zero-point).

Bitwise means the float32 (or float16) bit patterns, so -0.0 vs 0.0 would fail,
with one documented exception, the zero-point of a group whose minimum is a signed
zero (``fold_zero``): AutoGPTQ computes ``xmin = torch.minimum(x.min(1)[0], zeros)``,
and torch's vectorised ``minimum`` returns +0.0 for ``minimum(-0.0, +0.0)`` (its
scalar path returns -0.0; on torch 2.13 x86 the vectorised path is taken from 16
rows on), so upstream's zero-point is ``round(-0.0 / s) = -0.0``
where ours (``amin().clamp(max=0)`` keeps -0.0) is +0.0. Both are the integer 0: the
fake-quantized weights stay bitwise equal, which the tests check, and the zero-points
are compared after ``+ 0.0`` (folding -0.0 into +0.0). ``test_signed_zero_group``
pins exactly this case.
"""

from __future__ import annotations

import pytest
import torch

from afpq_plugins.core.quantize import decode, encode, fake_quantize, find_params, quantize_weight

SHAPES = [(64, 576, 32), (48, 576, 64), (32, 576, -1), (16, 128, 128)]
SHAPE_IDS = [f"{o}x{i}-g{g}" for o, i, g in SHAPES]
BITS = [2, 3, 4, 8]


def bits_of(t: torch.Tensor) -> torch.Tensor:
    return t.view({torch.float32: torch.int32, torch.float16: torch.int16}[t.dtype])


def assert_bitwise(ours: torch.Tensor, theirs: torch.Tensor, what: str) -> None:
    assert ours.dtype == theirs.dtype, f"{what}: dtypes {ours.dtype} vs {theirs.dtype}"
    assert ours.shape == theirs.shape, f"{what}: shapes {tuple(ours.shape)} vs {tuple(theirs.shape)}"
    diff = (bits_of(ours) != bits_of(theirs)).nonzero()
    if len(diff):
        i = tuple(diff[0].tolist())
        raise AssertionError(
            f"{what}: {len(diff)} element(s) differ, first at {i}: ours {ours[i].item()!r} upstream {theirs[i].item()!r}"
        )


def make_weights(out_f, in_f, group_size, bits, seed, dtype=torch.float32):
    """Gaussian weights plus rows that hit every branch of the zp maths."""
    gen = torch.Generator().manual_seed(seed)
    maxq = (1 << bits) - 1
    gs = in_f if group_size == -1 else group_size
    w = torch.randn(out_f, in_f, generator=gen) * 0.02
    w[0] = 0.0  # all-zero groups: AutoGPTQ's [-1, 1] fallback
    w[1] = w[1].abs()  # all-positive: zero-point 0
    w[2] = -w[2].abs()  # all-negative: zero-point maxq
    w[3] = 0.01  # constant positive groups
    # Exact ties: per group xmin = -2u, xmax = (maxq - 2)u, so s = u and z = 2 exactly, and
    # (k + 0.5)u sits on a rounding midpoint (torch.round: half to even, both sides).
    u = 2.0**-7
    ties = torch.tensor([-2.0, maxq - 2.0] + [k + 0.5 for k in range(-2, maxq - 2)]) * u
    w[4] = ties.repeat(in_f // len(ties) + 1)[:gs].repeat(in_f // gs)
    w[5] = w[5].abs()
    w[5, ::3] = -0.0  # signed zeros in a positive group
    w[6, ::5] *= 40  # outliers
    return w.to(dtype)


def upstream_fake_quantize(quantizer_cls, w: torch.Tensor, bits: int, group_size: int, scale_dtype=None):
    """AutoGPTQ's per-group RTN: fake-quantized float32 weight, scales and zeros ``[out, groups]``."""
    w = w.float()  # GPTQ.fasterquant works on W.float()
    gs = w.shape[1] if group_size == -1 else group_size
    out = torch.empty_like(w)
    scales, zeros = [], []
    for i in range(0, w.shape[1], gs):
        q = quantizer_cls()
        q.configure(bits, perchannel=True, sym=False, mse=False)
        q.find_params(w[:, i:i + gs], weight=True)
        if scale_dtype is not None:
            q.scale = q.scale.to(scale_dtype).float()
        out[:, i:i + gs] = q.quantize(w[:, i:i + gs])
        scales.append(q.scale)
        zeros.append(q.zero)
    return out, torch.cat(scales, dim=1), torch.cat(zeros, dim=1)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("out_f,in_f,group_size", SHAPES, ids=SHAPE_IDS)
def test_primitives_match_quantizer(gptq_quantizer_cls, bits, out_f, in_f, group_size):
    """find_params / encode / decode on the same [out, group] slices GPTQ hands to Quantizer."""
    w = make_weights(out_f, in_f, group_size, bits, seed=bits * 100 + out_f)
    gs = in_f if group_size == -1 else group_size
    for i in range(0, in_f, gs):
        x = w[:, i:i + gs]
        q = gptq_quantizer_cls()
        q.configure(bits, perchannel=True, sym=False, mse=False)
        q.find_params(x, weight=True)
        s, z = find_params(x, f"int{bits}", "zp", dim=-1)
        assert_bitwise(s, q.scale, f"int{bits} scale, group {i // gs}")
        assert_bitwise(z + 0.0, q.zero + 0.0, f"int{bits} zero-point, group {i // gs}")  # see fold_zero
        codes = encode(x, f"int{bits}", "zp", s, z)
        assert codes.dtype == torch.uint8 and int(codes.max()) <= (1 << bits) - 1
        assert_bitwise(decode(codes, f"int{bits}", "zp", s, z), q.quantize(x), f"int{bits} fake-quant, group {i // gs}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("out_f,in_f,group_size", SHAPES, ids=SHAPE_IDS)
def test_fake_quantize_fp32_scales_matches_quantizer(gptq_quantizer_cls, bits, out_f, in_f, group_size, dtype):
    w = make_weights(out_f, in_f, group_size, bits, seed=bits * 10 + in_f, dtype=dtype)
    expected, scales, zeros = upstream_fake_quantize(gptq_quantizer_cls, w, bits, group_size)

    ours = fake_quantize(w, f"int{bits}", group_size, "zp", scale_dtype=torch.float32)
    assert_bitwise(ours, expected.to(dtype), f"int{bits} fake_quantize ({dtype})")

    qw = quantize_weight(w, f"int{bits}", group_size, "zp", scale_dtype=torch.float32)
    assert_bitwise(qw.scales, scales.t().contiguous(), f"int{bits} scales")
    assert_bitwise(qw.scales2 + 0.0, zeros.t() + 0.0, f"int{bits} zeros")  # see fold_zero
    assert_bitwise(qw.dequantize(torch.float32), expected, f"int{bits} dequantize")


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("out_f,in_f,group_size", SHAPES, ids=SHAPE_IDS)
def test_fake_quantize_fp16_scales_is_quantizer_with_fp16_scale(gptq_quantizer_cls, bits, out_f, in_f, group_size):
    w = make_weights(out_f, in_f, group_size, bits, seed=bits + in_f + out_f)
    ours = fake_quantize(w, f"int{bits}", group_size, "zp")  # default scale_dtype=float16

    # Exactly AutoGPTQ with its scale rounded to fp16 between find_params and quantize.
    expected16, s16, zeros = upstream_fake_quantize(gptq_quantizer_cls, w, bits, group_size, torch.float16)
    assert_bitwise(ours, expected16, f"int{bits} fake_quantize (fp16 scales)")
    qw = quantize_weight(w, f"int{bits}", group_size, "zp")
    assert_bitwise(qw.scales.float(), s16.t().contiguous(), f"int{bits} fp16 scales")
    assert_bitwise(qw.scales2.float() + 0.0, zeros.t() + 0.0, f"int{bits} zeros")  # see fold_zero

    # Against unmodified AutoGPTQ: |ours - theirs| <= s16 + maxq * |s16 - s| per element.
    expected, s, _ = upstream_fake_quantize(gptq_quantizer_cls, w, bits, group_size)
    gs = in_f if group_size == -1 else group_size
    s_el = s.repeat_interleave(gs, dim=1)
    s16_el = s16.repeat_interleave(gs, dim=1)
    bound = (s16_el + ((1 << bits) - 1) * (s16_el - s_el).abs()) * (1 + 2.0**-20)
    assert ((ours - expected).abs() <= bound).all()


def test_signed_zero_group(gptq_quantizer_cls):
    """fold_zero: a positive group containing -0.0 (see the module docstring)."""
    x = torch.tensor([[-0.0, 0.5, 0.25, -0.0, 0.125, 0.0, 1.0, 0.75]]).repeat(32, 1)  # >= 16 rows
    q = gptq_quantizer_cls()
    q.configure(4, perchannel=True, sym=False, mse=False)
    q.find_params(x, weight=True)
    s, z = find_params(x, "int4", "zp", dim=-1)
    assert_bitwise(s, q.scale, "scale")
    assert torch.equal(z, q.zero) and (z == 0).all()  # the same integer 0 ...
    assert not torch.signbit(z).any()  # ... ours +0.0; upstream's sign depends on torch's SIMD path
    fq = decode(encode(x, "int4", "zp", s, z), "int4", "zp", s, z)
    assert_bitwise(fq, q.quantize(x), "fake-quant")
    assert_bitwise(fake_quantize(x, "int4", -1, "zp", scale_dtype=torch.float32), q.quantize(x), "fake_quantize")
