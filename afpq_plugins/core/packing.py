"""Codes <-> int32 words, vectorised.

Two layouts, both bit-identical to the upstream packers for the same codes:

``gptq`` (AutoGPTQ v1 row layout)
    ``qweight`` is ``[in * bits / 32, out]`` int32. Along the input dimension the
    codes form one little-endian bit stream, ``bits`` bits per code, cut into 32-bit
    words. For 2/4/8 bits a word holds ``32 / bits`` whole codes; for 3 bits every
    three words hold 32 codes and codes 10 and 21 of each block spill across a word
    boundary (AutoGPTQ's 3-bit layout). ``in`` must be a multiple of 32 for 3 bits,
    of ``32 / bits`` otherwise. :func:`pack_gptq_zeros` packs ``[groups, out]``
    zero-points the same way along ``out`` (AutoGPTQ's ``qzeros``).

``awq`` (AutoAWQ GEMM layout, 4 bits)
    ``qweight`` is ``[in, out / 8]`` int32; word ``j`` of row ``i`` holds the codes of
    output columns ``8j + (0, 2, 4, 6, 1, 3, 5, 7)`` in nibbles 0..7.

Codes are taken as ``[out, in]`` (the weight's orientation) and returned that way.
"""

from __future__ import annotations

import math
import sys
from typing import List, Tuple

import torch

__all__ = [
    "LAYOUTS",
    "AWQ_ORDER",
    "pack_gptq",
    "unpack_gptq",
    "pack_gptq_zeros",
    "unpack_gptq_zeros",
    "pack_awq",
    "unpack_awq",
    "pack",
    "unpack",
    "unpack_kn",
    "packed_shape",
]

LAYOUTS = ("gptq", "awq")
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
_MASK32 = 0xFFFFFFFF


def _block(bits: int) -> Tuple[int, int]:
    """(codes, words) per repeating block of the bit stream."""
    n = math.lcm(bits, 32)
    return n // bits, n // 32


def _plan(bits: int) -> List[Tuple[int, int, int, int]]:
    """For each code in a block: (word, shift, spill word, spill shift)."""
    codes, _ = _block(bits)
    plan = []
    for k in range(codes):
        start = k * bits
        word, off = divmod(start, 32)
        spill = off + bits - 32  # bits that land in the next word
        plan.append((word, off, word + 1 if spill > 0 else -1, bits - spill if spill > 0 else 0))
    return plan


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """int64 holding unsigned 32-bit values -> int32 with the same bits."""
    words = words & _MASK32
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def _check_codes(codes: torch.Tensor, bits: int, name: str) -> None:
    if codes.dim() != 2:
        raise ValueError(f"{name}: expected 2-D codes, got shape {tuple(codes.shape)}")
    if codes.is_floating_point() or codes.dtype == torch.bool:
        raise ValueError(f"{name}: codes must be an integer tensor, got {codes.dtype}")
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= 1 << bits):
        raise ValueError(f"{name}: codes out of range for {bits} bits")


_LITTLE_ENDIAN = sys.byteorder == "little"
#: Codes per chunk: each chunk's element-wise passes stay in cache (several times
#: faster than whole-tensor passes on a memory-bound CPU).
_CHUNK = 1 << 18


