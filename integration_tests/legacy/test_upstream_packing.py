"""Our vectorised packers vs the real upstream packers, bit for bit (CPU only).

Upstream code called:

* AutoGPTQ 0.7.1 ``QuantLinear.pack(linear, scales, zeros, g_idx)`` of
  ``qlinear_cuda_old`` / ``qlinear_cuda`` (2, 3, 4, 8 bits), ``qlinear_triton``
  (2, 4, 8) and ``qlinear_exllama`` (4): the v1 row layout ``qweight`` and ``qzeros``.
* AutoAWQ 0.2.9 ``WQLinear_GEMM.from_linear(linear, 4, group_size, init_only=False,
  scales=..., zeros=...)``, plus ``awq.utils.packing_utils.unpack_awq`` /
  ``reverse_awq_order`` / ``dequantize_gemm`` / ``unpack_reorder_pack``.

How the inputs are chosen. Both upstream packers do not take codes: they take a float
weight ``W`` and recompute ``intweight = round((W + zeros * scales) / scales)``. We
draw codes ``q``, zero-points ``z`` and power-of-two scales ``s`` and feed
``W = (q - z) * s``: every step (``q - z``, ``* s``, ``z * s``, ``+``, ``/ s``) is
exact in float32 and float16 for ``|q - z| <= 255``, so upstream's ``intweight`` is
exactly ``q``. Scales are ``[groups, out]`` in our convention; AutoGPTQ's ``pack``
takes ``[out, groups]`` (what its GPTQ loop ``torch.cat``s), AutoAWQ's ``from_linear``
takes ``[groups, out]``.
"""

from __future__ import annotations

import pytest
import torch

from afpq_plugins.core.packing import (
    pack_awq,
    pack_gptq,
    pack_gptq_zeros,
    unpack,
    unpack_awq,
    unpack_gptq,
    unpack_gptq_zeros,
    unpack_kn,
)
from afpq_plugins.core.quantize import default_g_idx, quantize_weight


def assert_bits_equal(ours: torch.Tensor, theirs: torch.Tensor, what: str) -> None:
    """Same dtype, same shape, same bits; on failure say where."""
    assert theirs.dtype == ours.dtype == torch.int32, f"{what}: dtypes {ours.dtype} vs {theirs.dtype}"
    assert ours.shape == theirs.shape, f"{what}: shapes {tuple(ours.shape)} vs {tuple(theirs.shape)}"
    diff = (ours != theirs).nonzero()
    if len(diff):
        r, c = diff[0].tolist()
        raise AssertionError(
            f"{what}: {len(diff)} word(s) differ, first at [{r}, {c}]: "
            f"ours {ours[r, c].item() & 0xFFFFFFFF:#010x} upstream {theirs[r, c].item() & 0xFFFFFFFF:#010x}"
        )


def make_case(out_f, in_f, group_size, bits, seed, *, zmin, g_idx=None, dtype=torch.float32):
    """Codes, zeros ``[groups, out]``, power-of-two scales ``[groups, out]``, ``W = (q - z) * s``."""
    gen = torch.Generator().manual_seed(seed)
    maxq = (1 << bits) - 1
    codes = torch.randint(0, maxq + 1, (out_f, in_f), generator=gen, dtype=torch.int64)
    codes[0] = maxq  # every slot full: sets bit 31 (negative int32 words), 3-bit spills
    codes[1] = 0
    codes[2, ::2] = maxq
    groups = 1 if group_size == -1 else in_f // group_size
    zeros = torch.randint(zmin, maxq + 1, (groups, out_f), generator=gen, dtype=torch.int64)
    scales = torch.pow(2.0, torch.randint(-3, 3, (groups, out_f), generator=gen).float())
    if g_idx is None:
        g_idx = default_g_idx(in_f, group_size)
    gi = g_idx.long()
    w = ((codes - zeros[gi].t()).float() * scales[gi].t()).to(dtype)
    # The premise of every test below: upstream's rounding recovers the codes exactly.
    assert torch.equal(torch.round((w.float() + (zeros * scales)[gi].t()) / scales[gi].t()), codes.float())
    linear = torch.nn.Linear(in_f, out_f, bias=False, dtype=dtype)
    linear.weight.data.copy_(w)
    return codes, zeros, scales, g_idx, linear


