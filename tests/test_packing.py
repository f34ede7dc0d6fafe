"""Packing against plain-Python re-statements of the upstream pack loops.

``gptq_pack_reference`` is AutoGPTQ v1's ``QuantLinear.pack`` loop (including the
3-bit layout where codes 10 and 21 of each 32-code block straddle two words), and
``gptq_pack_zeros_reference`` its ``qzeros`` loop; ``awq_pack_reference`` is
AutoAWQ's GEMM ``from_linear`` loop with the interleave order [0, 2, 4, 6, 1, 3, 5, 7].
All three run on Python ints and are compared bit for bit.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from afpq_plugins.core.packing import (
    pack,
    pack_awq,
    pack_gptq,
    pack_gptq_zeros,
    packed_shape,
    unpack,
    unpack_awq,
    unpack_gptq,
    unpack_gptq_zeros,
    unpack_kn,
)

HYP = settings(max_examples=25, deadline=None, derandomize=True)
M32 = 0xFFFFFFFF


def _signed(u: int) -> int:
    return u - (1 << 32) if u >= 1 << 31 else u


def _gptq_stream(intweight, bits):
    """AutoGPTQ's loop over one column: ``intweight`` is the list of codes along ``in``;
    returns the unsigned 32-bit words (``row`` advances as in the original)."""
    n = len(intweight)
    words = [0] * (n // 32 * bits)
    i = 0
    row = 0
    while row < len(words):
        if bits in (2, 4, 8):
            for j in range(i, i + 32 // bits):
                words[row] |= intweight[j] << (bits * (j - i))
            i += 32 // bits
            row += 1
        elif bits == 3:
            for j in range(i, i + 10):
                words[row] |= intweight[j] << (3 * (j - i))
            i += 10
            words[row] |= intweight[i] << 30  # code 10: low 2 bits here ...
            row += 1
            words[row] |= (intweight[i] >> 2) & 1  # ... high bit in the next word
            i += 1
            for j in range(i, i + 10):
                words[row] |= intweight[j] << (3 * (j - i) + 1)
            i += 10
            words[row] |= intweight[i] << 31  # code 21: low bit here ...
            row += 1
            words[row] |= (intweight[i] >> 1) & 0x3  # ... high 2 bits in the next word
            i += 1
            for j in range(i, i + 10):
                words[row] |= intweight[j] << (3 * (j - i) + 2)
            i += 10
            row += 1
        else:
            raise NotImplementedError(bits)
    return [w & M32 for w in words]


def gptq_pack_reference(codes, bits):
    """``[out][in]`` list of ints -> ``[in * bits / 32][out]`` list of signed int32."""
    out_f = len(codes)
    cols = [_gptq_stream(codes[o], bits) for o in range(out_f)]  # intweight = W.T: one column per output
    return [[_signed(cols[o][r]) for o in range(out_f)] for r in range(len(cols[0]))]


def gptq_pack_zeros_reference(zeros, bits):
    """AutoGPTQ's qzeros loop: ``[groups][out]`` -> ``[groups][out * bits / 32]`` (same stream along out)."""
    return [[_signed(w) for w in _gptq_stream(list(row), bits)] for row in zeros]