def _row_chunks(rows: int, row_len: int):
    step = max(1, _CHUNK // max(row_len, 1))
    for r in range(0, rows, step):
        yield slice(r, min(r + step, rows))


def _pack_nibbles_last(c: torch.Tensor) -> torch.Tensor:
    """4-bit fast path: ``[r, n]`` codes -> ``[r, n / 8]`` int32 words.

    Eight codes are read as one little-endian int64 (one code per byte) and their
    nibbles are folded together in three shift-or-mask steps, so the word is
    ``sum(code_k << 4k)``, the bit stream's next 32 bits.
    """
    x = c.to(torch.uint8).contiguous().view(torch.int64)
    x = (x | (x >> 4)) & 0x00FF00FF00FF00FF
    x = (x | (x >> 8)) & 0x0000FFFF0000FFFF
    x = (x | (x >> 16)) & 0x00000000FFFFFFFF
    return x.view(torch.int32)[..., 0::2]


def _pack_last(c: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack ``[r, n]`` codes along the last dim into ``[r, n * bits / 32]`` int32."""
    if _LITTLE_ENDIAN and bits == 4:
        return _pack_nibbles_last(c)
    if _LITTLE_ENDIAN and bits == 8:
        return c.to(torch.uint8).contiguous().view(torch.int32)
    r, n = c.shape
    per, words = _block(bits)
    v = c.to(torch.int64).reshape(r, n // per, per)
    out = torch.zeros(r, n // per, words, dtype=torch.int64, device=c.device)
    for k, (word, shift, spill_word, spill_shift) in enumerate(_plan(bits)):
        out[:, :, word] |= v[:, :, k] << shift
        if spill_word >= 0:
            out[:, :, spill_word] |= v[:, :, k] >> spill_shift
    return _to_int32(out.reshape(r, n // per * words))


def _unpack_last(q: torch.Tensor, bits: int, dtype: torch.dtype = torch.uint8) -> torch.Tensor:
    """Inverse of :func:`_pack_last`: ``[r, w]`` int32 -> ``[r, w * 32 / bits]`` codes."""
    r, w = q.shape
    per, words = _block(bits)
    mask = (1 << bits) - 1
    if 32 % bits == 0:  # no spills: shift each word by every code position at once
        shifts = torch.arange(0, 32, bits, device=q.device, dtype=torch.int32)
        # Arithmetic right shifts of negative words only pollute bits the mask drops.
        return ((q.unsqueeze(-1) >> shifts) & mask).to(dtype).reshape(r, w * per)
    p = (q.to(torch.int64) & _MASK32).reshape(r, w // words, words)
    out = torch.empty(r, w // words, per, dtype=dtype, device=q.device)
    for k, (word, shift, spill_word, spill_shift) in enumerate(_plan(bits)):
        v = p[:, :, word] >> shift
        if spill_word >= 0:
            v = v | (p[:, :, spill_word] << spill_shift)
        out[:, :, k] = (v & mask).to(dtype)
    return out.reshape(r, w // words * per)


def _check_len(n: int, bits: int, name: str, what: str) -> None:
    per, _ = _block(bits)
    if n % per:
        raise ValueError(f"{name}: {what} {n} is not a multiple of {per}, as {bits}-bit gptq packing needs")


def pack_gptq(codes: torch.Tensor, bits: int, name: str = "qweight") -> torch.Tensor:
    """``[out, in]`` codes -> AutoGPTQ v1 ``qweight`` ``[in * bits / 32, out]``."""
    if bits not in (2, 3, 4, 8):
        raise ValueError(f"{name}: the gptq layout supports 2, 3, 4 or 8 bits, got {bits}")
    _check_codes(codes, bits, name)
    out_f, in_f = codes.shape
    _check_len(in_f, bits, name, "in_features")
    qweight = torch.empty(in_f * bits // 32, out_f, dtype=torch.int32, device=codes.device)
    for rows in _row_chunks(out_f, in_f):
        qweight[:, rows] = _pack_last(codes[rows], bits).t()
    return qweight


def _check_words(qweight: torch.Tensor, bits: int, name: str = "qweight") -> None:
    if bits not in (2, 3, 4, 8):
        raise ValueError(f"{name}: the gptq layout supports 2, 3, 4 or 8 bits, got {bits}")
    if qweight.dim() != 2 or qweight.dtype != torch.int32:
        raise ValueError(f"{name}: expected a 2-D int32 tensor, got {qweight.dtype} {tuple(qweight.shape)}")
    _, words = _block(bits)
    if qweight.shape[0] % words:
        raise ValueError(f"{name}: {qweight.shape[0]} words is not a multiple of {words}, as {bits}-bit codes need")


def unpack_gptq(qweight: torch.Tensor, bits: int) -> torch.Tensor:
    """AutoGPTQ v1 ``qweight`` -> ``[out, in]`` uint8 codes."""
    _check_words(qweight, bits)
    words, out_f = qweight.shape
    in_f = words * 32 // bits
    codes = torch.empty(out_f, in_f, dtype=torch.uint8, device=qweight.device)
    qt = qweight.t()
    for rows in _row_chunks(out_f, in_f):
        codes[rows] = _unpack_last(qt[rows].contiguous(), bits)
    return codes


def pack_gptq_zeros(zeros: torch.Tensor, bits: int, name: str = "qzeros") -> torch.Tensor:
    """``[groups, out]`` integer zero-points -> ``qzeros`` ``[groups, out * bits / 32]``.

    Stores the values given; AutoGPTQ v1 checkpoints store ``zero - 1``.
    """
    _check_codes(zeros, bits, name)
    _check_len(zeros.shape[1], bits, name, "out_features")
    return _pack_last(zeros, bits).contiguous()


def unpack_gptq_zeros(qzeros: torch.Tensor, bits: int) -> torch.Tensor:
    _check_words(qzeros.t(), bits, "qzeros")
    return _unpack_last(qzeros, bits)


def pack_awq(codes: torch.Tensor, bits: int = 4, name: str = "qweight") -> torch.Tensor:
    """``[out, in]`` 4-bit codes -> AutoAWQ GEMM ``qweight`` ``[in, out / 8]``."""
    if bits != 4:
        raise ValueError(f"{name}: the awq layout supports 4 bits only, got {bits}")
    _check_codes(codes, bits, name)
    out_f, in_f = codes.shape
    if out_f % 8:
        raise ValueError(f"{name}: out_features {out_f} must be a multiple of 8 for the awq layout")
    qweight = torch.empty(in_f, out_f // 8, dtype=torch.int32, device=codes.device)
    c = codes.view(out_f // 8, 8, in_f)
    # Word j of input row i: nibble k holds output column 8j + AWQ_ORDER[k].
    for cols in _row_chunks(in_f, out_f):
        words = c[:, AWQ_ORDER[0], cols].to(torch.int32)
        for k in range(1, 8):
            words |= c[:, AWQ_ORDER[k], cols].to(torch.int32) << (4 * k)  # int32 wrap keeps the bits
        qweight[cols] = words.t()
    return qweight


def unpack_awq(qweight: torch.Tensor, bits: int = 4) -> torch.Tensor:
    """AutoAWQ GEMM ``qweight`` ``[in, out / 8]`` -> ``[out, in]`` uint8 codes."""
    return unpack_kn(qweight, bits, "awq").to(torch.uint8).t().contiguous()


def unpack_kn(qweight: torch.Tensor, bits: int, layout: str = "gptq") -> torch.Tensor:
    """Codes as int32 ``[in, out]`` (the matmul's K x N orientation), for the forward path."""
    if layout == "awq":
        if bits != 4:
            raise ValueError(f"the awq layout supports 4 bits only, got {bits}")
        in_f, words = qweight.shape
        shifts = torch.arange(0, 32, 4, device=qweight.device, dtype=torch.int32)
        nib = (qweight.unsqueeze(-1) >> shifts) & 0xF
        inverse = torch.tensor([AWQ_ORDER.index(j) for j in range(8)], device=qweight.device)
        return nib.index_select(-1, inverse).reshape(in_f, words * 8)
    if layout != "gptq":
        raise ValueError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    _check_words(qweight, bits)
    if 32 % bits:
        return unpack_gptq(qweight, bits).t().to(torch.int32)
    w, cols = qweight.shape
    per = 32 // bits
    shifts = torch.arange(0, 32, bits, device=qweight.device, dtype=torch.int32).view(1, per, 1)
    # Arithmetic right shift of negative words only pollutes bits the mask drops.
    return ((qweight.unsqueeze(1) >> shifts) & ((1 << bits) - 1)).reshape(w * per, cols)


def packed_shape(layout: str, bits: int, out_features: int, in_features: int) -> Tuple[int, int]:
    """Shape of ``qweight`` for a layer, validating the layout's constraints."""
    if layout == "gptq":
        per, words = _block(bits)
        if in_features % per:
            raise ValueError(f"in_features {in_features} must be a multiple of {per} for {bits}-bit gptq packing")
        return in_features // per * words, out_features
    if layout == "awq":
        if bits != 4 or out_features % 8:
            raise ValueError("the awq layout needs 4 bits and out_features divisible by 8")
        return in_features, out_features // 8
    raise ValueError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")


def pack(codes: torch.Tensor, bits: int, layout: str = "gptq", name: str = "qweight") -> torch.Tensor:
    if layout == "gptq":
        return pack_gptq(codes, bits, name)
    if layout == "awq":
        return pack_awq(codes, bits, name)
    raise ValueError(f"{name}: unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")


def unpack(qweight: torch.Tensor, bits: int, layout: str = "gptq") -> torch.Tensor:
    if layout == "gptq":
        return unpack_gptq(qweight, bits)
    if layout == "awq":
        return unpack_awq(qweight, bits)
    raise ValueError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
