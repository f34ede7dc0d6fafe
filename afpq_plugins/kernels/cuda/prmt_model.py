"""A bit-exact model of the CUDA GEMV's decode and arithmetic, in numpy (no GPU, no torch maths).

It mirrors :mod:`.source` operation by operation, so it can be checked against core's
:func:`~afpq_plugins.core.quantize.decode` on the CPU and against the kernel on a GPU:

* :func:`prmt` is PTX ``prmt.b32`` in its default mode: result byte ``i`` is byte
  ``c[4i+2:4i]`` of the 8-byte value ``{b, a}`` (``a`` = bytes 0-3), or, when ``c[4i+3]`` is
  set, that byte's sign bit replicated (0x00 / 0xff). Only ``c[15:0]`` is read.
* :func:`table_entries` is the table build: float32 ``v * s`` (afpq: ``fma(v, s_side, +0)``,
  the side chosen by the sign of ``v``, and ``v * s_pos + v * s_neg`` for ``v = +-0``, as
  core's ``max(v, 0) * s_pos + min(v, 0) * s_neg``; sym: ``v * s``; zp: ``(v - z) * s``), then one
  round-to-nearest-even to fp16 / bf16 (``cvt.rn.f16x2.f32`` / ``cvt.rn.bf16x2.f32``),
  implemented here on the bits, independently of torch's conversions.
* :func:`planes`, :func:`decode_word4`, :func:`decode_block3` are the byte planes and the
  permute decode.
* :func:`emulate` runs a whole GEMV on the kernel's buffers (a :class:`~.planning.Prepared`)
  in the kernel's order: units per K-slice, chunks, half2 FMA chains (each FMA rounded once
  to fp16 / bf16, computed exactly in float64 first), float32 adds, the K-slice sum in slice
  order, the bias, one rounding. Its result is what the GPU must return bit for bit (up to
  the double rounding of a float64 FMA whose exact value needs more than 53 bits, i.e.
  products below about 2**-48 of the partial sum: not hit by normal data).
"""

from __future__ import annotations

from typing import Sequence, Tuple

import numpy as np

__all__ = ["prmt", "round_f16", "round_bf16", "round_bf16_f64", "table_entries", "planes", "decode_word4",
           "decode_block3", "decode_codes", "halves", "emulate", "gemv_arrays", "decoded_weight"]

U32 = np.uint32


def prmt(a, b, c) -> np.ndarray:
    """PTX ``prmt.b32 d, a, b, c`` (default mode), element-wise on uint32 arrays."""
    a, b, c = (np.asarray(v, dtype=np.uint64) & 0xFFFFFFFF for v in (a, b, c))
    both = (b << np.uint64(32)) | a
    out = np.zeros(np.broadcast(a, b, c).shape, dtype=np.uint64)
    for i in range(4):
        sel = (c >> np.uint64(4 * i)) & np.uint64(0xF)
        byte = (both >> (np.uint64(8) * (sel & np.uint64(7)))) & np.uint64(0xFF)
        byte = np.where(sel & np.uint64(8), np.where(byte & np.uint64(0x80), np.uint64(0xFF), np.uint64(0)), byte)
        out |= byte << np.uint64(8 * i)
    return out.astype(U32)


def round_f16(v) -> np.ndarray:
    """float32 -> fp16 bits, round to nearest even (numpy's conversion is IEEE's; overflow -> inf)."""
    with np.errstate(over="ignore"):
        return np.asarray(v, dtype=np.float32).astype(np.float16).view(np.uint16)


def round_bf16(v) -> np.ndarray:
    """float32 -> bf16 bits, round to nearest even on the bit pattern (NaN kept quiet)."""
    u = np.asarray(v, dtype=np.float32).view(U32).astype(np.uint64)
    nan = (u & 0x7FFFFFFF) > 0x7F800000
    r = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    return np.where(nan, (u >> 16) | 0x40, r).astype(np.uint16)