# (out, in, group_size): in = 576 is SmolLM2-135M's hidden size; out = 40 is not a
# multiple of 32 (AutoGPTQ's qzeros then drops the tail; see below).
GPTQ_SHAPES = [(64, 576, 32), (96, 576, 64), (32, 576, -1), (40, 576, 64), (256, 128, 32)]
GPTQ_IMPL_BITS = [
    ("cuda_old", 2), ("cuda_old", 3), ("cuda_old", 4), ("cuda_old", 8),
    ("cuda", 2), ("cuda", 3), ("cuda", 4), ("cuda", 8),
    ("triton", 2), ("triton", 4), ("triton", 8),
    ("exllama", 4),
]


def upstream_gptq_pack(cls, bits, group_size, linear, scales, zeros, g_idx):
    """AutoGPTQ's own pack. Its inputs are ``[out, groups]`` float scales and zeros
    (what ``GPTQ.fasterquant`` returns). Clones: with one group ``zeros.t().contiguous()``
    is a view, and ``pack`` then does ``zeros -= 1`` on the caller's tensor."""
    ql = cls(bits, group_size, linear.in_features, linear.out_features, False)
    ql.pack(linear, scales.t().clone(), zeros.t().float().clone(), g_idx.clone())
    return ql


# AutoGPTQ's triton and exllama QuantLinear refuse out_features % 32 != 0.
GPTQ_CASES = [
    pytest.param(impl, bits, *shape, id=f"{impl}-{bits}bit-{shape[0]}x{shape[1]}-g{shape[2]}")
    for impl, bits in GPTQ_IMPL_BITS
    for shape in GPTQ_SHAPES
    if impl in ("cuda_old", "cuda") or shape[0] % 32 == 0
]


@pytest.mark.parametrize("impl,bits,out_f,in_f,group_size", GPTQ_CASES)
def test_gptq_pack_matches_autogptq(gptq_quant_linears, impl, bits, out_f, in_f, group_size):
    cls, _ = gptq_quant_linears[impl]
    codes, zeros, scales, g_idx, linear = make_case(out_f, in_f, group_size, bits, seed=1000 * bits + out_f, zmin=1)
    ql = upstream_gptq_pack(cls, bits, group_size, linear, scales, zeros, g_idx)

    ours = pack_gptq(codes, bits)
    assert_bits_equal(ours, ql.qweight, f"{impl} {bits}-bit qweight")
    assert (ql.qweight < 0).any(), "the sign bit must be exercised"
    # Unpacking upstream's words gives back the codes, in both orientations.
    assert torch.equal(unpack_gptq(ql.qweight, bits), codes.to(torch.uint8))
    assert torch.equal(unpack(ql.qweight, bits, "gptq"), codes.to(torch.uint8))
    assert torch.equal(unpack_kn(ql.qweight, bits, "gptq"), codes.t().to(torch.int32))

    # AutoGPTQ v1 stores zero - 1 (its kernels add the 1 back). Upstream sizes qzeros
    # as out // 32 * bits words: for out = 40 it silently drops columns 32..39, so only
    # the first 32 columns are comparable there.
    n = out_f // 32 * 32
    assert_bits_equal(pack_gptq_zeros(zeros[:, :n] - 1, bits), ql.qzeros, f"{impl} {bits}-bit qzeros")
    assert torch.equal(unpack_gptq_zeros(ql.qzeros, bits).long() + 1, zeros[:, :n])