def awq_pack_reference(codes):
    """AutoAWQ GEMM: ``qweight[i][col] |= intweight[i][col * 8 + order_map[k]] << (4 * k)``."""
    order_map = [0, 2, 4, 6, 1, 3, 5, 7]
    out_f, in_f = len(codes), len(codes[0])
    q = [[0] * (out_f // 8) for _ in range(in_f)]
    for col in range(out_f // 8):
        for k in range(8):
            for i in range(in_f):
                q[i][col] |= codes[col * 8 + order_map[k]][i] << (4 * k)
    return [[_signed(v) for v in row] for row in q]


def _codes(seed, out_f, in_f, bits, dtype=torch.uint8):
    g = np.random.default_rng(seed)
    return torch.from_numpy(g.integers(0, 2**bits, (out_f, in_f))).to(dtype)


# -- bit-identity with the upstream loops ----------------------------------------------------------------
@HYP
@given(bits=st.sampled_from([2, 3, 4, 8]), out_f=st.integers(1, 12), blocks=st.integers(1, 3), seed=st.integers(0, 2**32 - 1))
def test_pack_gptq_bit_identical_to_autogptq_loop(bits, out_f, blocks, seed):
    in_f = 32 * blocks
    codes = _codes(seed, out_f, in_f, bits)
    q = pack_gptq(codes, bits)
    assert q.dtype == torch.int32 and q.shape == (in_f * bits // 32, out_f)
    assert q.tolist() == gptq_pack_reference(codes.tolist(), bits)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_pack_gptq_non_multiple_of_32_inputs(bits):
    """2/4/8 bits only need in % (32 / bits) == 0."""
    in_f = 32 // bits * 3
    if in_f % 32 == 0:
        in_f += 32 // bits
    codes = _codes(7, 5, in_f, bits)
    ref = [[_signed(w) for w in col] for col in zip(*[_gptq_stream(codes[o].tolist() + [0] * (-in_f % 32), bits)[: in_f * bits // 32] for o in range(5)])]
    assert pack_gptq(codes, bits).tolist() == ref
    assert torch.equal(unpack_gptq(pack_gptq(codes, bits), bits), codes)


def test_gptq_3bit_spill_codes_by_hand():
    """Only code 10 = 0b111: bits 30, 31 of word 0 and bit 0 of word 1.
    Only code 21 = 0b111: bit 31 of word 1 and bits 0, 1 of word 2."""
    c = torch.zeros(1, 32, dtype=torch.uint8)
    c[0, 10] = 7
    assert pack_gptq(c, 3)[:, 0].tolist() == [_signed(0b11 << 30), 1, 0]
    c = torch.zeros(1, 32, dtype=torch.uint8)
    c[0, 21] = 7
    assert pack_gptq(c, 3)[:, 0].tolist() == [0, _signed(1 << 31), 0b11]
    c = torch.zeros(1, 32, dtype=torch.uint8)
    c[0, 22] = 5  # first code wholly in word 2
    assert pack_gptq(c, 3)[:, 0].tolist() == [0, 0, 5 << 2]
    c = torch.zeros(1, 32, dtype=torch.uint8)
    c[0, 11] = 6  # first code wholly in word 1, after code 10's spilled bit
    assert pack_gptq(c, 3)[:, 0].tolist() == [0, 6 << 1, 0]


def test_gptq_4bit_by_hand():
    c = torch.arange(8, dtype=torch.uint8).view(1, 8)
    assert pack_gptq(c, 4).tolist() == [[0x76543210]]
    c = torch.tensor([[15] * 8], dtype=torch.uint8)
    assert pack_gptq(c, 4).tolist() == [[-1]]  # all ones: the int32 is negative
    c = torch.tensor([[1, 2, 3, 0]], dtype=torch.uint8)
    assert pack_gptq(c, 8).tolist() == [[0x00030201]]
    c = torch.tensor([[3] + [0] * 14 + [2]], dtype=torch.uint8)
    assert pack_gptq(c, 2).tolist() == [[_signed(3 | 2 << 30)]]


@HYP
@given(bits=st.sampled_from([2, 3, 4, 8]), groups=st.integers(1, 5), blocks=st.integers(1, 3), seed=st.integers(0, 2**32 - 1))
def test_pack_zeros_bit_identical_to_autogptq_loop(bits, groups, blocks, seed):
    out_f = 32 * blocks
    zeros = _codes(seed, groups, out_f, bits, torch.int32)
    qz = pack_gptq_zeros(zeros, bits)
    assert qz.dtype == torch.int32 and qz.shape == (groups, out_f * bits // 32)
    assert qz.tolist() == gptq_pack_zeros_reference(zeros.tolist(), bits)
    back = unpack_gptq_zeros(qz, bits)
    assert back.shape == zeros.shape and torch.equal(back.to(torch.int32), zeros)


@HYP
@given(out_blocks=st.integers(1, 4), in_f=st.integers(1, 20), seed=st.integers(0, 2**32 - 1))
def test_pack_awq_bit_identical_to_autoawq_loop(out_blocks, in_f, seed):
    out_f = 8 * out_blocks
    codes = _codes(seed, out_f, in_f, 4)
    q = pack_awq(codes)
    assert q.dtype == torch.int32 and q.shape == (in_f, out_f // 8)
    assert q.tolist() == awq_pack_reference(codes.tolist())


def test_awq_interleave_by_hand():
    """Output column c of a row holds code c: word = nibbles [0, 2, 4, 6, 1, 3, 5, 7]."""
    codes = torch.arange(8, dtype=torch.uint8).view(8, 1)
    assert pack_awq(codes).tolist() == [[0x75316420]]


# -- round trips and unpack_kn ---------------------------------------------------------------------------
@HYP
@given(bits=st.sampled_from([2, 3, 4, 8]), out_f=st.integers(1, 16), blocks=st.integers(1, 4),
       seed=st.integers(0, 2**32 - 1), dtype=st.sampled_from([torch.uint8, torch.int32, torch.int64]))
def test_gptq_round_trip_and_kn(bits, out_f, blocks, seed, dtype):
    codes = _codes(seed, out_f, 32 * blocks, bits, dtype)
    q = pack(codes, bits, "gptq")
    assert torch.equal(q, pack_gptq(codes, bits))
    back = unpack(q, bits, "gptq")
    assert back.dtype == torch.uint8 and back.shape == codes.shape
    assert torch.equal(back.long(), codes.long())
    kn = unpack_kn(q, bits, "gptq")
    assert kn.dtype == torch.int32 and kn.shape == (32 * blocks, out_f)
    assert torch.equal(kn.long(), codes.t().long())
    # A non-contiguous view of the same codes packs the same.
    assert torch.equal(pack_gptq(codes.t().contiguous().t(), bits), q)


@HYP
@given(out_blocks=st.integers(1, 6), in_f=st.integers(1, 40), seed=st.integers(0, 2**32 - 1))
def test_awq_round_trip_and_kn(out_blocks, in_f, seed):
    codes = _codes(seed, 8 * out_blocks, in_f, 4)
    q = pack(codes, 4, "awq")
    back = unpack(q, 4, "awq")
    assert back.dtype == torch.uint8 and torch.equal(back, codes)
    assert torch.equal(unpack_awq(q), codes)
    kn = unpack_kn(q, 4, "awq")
    assert kn.dtype == torch.int32 and torch.equal(kn.long(), codes.t().long())
    assert torch.equal(pack_awq(codes.t().contiguous().t()), q)  # non-contiguous input
    assert torch.equal(pack_awq(codes.long()), q)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_extreme_codes_round_trip(bits):
    """All-max codes set the sign bit of every word; unpacking must not smear it."""
    for fill in (0, 2**bits - 1):
        codes = torch.full((3, 64), fill, dtype=torch.uint8)
        q = pack_gptq(codes, bits)
        assert torch.equal(unpack_gptq(q, bits), codes)
        assert torch.equal(unpack_kn(q, bits).long(), codes.t().long())
    if bits == 4:
        codes = torch.full((8, 3), 15, dtype=torch.uint8)
        q = pack_awq(codes)
        assert q.tolist() == [[-1]] * 3
        assert torch.equal(unpack_awq(q), codes) and torch.equal(unpack_kn(q, 4, "awq").long(), codes.t().long())


@pytest.mark.parametrize("layout,bits", [("gptq", 2), ("gptq", 3), ("gptq", 4), ("gptq", 8), ("awq", 4)])
def test_packed_shape_matches_pack(layout, bits):
    out_f, in_f = 16, 64
    q = pack(_codes(1, out_f, in_f, bits), bits, layout)
    assert tuple(q.shape) == packed_shape(layout, bits, out_f, in_f)


def test_packed_shape_values_and_errors():
    assert packed_shape("gptq", 4, 96, 64) == (8, 96)
    assert packed_shape("gptq", 3, 96, 64) == (6, 96)
    assert packed_shape("gptq", 2, 5, 16) == (1, 5)
    assert packed_shape("gptq", 8, 5, 4) == (1, 5)
    assert packed_shape("awq", 4, 96, 64) == (64, 12)
    with pytest.raises(ValueError, match="in_features 48 must be a multiple of 32"):
        packed_shape("gptq", 3, 8, 48)
    with pytest.raises(ValueError, match="in_features 4 must be a multiple of 8"):
        packed_shape("gptq", 4, 8, 4)
    with pytest.raises(ValueError, match="awq"):
        packed_shape("awq", 4, 12, 64)
    with pytest.raises(ValueError, match="awq"):
        packed_shape("awq", 3, 16, 64)
    with pytest.raises(ValueError, match="'marlin'"):
        packed_shape("marlin", 4, 16, 64)


# -- errors --------------------------------------------------------------------------------------------------
def test_pack_errors_name_the_tensor():
    good = _codes(0, 8, 32, 4)
    with pytest.raises(ValueError, match=r"layer\.qweight.*2, 3, 4 or 8.*5"):
        pack_gptq(_codes(0, 8, 32, 4), 5, name="layer.qweight")
    with pytest.raises(ValueError, match="4 bits only"):
        pack_awq(good, 3)
    with pytest.raises(ValueError, match="4 bits only"):
        unpack_awq(pack_awq(good), 3)
    with pytest.raises(ValueError, match=r"lin\.qweight: codes out of range for 4 bits"):
        pack_gptq(torch.full((8, 32), 16, dtype=torch.int32), 4, name="lin.qweight")
    with pytest.raises(ValueError, match="out of range for 3 bits"):
        pack_gptq(torch.full((8, 32), 8, dtype=torch.uint8), 3)
    with pytest.raises(ValueError, match="out of range"):
        pack_gptq(torch.full((8, 32), -1, dtype=torch.int64), 4)
    with pytest.raises(ValueError, match="out of range"):
        pack_awq(torch.full((8, 32), 16, dtype=torch.int64))
    with pytest.raises(ValueError, match="out of range"):
        pack_gptq_zeros(torch.full((2, 32), 4, dtype=torch.int32), 2)
    with pytest.raises(ValueError, match="integer"):
        pack_gptq(good.float(), 4)
    with pytest.raises(ValueError, match="2-D"):
        pack_gptq(good.reshape(-1), 4)
    with pytest.raises(ValueError, match="2-D"):
        pack_awq(good.reshape(2, 4, 32))
    with pytest.raises(ValueError, match=r"w\.q: .*16 .*not a multiple of 32.*3-bit"):
        pack_gptq(_codes(0, 8, 16, 3), 3, name="w.q")
    with pytest.raises(ValueError, match="12 .*not a multiple of 8.*4-bit"):
        pack_gptq(_codes(0, 8, 12, 4), 4)
    with pytest.raises(ValueError, match="not a multiple"):
        pack_gptq_zeros(_codes(0, 2, 16, 3, torch.int32), 3)
    with pytest.raises(ValueError, match="out_features 12 must be a multiple of 8"):
        pack_awq(_codes(0, 12, 8, 4))
    with pytest.raises(ValueError, match="'exl2'"):
        pack(good, 4, "exl2")
    with pytest.raises(ValueError, match="'exl2'"):
        unpack(pack_gptq(good, 4), 4, "exl2")
    with pytest.raises(ValueError, match="'exl2'"):
        unpack_kn(pack_gptq(good, 4), 4, "exl2")
    with pytest.raises(ValueError, match="4 bits only"):
        unpack_kn(pack_awq(good), 3, "awq")


def test_empty_codes():
    q = pack_gptq(torch.zeros(0, 32, dtype=torch.uint8), 4)
    assert q.shape == (4, 0)
    assert unpack_gptq(q, 4).shape == (0, 32)


def test_unpack_errors_are_value_errors():
    """Unpacking validates like packing: unsupported bits and word counts that are not whole
    blocks are ValueErrors with a message, not a reshape RuntimeError or silent garbage."""
    with pytest.raises(ValueError, match="2, 3, 4 or 8"):
        unpack_gptq(torch.zeros(5, 8, dtype=torch.int32), 5)
    with pytest.raises(ValueError, match="3"):
        unpack_gptq(torch.zeros(4, 8, dtype=torch.int32), 3)  # 3-bit words come in threes
    with pytest.raises(ValueError, match="3"):
        unpack_kn(torch.zeros(4, 8, dtype=torch.int32), 3)
    with pytest.raises(ValueError, match="3"):
        unpack_gptq_zeros(torch.zeros(2, 4, dtype=torch.int32), 3)  # [groups, words]: 4 words
    with pytest.raises(ValueError, match="2, 3, 4 or 8"):
        unpack_gptq_zeros(torch.zeros(2, 5, dtype=torch.int32), 5)