def round_bf16_f64(v) -> np.ndarray:
    """float64 -> bf16 bits with one rounding (to nearest even), for exact FMA results."""
    v = np.asarray(v, dtype=np.float64)
    m, e = np.frexp(v)  # v = m * 2**e, 0.5 <= |m| < 1
    e = np.maximum(e, -125)  # bf16 subnormals: fixed quantum 2**-133
    r = np.ldexp(np.rint(np.ldexp(v, 8 - e)), e - 8)
    with np.errstate(over="ignore"):
        f = r.astype(np.float32)  # exact (<= 8 significant bits) unless it overflows to inf
    return (f.view(U32) >> 16).astype(np.uint16)


def f16_value(bits) -> np.ndarray:
    return np.asarray(bits, dtype=np.uint16).view(np.float16).astype(np.float64)


def bf16_value(bits) -> np.ndarray:
    return (np.asarray(bits, dtype=np.uint16).astype(U32) << 16).view(np.float32).astype(np.float64)


def table_entries(grid: Sequence[float], mode: str, a, b, bf16: bool = False) -> np.ndarray:
    """The decoded table: uint16 bits ``[..., 2**bits]`` for parameter arrays ``a``, ``b``
    (afpq: s_pos, s_neg; sym: s, ignored; zp: s, z), as the kernel's ``build_table``."""
    g = np.asarray(grid, dtype=np.float32)
    a = np.asarray(a, dtype=np.float32)[..., None]
    b = np.asarray(b, dtype=np.float32)[..., None]
    with np.errstate(over="ignore", invalid="ignore", under="ignore"):
        if mode == "afpq":
            side = np.where(g > 0, a, b)
            r = (g * side) + np.float32(0.0)  # fma(v, s, +0): the product rounded once, -0 -> +0
            r = np.where(g == 0, g * a + g * b, r)  # zero grid values: v*s_pos + v*s_neg (keeps -0)
        elif mode == "sym":
            r = g * a
        elif mode == "zp":
            r = (g - b) * a
        else:
            raise ValueError(mode)
    r = r.astype(np.float32)
    return round_bf16(r) if bf16 else round_f16(r)