@pytest.mark.parametrize("impl,bits", [("cuda", 3), ("cuda", 4), ("triton", 8), ("exllama", 4)])
def test_gptq_pack_with_act_order_g_idx(gptq_quant_linears, impl, bits):
    """desc_act: a permuted g_idx changes which scale each column uses, not the layout."""
    cls, _ = gptq_quant_linears[impl]
    out_f, in_f, gs = 64, 576, 64
    perm = torch.randperm(in_f, generator=torch.Generator().manual_seed(7))
    g_idx = (perm // gs).to(torch.int32)
    codes, zeros, scales, g_idx, linear = make_case(out_f, in_f, gs, bits, seed=bits, zmin=1, g_idx=g_idx)
    ql = upstream_gptq_pack(cls, bits, gs, linear, scales, zeros, g_idx)
    assert_bits_equal(pack_gptq(codes, bits), ql.qweight, f"{impl} {bits}-bit qweight (act-order)")
    assert_bits_equal(pack_gptq_zeros(zeros - 1, bits), ql.qzeros, f"{impl} {bits}-bit qzeros (act-order)")


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_gptq_pack_float16_linear(gptq_quant_linears, bits):
    """AutoGPTQ casts scales to the layer's dtype; an fp16 layer packs the same words."""
    cls, _ = gptq_quant_linears["cuda_old"]
    codes, zeros, scales, g_idx, linear = make_case(64, 576, 64, bits, seed=5, zmin=1, dtype=torch.float16)
    ql = upstream_gptq_pack(cls, bits, 64, linear, scales, zeros, g_idx)
    assert_bits_equal(pack_gptq(codes, bits), ql.qweight, f"fp16 {bits}-bit qweight")
    assert_bits_equal(pack_gptq_zeros(zeros - 1, bits), ql.qzeros, f"fp16 {bits}-bit qzeros")


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_gptq_pack_of_our_quantized_weight(gptq_quant_linears, bits):
    """The real AutoGPTQ flow: GPTQ writes the fake-quantized weight back into the fp16
    layer and packs it with its (float) scales and zeros. Doing that with our
    ``quantize_weight`` output reproduces our codes, so upstream packs our words."""
    cls, _ = gptq_quant_linears["cuda_old"]
    out_f, in_f, gs = 64, 576, 64
    w = torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(bits)) * 0.02
    qw = quantize_weight(w, f"int{bits}", gs, "zp")  # fp16 scales and zeros, [groups, out]
    linear = torch.nn.Linear(in_f, out_f, bias=False, dtype=torch.float16)
    linear.weight.data.copy_(qw.dequantize(torch.float16))
    zeros = qw.scales2.float()
    ql = upstream_gptq_pack(cls, bits, gs, linear, qw.scales.float(), zeros, qw.g_idx)
    assert_bits_equal(pack_gptq(qw.codes, bits), ql.qweight, f"{bits}-bit qweight of a quantized layer")
    assert (zeros >= 1).all(), "seeded weights straddle 0: no zero-point 0 (see the test below)"
    assert_bits_equal(pack_gptq_zeros(zeros.long() - 1, bits), ql.qzeros, f"{bits}-bit qzeros")


def test_gptq_v1_cannot_store_zero_point_zero(gptq_quant_linears):
    """A zero-point of 0 (an all-positive group) is -1 in the v1 ``zero - 1`` encoding.
    AutoGPTQ 0.7.1 casts it to uint32 0xFFFFFFFF and ORs it in, corrupting every
    higher slot of the word; ``pack_gptq_zeros`` refuses it instead."""
    cls, _ = gptq_quant_linears["cuda_old"]
    codes, zeros, scales, g_idx, linear = make_case(32, 64, -1, 4, seed=3, zmin=1)
    zeros[0, 2] = 0
    linear.weight.data.copy_((codes - zeros.t()).float() * scales.t())
    ql = upstream_gptq_pack(cls, 4, -1, linear, scales, zeros, g_idx)
    assert torch.equal(unpack_gptq(ql.qweight, 4), codes.to(torch.uint8))  # qweight is fine
    back = unpack_gptq_zeros(ql.qzeros, 4).long() + 1
    assert (back[0, 2:8] == 16).all() and not torch.equal(back, zeros)  # slots 2..7 of word 0 all read 15
    with pytest.raises(ValueError, match="out of range"):
        pack_gptq_zeros(zeros - 1, 4)


