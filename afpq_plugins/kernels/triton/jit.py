"""The Triton device code: code extraction, decoding and the two kernels.

See the package docstring (:mod:`afpq_plugins.kernels.triton`) for how a K-tile is
walked and what ``GROUP_MODE`` means. Importing this module decorates the kernels:
``TRITON_INTERPRET`` must be decided before that (Triton reads it at decoration time).
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["INTERPRET", "MODE_ID", "afpq_mm_kernel", "splitk_reduce_kernel", "afpq_dequant_kernel"]

#: True when the kernels were built for Triton's CPU interpreter (TRITON_INTERPRET=1 at import).
INTERPRET: bool = bool(triton.knobs.runtime.interpret)
#: Decoding rule per mode, as the kernels' ``MODE`` constexpr.
MODE_ID = {"afpq": 0, "sym": 1, "zp": 2}


# --------------------------------------------------------------------------------------
# Device helpers
# --------------------------------------------------------------------------------------

@triton.jit
def _gptq_code(w0, w1, w2, J: tl.constexpr, BITS: tl.constexpr):
    """Code ``J`` of a gptq code block held in words ``w0, w1, w2`` (int32)."""
    MASK: tl.constexpr = (1 << BITS) - 1
    WI: tl.constexpr = (J * BITS) // 32
    OFF: tl.constexpr = (J * BITS) % 32
    if WI == 0:
        lo = w0
        hi = w1
    elif WI == 1:
        lo = w1
        hi = w2
    else:
        lo = w2
        hi = w2
    if OFF + BITS <= 32:
        code = (lo >> OFF) & MASK
    else:
        # Spill (3 bits): the low bits end word WI, the rest start word WI + 1. The
        # arithmetic shift of an int32 only smears sign bits above NLOW; masked off.
        NLOW: tl.constexpr = 32 - OFF
        code = ((lo >> OFF) & ((1 << NLOW) - 1)) | ((hi << NLOW) & MASK)
    return code


@triton.jit
def _load_params(s1_ptr, s2_ptr, offs, mask, MODE: tl.constexpr):
    """Group parameters as float32: (s, s) for sym, (s_pos, s_neg) afpq, (s, z) zp."""
    p1 = tl.load(s1_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if MODE == 1:
        p2 = p1
    else:
        p2 = tl.load(s2_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    return p1, p2


@triton.jit
def _load_block(
    it, qw_ptr, s1_ptr, s2_ptr, offs_r, offs_n, r_mask, n_mask,
    stride_qk, stride_qn, stride_sg, stride_sn,
    AWQ: tl.constexpr, CPB: tl.constexpr, WPB: tl.constexpr, MODE: tl.constexpr,
    GROUP_MODE: tl.constexpr, GROUP_SIZE: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """Words of ``BLOCK_R`` code blocks x ``BLOCK_N`` columns, and the group parameters
    shared by every code position of the tile (GROUP_MODE 0 and 1)."""
    rn_mask = r_mask[:, None] & n_mask[None, :]
    if AWQ:
        wp = qw_ptr + offs_r[:, None] * stride_qk + (offs_n // 8)[None, :] * stride_qn
    else:
        wp = qw_ptr + (offs_r * WPB)[:, None] * stride_qk + offs_n[None, :] * stride_qn
    w0 = tl.load(wp, mask=rn_mask, other=0)
    if WPB == 3:
        w1 = tl.load(wp + stride_qk, mask=rn_mask, other=0)
        w2 = tl.load(wp + 2 * stride_qk, mask=rn_mask, other=0)
    else:
        w1 = w0
        w2 = w0
    if GROUP_MODE == 0:
        g = (it * (BLOCK_R * CPB)) // GROUP_SIZE
        p1, p2 = _load_params(s1_ptr, s2_ptr, g * stride_sg + offs_n[None, :] * stride_sn,
                              n_mask[None, :], MODE)
    elif GROUP_MODE == 1:
        g = (offs_r * CPB) // GROUP_SIZE
        p1, p2 = _load_params(s1_ptr, s2_ptr, g[:, None] * stride_sg + offs_n[None, :] * stride_sn,
                              rn_mask, MODE)
    else:  # loaded per code position from g_idx
        p1 = tl.zeros((BLOCK_R, 1), tl.float32)
        p2 = p1
    return w0, w1, w2, p1, p2


@triton.jit
def _weight_slice(
    w0, w1, w2, p1, p2, lut_ptr, gidx_ptr, s1_ptr, s2_ptr, offs_r, offs_n, r_mask, n_mask,
    stride_sg, stride_sn,
    J: tl.constexpr, AWQ: tl.constexpr, BITS: tl.constexpr, CPB: tl.constexpr,
    MODE: tl.constexpr, GROUP_MODE: tl.constexpr,
):
    """Decoded float32 ``[BLOCK_R, BLOCK_N]`` slice of ``W.T`` for code position ``J``
    (row ``r`` is input column ``CPB * offs_r[r] + J``), and those input columns."""
    k = offs_r * CPB + J
    if AWQ:
        # Column c sits in nibble (c % 8) // 2 + 4 * (c % 2) of its word.
        shift = (((offs_n % 8) // 2) + (offs_n % 2) * 4) * 4
        code = (w0 >> shift[None, :]) & 0xF
    else:
        code = _gptq_code(w0, w1, w2, J, BITS)
    if GROUP_MODE == 2:
        g = tl.load(gidx_ptr + k, mask=r_mask, other=0)
        p1, p2 = _load_params(s1_ptr, s2_ptr, g[:, None] * stride_sg + offs_n[None, :] * stride_sn,
                              r_mask[:, None] & n_mask[None, :], MODE)
    v = tl.load(lut_ptr + code)
    if MODE == 0:
        w = v * tl.where(v > 0, p1, p2)  # the second scale, chosen by the sign of the grid value
    elif MODE == 1:
        w = v * p1
    else:
        w = (v - p2) * p1
    return w, k


# --------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------


@triton.jit
def _folded_tile(
    w0, w1, w2, p1, p2, lut2_ptr, x_row, offs_r, offs_n, r_mask, stride_xk,
    AWQ: tl.constexpr, BITS: tl.constexpr, CPB: tl.constexpr, MODE: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One K-tile of a single-row GEMV with the group parameters applied once per tile.

    ``lut2`` holds, per code, two float32 bit patterns in one int64 (one gather): afpq
    ``(max(v, 0), min(v, 0))``, sym ``(v, 0)``, zp ``(v, 1)``. The tile's sums ``tp = sum x
    * lo`` and ``tn = sum x * hi`` over the code positions of each code block are scaled at
    the end: afpq ``tp * s_pos + tn * s_neg``, sym ``tp * s``, zp ``(tp - tn * z) * s`` --
    the same products as decoding each weight, a few float32 roundings apart, for about
    half the instructions per weight. Needs group parameters constant per code block
    (GROUP_MODE 0 or 1).
    """
    tp = tl.zeros((BLOCK_R, BLOCK_N), tl.float32)
    tn = tl.zeros((BLOCK_R, BLOCK_N), tl.float32)
    for j in tl.static_range(CPB):
        if AWQ:
            shift = (((offs_n % 8) // 2) + (offs_n % 2) * 4) * 4
            code = (w0 >> shift[None, :]) & 0xF
        else:
            code = _gptq_code(w0, w1, w2, j, BITS)
        e = tl.load(lut2_ptr + code)
        lo = e.to(tl.int32).to(tl.float32, bitcast=True)
        hi = (e >> 32).to(tl.int32).to(tl.float32, bitcast=True)
        xk = tl.load(x_row + (offs_r * CPB + j) * stride_xk, mask=r_mask, other=0.0).to(tl.float32)
        tp += xk[:, None] * lo
        if MODE != 1:
            tn += xk[:, None] * hi
    if MODE == 0:
        return tp * p1 + tn * p2
    elif MODE == 1:
        return tp * p1
    else:
        return (tp - tn * p2) * p1


@triton.jit
def _folded_dot_tile(
    w0, w1, w2, p1, p2, lut2_ptr, x_ptr, rows, m_mask, offs_r, offs_n, r_mask, stride_xm, stride_xk,
    AWQ: tl.constexpr, BITS: tl.constexpr, CPB: tl.constexpr, MODE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One K-tile on tensor cores with the group parameters applied once per tile
    (GROUP_MODE 0: one group per tile). ``lut2`` holds per code two 16-bit values in the
    activation dtype in one int32 (low half as :func:`_folded_tile`'s ``lo``, high half
    ``hi``): no per-weight scale select or multiply, two products per K-tile instead."""
    DT: tl.constexpr = x_ptr.dtype.element_ty
    tp = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    tn = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for j in tl.static_range(CPB):
        if AWQ:
            shift = (((offs_n % 8) // 2) + (offs_n % 2) * 4) * 4
            code = (w0 >> shift[None, :]) & 0xF
        else:
            code = _gptq_code(w0, w1, w2, j, BITS)
        e = tl.load(lut2_ptr + code)
        xk = tl.load(x_ptr + rows[:, None] * stride_xm + (offs_r * CPB + j)[None, :] * stride_xk,
                     mask=m_mask[:, None] & r_mask[None, :], other=0.0)
        tp = tl.dot(xk, e.to(tl.int16).to(DT, bitcast=True), tp)
        if MODE != 1:
            tn = tl.dot(xk, (e >> 16).to(tl.int16).to(DT, bitcast=True), tn)
    if MODE == 0:
        return tp * p1 + tn * p2
    elif MODE == 1:
        return tp * p1
    else:
        return (tp - tn * p2) * p1


@triton.jit(do_not_specialize=["iters_per_split"])
def afpq_mm_kernel(
    x_ptr, qw_ptr, s1_ptr, s2_ptr, gidx_ptr, lut_ptr, lut2_ptr, bias_ptr, out_ptr, ws_ptr,
    M, N, R, iters_per_split,
    stride_xm, stride_xk, stride_qk, stride_qn, stride_sg, stride_sn, stride_om, stride_on,
    AWQ: tl.constexpr, BITS: tl.constexpr, CPB: tl.constexpr, WPB: tl.constexpr,
    MODE: tl.constexpr, GROUP_MODE: tl.constexpr, GROUP_SIZE: tl.constexpr,
    HAS_BIAS: tl.constexpr, USE_DOT: tl.constexpr, IEEE: tl.constexpr, SPLIT: tl.constexpr,
    FOLD: tl.constexpr, PREFETCH: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr,
):
    """``out = x @ W.T (+ bias)``. Grid ``(tiles, splits)``.

    ``FOLD``: the group parameters are applied per K-tile instead of per weight, on CUDA
    cores (``BLOCK_M == 1``, GROUP_MODE 0/1: :func:`_folded_tile` into a ``[BLOCK_R,
    BLOCK_N]`` accumulator) or tensor cores (GROUP_MODE 0: :func:`_folded_dot_tile`).
    ``PREFETCH`` (folded CUDA-core GEMV only): software pipelining by hand, the next
    K-tile's words and parameters are loaded before this one is decoded (Triton's own
    pipeliner leaves loops without ``tl.dot`` alone).

    With ``SPLIT`` (split-K, grid axis 1) each split stores its float32 partial tile in
    the workspace ``ws`` (``[splits, M, N]`` contiguous) and :func:`splitk_reduce_kernel`
    sums them in a fixed order: deterministic, no atomics and nothing to clear between
    calls (capturable in a CUDA graph). A single-launch variant (atomics plus a per-tile
    counter, the last split finishing the tile) gave wrong sums on an H200.
    """
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    # Grouped ordering: GROUP_M row-tiles share each column tile while it is in L2.
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    in_group = GROUP_M * num_pid_n
    first_m = (pid // in_group) * GROUP_M
    group_rows = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % in_group) % group_rows
    pid_n = (pid % in_group) // group_rows

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    rows = offs_m.to(tl.int64)  # M * in or M * out may pass 2**31 for long prefills

    if USE_DOT:
        acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    elif FOLD:
        acc = tl.zeros((BLOCK_R, BLOCK_N), tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_R, BLOCK_N), tl.float32)
    x_row = x_ptr + pid_m.to(tl.int64) * stride_xm  # FOLD: the one row of this program

    n_iters = tl.cdiv(R, BLOCK_R)
    it_lo = pid_k * iters_per_split
    it_hi = tl.minimum(it_lo + iters_per_split, n_iters)
    if PREFETCH:  # folded CUDA-core GEMV, next K-tile's words and parameters loaded ahead
        offs_r = it_lo * BLOCK_R + tl.arange(0, BLOCK_R)
        w0, w1, w2, p1, p2 = _load_block(
            it_lo, qw_ptr, s1_ptr, s2_ptr, offs_r, offs_n, offs_r < R, n_mask,
            stride_qk, stride_qn, stride_sg, stride_sn,
            AWQ, CPB, WPB, MODE, GROUP_MODE, GROUP_SIZE, BLOCK_R,
        )
        for it in range(it_lo, it_hi):
            offs_r = it * BLOCK_R + tl.arange(0, BLOCK_R)
            nxt_r = offs_r + BLOCK_R
            n0, n1, n2, q1, q2 = _load_block(
                it + 1, qw_ptr, s1_ptr, s2_ptr, nxt_r, offs_n, nxt_r < R, n_mask & (offs_n * 0 + it + 1 < it_hi),
                stride_qk, stride_qn, stride_sg, stride_sn,
                AWQ, CPB, WPB, MODE, GROUP_MODE, GROUP_SIZE, BLOCK_R,
            )
            acc += _folded_tile(w0, w1, w2, p1, p2, lut2_ptr, x_row, offs_r, offs_n, offs_r < R, stride_xk,
                                AWQ, BITS, CPB, MODE, BLOCK_R, BLOCK_N)
            w0, w1, w2, p1, p2 = n0, n1, n2, q1, q2
    else:
        for it in range(it_lo, it_hi):
            offs_r = it * BLOCK_R + tl.arange(0, BLOCK_R)
            r_mask = offs_r < R
            w0, w1, w2, p1, p2 = _load_block(
                it, qw_ptr, s1_ptr, s2_ptr, offs_r, offs_n, r_mask, n_mask,
                stride_qk, stride_qn, stride_sg, stride_sn,
                AWQ, CPB, WPB, MODE, GROUP_MODE, GROUP_SIZE, BLOCK_R,
            )
            if FOLD and USE_DOT:
                acc += _folded_dot_tile(w0, w1, w2, p1, p2, lut2_ptr, x_ptr, rows, m_mask, offs_r, offs_n, r_mask,
                                        stride_xm, stride_xk, AWQ, BITS, CPB, MODE, BLOCK_M, BLOCK_R, BLOCK_N)
            elif FOLD:
                acc += _folded_tile(w0, w1, w2, p1, p2, lut2_ptr, x_row, offs_r, offs_n, r_mask, stride_xk,
                                    AWQ, BITS, CPB, MODE, BLOCK_R, BLOCK_N)
            else:
                for j in tl.static_range(CPB):
                    w, k = _weight_slice(
                        w0, w1, w2, p1, p2, lut_ptr, gidx_ptr, s1_ptr, s2_ptr, offs_r, offs_n, r_mask, n_mask,
                        stride_sg, stride_sn, j, AWQ, BITS, CPB, MODE, GROUP_MODE,
                    )
                    xk = tl.load(x_ptr + rows[:, None] * stride_xm + k[None, :] * stride_xk,
                                 mask=m_mask[:, None] & r_mask[None, :], other=0.0)
                    if USE_DOT:
                        if IEEE:
                            acc = tl.dot(xk, w, acc, input_precision="ieee")
                        else:
                            acc = tl.dot(xk, w.to(xk.dtype), acc)
                    else:
                        acc += xk.to(tl.float32)[:, :, None] * w[None, :, :]


    if USE_DOT:
        res = acc
    elif FOLD:
        res = tl.sum(acc, axis=0)[None, :]
    else:
        res = tl.sum(acc, axis=1)
    o_mask = m_mask[:, None] & n_mask[None, :]
    o_ptrs = out_ptr + rows[:, None] * stride_om + offs_n[None, :] * stride_on
    if SPLIT:  # this split's partial tile; splitk_reduce_kernel adds the splits up
        ws_ptrs = ws_ptr + (pid_k.to(tl.int64) * M + rows)[:, None] * N + offs_n[None, :]
        tl.store(ws_ptrs, res, mask=o_mask)
    else:
        if HAS_BIAS:
            res += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        tl.store(o_ptrs, res.to(out_ptr.dtype.element_ty), mask=o_mask)

@triton.jit
def splitk_reduce_kernel(ws_ptr, bias_ptr, out_ptr, M, N, SPLITS, stride_om, stride_on,
                         HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    """``out = sum over s of ws[s] (+ bias)`` for a ``[SPLITS, M, N]`` float32 workspace,
    splits added in order; ``BLOCK`` flat output elements per program."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < M * N
    acc = tl.zeros((BLOCK,), tl.float32)
    plane = (M * N).to(tl.int64)
    for s in range(SPLITS):
        acc += tl.load(ws_ptr + s * plane + offs, mask=mask, other=0.0)
    m = offs // N
    n = offs % N
    if HAS_BIAS:
        acc += tl.load(bias_ptr + n, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + m * stride_om + n * stride_on, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def afpq_dequant_kernel(
    qw_ptr, s1_ptr, s2_ptr, gidx_ptr, lut_ptr, out_ptr,
    N, R,
    stride_qk, stride_qn, stride_sg, stride_sn, stride_ok, stride_on,
    AWQ: tl.constexpr, BITS: tl.constexpr, CPB: tl.constexpr, WPB: tl.constexpr,
    MODE: tl.constexpr, GROUP_MODE: tl.constexpr, GROUP_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """``W.T`` ``[in, out]`` in ``out_ptr``'s dtype."""
    it = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_r = it * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    r_mask = offs_r < R
    n_mask = offs_n < N
    w0, w1, w2, p1, p2 = _load_block(
        it, qw_ptr, s1_ptr, s2_ptr, offs_r, offs_n, r_mask, n_mask,
        stride_qk, stride_qn, stride_sg, stride_sn,
        AWQ, CPB, WPB, MODE, GROUP_MODE, GROUP_SIZE, BLOCK_R,
    )
    for j in tl.static_range(CPB):
        w, k = _weight_slice(
            w0, w1, w2, p1, p2, lut_ptr, gidx_ptr, s1_ptr, s2_ptr, offs_r, offs_n, r_mask, n_mask,
            stride_sg, stride_sn, j, AWQ, BITS, CPB, MODE, GROUP_MODE,
        )
        tl.store(out_ptr + k.to(tl.int64)[:, None] * stride_ok + offs_n[None, :] * stride_on,
                 w.to(out_ptr.dtype.element_ty), mask=r_mask[:, None] & n_mask[None, :])