def planes(entries: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """uint16 ``[..., NT]`` -> (L, H) uint32 ``[..., NT/4]``: the kernel's pack2 + prmt 0x6420 / 0x7531."""
    e = np.asarray(entries, dtype=U32)
    nt = e.shape[-1]
    pairs = e[..., 0::2] | (e[..., 1::2] << 16)  # P[j] = entries 2j (low), 2j+1 (high)
    L = np.stack([prmt(pairs[..., 2 * k], pairs[..., 2 * k + 1], 0x6420) for k in range(nt // 4)], -1)
    H = np.stack([prmt(pairs[..., 2 * k], pairs[..., 2 * k + 1], 0x7531) for k in range(nt // 4)], -1)
    return L, H


def decode_word4(q, L, H) -> np.ndarray:
    """One 4-bit word per element (8 codes) -> uint32 ``[..., 4]`` half2 pairs, as ``decode_block``."""
    v = np.asarray(q).astype(np.int64).astype(np.uint64).astype(U32)
    s = v & U32(0x77777777)
    sh = s >> U32(16)
    v4 = (v << U32(4)).astype(U32)
    m0 = prmt(v, v4, 0x9D8C)
    m1 = prmt(v, v4, 0xBFAE)

    def half(sel, m):
        lo = bsel(prmt(L[..., 0], L[..., 1], sel), prmt(L[..., 2], L[..., 3], sel), m)
        hi = bsel(prmt(H[..., 0], H[..., 1], sel), prmt(H[..., 2], H[..., 3], sel), m)
        return prmt(lo, hi, 0x5140), prmt(lo, hi, 0x7362)

    w0, w1 = half(s, m0)
    w2, w3 = half(sh, m1)
    return np.stack([w0, w1, w2, w3], -1)


def bsel(a, b, m):
    return ((a & ~m) | (b & m)).astype(U32)


def decode_block3(a, b, c, L, H) -> np.ndarray:
    """One 3-bit block (three words per element, 32 codes) -> uint32 ``[..., 16]`` pairs."""
    a, b, c = (np.asarray(x).astype(np.int64).astype(np.uint64).astype(U32) for x in (a, b, c))
    s = [a & U32(0x77777777), b & U32(0x77777777), c & U32(0x77777777),
         ((a >> U32(3)) & U32(0x11111111)) | ((b >> U32(2)) & U32(0x22222222)) | ((c >> U32(1)) & U32(0x44444444))]
    out = []
    for sj in s:
        for sel in (sj, sj >> U32(16)):
            lo = prmt(L[..., 0], L[..., 1], sel)
            hi = prmt(H[..., 0], H[..., 1], sel)
            out += [prmt(lo, hi, 0x5140), prmt(lo, hi, 0x7362)]
    return np.stack(out, -1)


def halves(pairs: np.ndarray) -> np.ndarray:
    """uint32 pairs ``[..., P]`` -> uint16 ``[..., 2P]`` (low half first)."""
    p = np.asarray(pairs, dtype=U32)
    return np.stack([p & 0xFFFF, p >> 16], -1).reshape(*p.shape[:-1], -1).astype(np.uint16)


def decode_codes(codes, entries) -> np.ndarray:
    """uint16 bits of ``codes`` (int array, 8 per row for 4 bits, 32 per row for 3 bits) through
    the permute decode of ``entries`` (uint16 ``[..., NT]``, broadcast against the rows)."""
    codes = np.asarray(codes, dtype=np.int64)
    nt = np.asarray(entries).shape[-1]
    L, H = planes(entries)
    if nt == 16:
        q = np.zeros(codes.shape[:-1], dtype=np.int64)
        for i in range(8):
            q |= codes[..., i] << (4 * i)
        return halves(decode_word4(q, L, H))
    words = [np.zeros(codes.shape[:-1], dtype=np.int64) for _ in range(3)]
    for j in range(3):
        for i in range(8):
            words[j] |= ((codes[..., 8 * j + i] & 7) | (((codes[..., 24 + i] >> j) & 1) << 3)) << (4 * i)
    return halves(decode_block3(*words, L, H))


def emulate(prep, x, ks: int, bf16: bool = False, ch: int = None, chain: int = None) -> np.ndarray:
    """The kernel's output bits (uint16 ``[M, N]``) for :class:`~.planning.Prepared` ``prep`` and
    activations ``x`` (torch ``[M, K]`` fp16/bf16), ``ks`` K-slices, in the kernel's order.
    ``ch`` / ``chain`` default to the host's choices for this M and dtype."""
    import torch

    from . import planning

    plan = prep.plan
    xm = x.detach().cpu()
    M = xm.shape[0]
    ch = ch or plan.ch(M, bf16)
    chain = chain or planning.chain_codes(plan.bits, bf16, ch)
    if prep.kmap is not None:
        km = prep.kmap.cpu().long()
        xg = torch.where((km >= 0).unsqueeze(0), xm[:, km.clamp(min=0)], torch.zeros((), dtype=xm.dtype))
    else:
        xg = xm
    xbits = xg.contiguous().view(torch.int16).numpy().view(np.uint16)
    q = prep.q.cpu().numpy().astype(np.int64).astype(np.uint64).astype(U32)
    s1 = prep.s1.detach().cpu().to(torch.float32).numpy()
    s2 = prep.s2.detach().cpu().to(torch.float32).numpy()
    bias = None if prep.bias is None else prep.bias.detach().cpu().numpy().astype(np.float32)
    return gemv_arrays(q, s1, s2, xbits, bias, grid=prep.grid, mode=("afpq", "sym", "zp")[prep.mode],
                       bits=plan.bits, units=plan.units, upg=plan.upg, bpu=plan.bpu, ks=ks, bf16=bf16, ch=ch,
                       chain=chain)


def gemv_arrays(q, s1, s2, xbits, bias, *, grid, mode: str, bits: int, units: int, upg: int, bpu: int, ks: int,
                bf16: bool, ch: int, chain: int) -> np.ndarray:
    """:func:`emulate` on plain arrays: ``q`` uint32 ``[rows, N]`` (the kernel's code words),
    ``s1`` / ``s2`` float32 ``[groups, N]``, ``xbits`` uint16 ``[M, >= kp]`` (kernel input order),
    ``bias`` float32 ``[N]`` or None. Returns uint16 ``[M, N]``."""
    val = bf16_value if bf16 else f16_value
    xval = val(xbits)  # float64
    M, N = xbits.shape[0], q.shape[1]
    cpb, wpb = (8, 1) if bits == 4 else (32, 3)

    def fma16(a, b, c):  # one rounding of the exact a * b + c (float64 holds it exactly here)
        with np.errstate(over="ignore", invalid="ignore"):
            r = a * b + c
            return round_bf16_f64(r) if bf16 else r.astype(np.float16).view(np.uint16)

    red = np.zeros((ks, M, N), dtype=np.float32)
    for s in range(ks):
        acc = np.zeros((M, N), dtype=np.float32)
        for u in range(s, units, ks):
            g = u // upg
            L, H = planes(table_entries(grid, mode, s1[g], s2[g], bf16))  # per column
            hlo = np.zeros((M, N), dtype=np.uint16)
            hhi = np.zeros((M, N), dtype=np.uint16)
            for blk in range(u * bpu, (u + 1) * bpu):
                r = q[blk * wpb: (blk + 1) * wpb]
                w = decode_word4(r[0], L, H) if wpb == 1 else decode_block3(r[0], r[1], r[2], L, H)
                wv = val(halves(w))  # [N, cpb], input order
                j = (blk - u * bpu) % ch
                for e in range(cpb // 8):
                    g8 = j * (cpb // 8) + e
                    if g8 % (chain // 8) == 0:
                        hlo[:] = 0
                        hhi[:] = 0
                    k0 = blk * cpb + 8 * e
                    for p in range(4):
                        hlo = fma16(xval[:, k0 + 2 * p, None], wv[None, :, 8 * e + 2 * p], val(hlo))
                        hhi = fma16(xval[:, k0 + 2 * p + 1, None], wv[None, :, 8 * e + 2 * p + 1], val(hhi))
                    if (g8 + 1) % (chain // 8) == 0:
                        with np.errstate(over="ignore", invalid="ignore"):
                            acc = (acc + val(hlo).astype(np.float32)).astype(np.float32)
                            acc = (acc + val(hhi).astype(np.float32)).astype(np.float32)
        red[s] = acc
    out = np.zeros((M, N), dtype=np.float32)
    with np.errstate(over="ignore", invalid="ignore"):
        for s in range(ks):
            out = (out + red[s]).astype(np.float32)
        if bias is not None:
            out = (out + bias[None]).astype(np.float32)
    return round_bf16(out) if bf16 else round_f16(out)


def decoded_weight(prep, bf16: bool = False) -> np.ndarray:
    """uint16 bits ``[N, K]`` (original input order) of the weight the kernel multiplies: every
    block of ``prep.q`` decoded with its unit's table through the permute model. Padding
    positions are dropped; an input the kernel never reads stays 0xFFFF (a NaN pattern)."""
    import torch

    plan = prep.plan
    q = prep.q.cpu().numpy().astype(np.int64).astype(np.uint64).astype(U32)
    s1 = prep.s1.detach().cpu().to(torch.float32).numpy()
    s2 = prep.s2.detach().cpu().to(torch.float32).numpy()
    mode = ("afpq", "sym", "zp")[prep.mode]
    N, cpb, wpb = prep.out_features, plan.cpb, plan.wpb
    wk = np.full((N, plan.kp), 0xFFFF, dtype=np.uint16)
    for u in range(plan.units):
        g = u // plan.upg
        L, H = planes(table_entries(prep.grid, mode, s1[g], s2[g], bf16))
        for blk in range(u * plan.bpu, (u + 1) * plan.bpu):
            r = q[blk * wpb: (blk + 1) * wpb]
            w = decode_word4(r[0], L, H) if wpb == 1 else decode_block3(r[0], r[1], r[2], L, H)
            wk[:, blk * cpb: (blk + 1) * cpb] = halves(w)
    if prep.kmap is None:
        return wk
    km = prep.kmap.cpu().numpy()
    out = np.full((N, prep.in_features), 0xFFFF, dtype=np.uint16)
    keep = km >= 0
    out[:, km[keep]] = wk[:, keep]
    return out