# AutoAWQ GEMM. group_size = in_features is per-channel: from_linear indexes
# scale_zeros[idx // group_size] with the raw argument, so -1 would index backwards.
# out must be a multiple of 32: from_linear allocates qweight as out // 32 * 4 words
# per row (the constructor only asks out % 8), so out = 40 or 8 raises IndexError
# upstream; our pack_awq needs out % 8 only (see test_awq_pack_out_multiple_of_8).
AWQ_SHAPES = [(64, 576, 32), (96, 576, 64), (32, 576, 576), (256, 128, 128), (256, 128, 32)]


def upstream_awq(awq_gemm, linear, group_size, scales, zeros):
    return awq_gemm.WQLinear_GEMM.from_linear(
        linear, w_bit=4, group_size=group_size, init_only=False, scales=scales.clone(), zeros=zeros.float().clone()
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("out_f,in_f,group_size", AWQ_SHAPES, ids=[f"{o}x{i}-g{g}" for o, i, g in AWQ_SHAPES])
def test_awq_pack_matches_autoawq(awq_gemm, awq_packing_utils, out_f, in_f, group_size, dtype):
    codes, zeros, scales, g_idx, linear = make_case(out_f, in_f, group_size, 4, seed=out_f + in_f, zmin=0, dtype=dtype)
    q = upstream_awq(awq_gemm, linear, group_size, scales, zeros)

    assert_bits_equal(pack_awq(codes), q.qweight, "awq qweight")
    assert (q.qweight < 0).any(), "the sign bit must be exercised"
    # AutoAWQ stores the zero-points themselves (no -1), packed along out like qweight.
    assert_bits_equal(pack_awq(zeros.t()), q.qzeros, "awq qzeros")

    assert torch.equal(unpack_awq(q.qweight), codes.to(torch.uint8))
    assert torch.equal(unpack(q.qweight, 4, "awq"), codes.to(torch.uint8))
    assert torch.equal(unpack_kn(q.qweight, 4, "awq"), codes.t().to(torch.int32))
    assert torch.equal(unpack_awq(q.qzeros).t().long(), zeros)

    # AutoAWQ's own unpacker and dequantizer agree on our words.
    iw, iz = awq_packing_utils.unpack_awq(pack_awq(codes), pack_awq(zeros.t()), 4)
    iw, iz = awq_packing_utils.reverse_awq_order(iw, iz, 4)
    assert torch.equal(torch.bitwise_and(iw, 15).long(), codes.t())
    assert torch.equal(torch.bitwise_and(iz, 15).long(), zeros)
    deq = awq_packing_utils.dequantize_gemm(pack_awq(codes), pack_awq(zeros.t()), q.scales, 4, group_size)
    assert torch.equal(deq.t(), linear.weight.data.to(deq.dtype))


def test_awq_pack_out_multiple_of_8(awq_gemm):
    """out = 40: AutoAWQ's from_linear cannot pack it, but word j of a row only holds
    output columns 8j..8j+7, so our 5 words must equal the first 5 of upstream's
    packing of a 64-wide layer whose first 40 rows are ours."""
    codes, zeros, scales, g_idx, linear = make_case(64, 576, 64, 4, seed=40, zmin=0)
    q = upstream_awq(awq_gemm, linear, 64, scales, zeros)
    assert_bits_equal(pack_awq(codes[:40]), q.qweight[:, :5].contiguous(), "awq qweight, out = 40")
    assert_bits_equal(pack_awq(zeros[:, :40].t()), q.qzeros[:, :5].contiguous(), "awq qzeros, out = 40")


def test_awq_to_gptq_repack_matches_autoawq(awq_packing_utils):
    """AutoAWQ's ``unpack_reorder_pack`` (AWQ GEMM -> exllama/GPTQ v1, zeros - 1) maps
    our awq words onto our gptq words."""
    codes, zeros, scales, g_idx, linear = make_case(64, 576, 64, 4, seed=11, zmin=1)
    qweight, qzeros = awq_packing_utils.unpack_reorder_pack(pack_awq(codes), pack_awq(zeros.t()), 4)
    assert_bits_equal(pack_gptq(codes, 4), qweight, "repacked qweight")
    assert_bits_equal(pack_gptq_zeros(zeros - 1, 4), qzeros, "repacked qzeros")
