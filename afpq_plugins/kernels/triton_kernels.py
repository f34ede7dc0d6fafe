"""Fused Triton kernels: AFPQ LUT dequantize + matmul, reading the packed codes directly.

``y = x @ W.T (+ bias)`` in one pass with float32 accumulation, where ``W`` is never
materialised: each program loads packed int32 words, extracts the codes, looks them
up in the format's table (``fmt.lut(mode)``), applies the group parameters and feeds
the result straight into the reduction. Layouts are exactly the ones core writes
(:mod:`afpq_plugins.core.packing`):

``gptq``  ``qweight[in * bits / 32, out]``; along the input dim a little-endian bit
          stream of ``bits``-bit codes in 32-bit words (3 bits: 32 codes per 3 words,
          codes 10 and 21 spill across a word boundary). ``g_idx`` (act-order) honoured.
``awq``   4 bits, ``qweight[in, out / 8]``; nibble ``i`` of word ``j`` holds output
          column ``8 j + (0, 2, 4, 6, 1, 3, 5, 7)[i]``.

Decoding (core's :func:`~afpq_plugins.core.quantize.decode`, same float32 ops):
``afpq``: ``v * (s_pos if v > 0 else s_neg)``; ``sym``: ``v * s``; ``zp``: ``(v - z) * s``.

How a K-tile is walked (both layouts share one skeleton). The input dimension is cut
into *code blocks* of ``CPB`` consecutive codes stored in ``WPB`` consecutive words of
one column (gptq 4-bit: 8 codes / 1 word; 3-bit: 32 / 3; 2-bit: 16 / 1; 8-bit: 4 / 1;
awq: 1 code per row, the word shared by 8 columns). An iteration loads the words of
``BLOCK_R`` code blocks x ``BLOCK_N`` columns once (no redundant word loads along K),
then, for each of the ``CPB`` code positions ``j`` (a static loop), extracts a
``[BLOCK_R, BLOCK_N]`` slice whose row ``r`` is input column ``CPB * r + j``, decodes it
and multiplies it with the matching strided ``[BLOCK_M, BLOCK_R]`` slice of ``x``. The
order of the input columns inside a K-tile is irrelevant to the sum, so no shuffle of
the unpacked codes is ever needed.

Paths (chosen by :func:`afpq_matmul`, overridable):

``gemv``     M <= 16: split-K over a 2-D grid ``(tiles, SPLIT_K)``. M = 1 uses CUDA-core
             FMAs into a ``[BLOCK_M, BLOCK_R, BLOCK_N]`` float32 accumulator reduced once
             at the end (no tensor-core layout shuffles for a GEMV; ``block_m`` < 16
             forces this for other tiny M); 2..16 uses ``tl.dot`` with ``BLOCK_M = 16``.
             With ``SPLIT_K > 1`` partial sums are added with float32 atomics into a
             zeroed float32 buffer (the output itself for fp32 activations), then cast.
``gemm``     tiled ``tl.dot`` with grouped program ordering for L2 reuse (split-K too
             when the tiles would not cover the SMs).
``dequant``  very large M (compute bound): a Triton kernel writes ``W.T`` once in the
             activation dtype, then cuBLAS multiplies (``torch.addmm``).

Group parameters per K-tile: ``GROUP_MODE`` 0 = the whole tile lies in one group (one
``[BLOCK_N]`` load of each scale per iteration); 1 = the group depends on the code block
only (a ``[BLOCK_R, BLOCK_N]`` gather per iteration); 2 = per input column, read from
``g_idx`` (act-order; a gather per code position).

Importing this module raises :class:`ImportError` when Triton is missing or broken (the
dispatcher in :mod:`afpq_plugins.kernels` relies on that). Triton picks "interpreter or
compiler" when a function is decorated, so to run on CPU set ``TRITON_INTERPRET=1``
before ``triton`` itself is first imported (its library functions such as ``tl.cdiv``
are decorated then) and before this module is. Without a GPU, :func:`aot_compile`
still runs the compiled path through Triton's pipeline and ``ptxas``.
"""

from __future__ import annotations

import contextlib
import math
import weakref
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

try:  # guarded: the dispatcher treats ImportError as "backend unavailable"
    import triton
    import triton.language as tl
except Exception as exc:  # ImportError, or a broken install raising something else
    raise ImportError(f"afpq_plugins.kernels.triton_kernels needs a working triton: {exc!r}") from exc

from ..core.packing import packed_shape

__all__ = [
    "INTERPRET",
    "PATHS",
    "DEQUANT_MIN_M",
    "GEMV_MAX_M",
    "MatmulPlan",
    "plan_matmul",
    "mm_constexprs",
    "aot_compile",
    "afpq_matmul",
    "dequantize",
    "linear",
    "dequantize_layer",
]

#: True when the kernels were built for Triton's CPU interpreter (TRITON_INTERPRET=1 at import).
INTERPRET: bool = bool(triton.knobs.runtime.interpret)
PATHS = ("auto", "gemv", "gemm", "dequant")
#: Largest M served by the split-K GEMV path.
GEMV_MAX_M = 16
#: Smallest M for which "auto" dequantizes once and calls cuBLAS (CUDA only).
DEQUANT_MIN_M = 1024

_MODE_ID = {"afpq": 0, "sym": 1, "zp": 2}
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


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
def _afpq_mm_kernel(
    x_ptr, qw_ptr, s1_ptr, s2_ptr, gidx_ptr, lut_ptr, bias_ptr, out_ptr,
    M, N, R, iters_per_split,
    stride_xm, stride_xk, stride_qk, stride_qn, stride_sg, stride_sn, stride_om, stride_on,
    AWQ: tl.constexpr, BITS: tl.constexpr, CPB: tl.constexpr, WPB: tl.constexpr,
    MODE: tl.constexpr, GROUP_MODE: tl.constexpr, GROUP_SIZE: tl.constexpr,
    HAS_BIAS: tl.constexpr, USE_DOT: tl.constexpr, IEEE: tl.constexpr, ATOMIC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr,
):
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
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_R, BLOCK_N), tl.float32)

    n_iters = tl.cdiv(R, BLOCK_R)
    it_lo = pid_k * iters_per_split
    it_hi = tl.minimum(it_lo + iters_per_split, n_iters)
    for it in range(it_lo, it_hi):
        offs_r = it * BLOCK_R + tl.arange(0, BLOCK_R)
        r_mask = offs_r < R
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
    else:
        res = tl.sum(acc, axis=1)
    if HAS_BIAS:
        b = tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        if ATOMIC:
            b = b * (pid_k == 0).to(tl.float32)  # only the first split adds the bias
        res = res + b[None, :]
    o_ptrs = out_ptr + rows[:, None] * stride_om + offs_n[None, :] * stride_on
    o_mask = m_mask[:, None] & n_mask[None, :]
    if ATOMIC:
        tl.atomic_add(o_ptrs, res, mask=o_mask, sem="relaxed")
    else:
        tl.store(o_ptrs, res.to(out_ptr.dtype.element_ty), mask=o_mask)


@triton.jit
def _afpq_dequant_kernel(
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


# --------------------------------------------------------------------------------------
# Host side
# --------------------------------------------------------------------------------------


@contextlib.contextmanager
def _interpreter_bf16_dot():
    """Shim, Triton 3.9 interpreter only: ``InterpreterBuilder.create_dot`` multiplies
    bfloat16 operands as their raw uint16 bit patterns. Widen them to float32 first
    (exact) for the duration of one launch; compiled kernels are untouched."""
    if not INTERPRET:
        yield
        return
    import numpy as np
    from triton.runtime import interpreter as ti

    cls = ti.InterpreterBuilder
    original = cls.create_dot

    def widen(h):
        if h.dtype == tl.bfloat16:
            data = ti._convert_float(h.data, tl.bfloat16, tl.float32, None).view(np.float32)
            return ti.TensorHandle(data, tl.float32)
        return h

    def create_dot(self, a, b, d, *args, **kwargs):
        return original(self, widen(a), widen(b), d, *args, **kwargs)

    cls.create_dot = create_dot
    try:
        yield
    finally:
        cls.create_dot = original


def _geometry(bits: int, layout: str) -> Tuple[int, int]:
    """(codes per block, words per block) along the input dimension."""
    if layout == "awq":
        if bits != 4:
            raise ValueError(f"the awq layout supports 4 bits only, got {bits}")
        return 1, 1
    if layout != "gptq":
        raise ValueError(f"unknown layout {layout!r}; choose gptq or awq")
    if bits not in (2, 3, 4, 8):
        raise ValueError(f"the gptq layout supports 2, 3, 4 or 8 bits, got {bits}")
    n = math.lcm(bits, 32)
    return n // bits, n // 32


_DEVICE_INFO = {}


def _device_info(device: torch.device) -> Tuple[int, Tuple[int, int]]:
    """(SM count, compute capability); the interpreter gets a nominal 4-SM sm_90."""
    if device.type != "cuda":
        return 4, (9, 0)
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _DEVICE_INFO:
        props = torch.cuda.get_device_properties(idx)
        _DEVICE_INFO[idx] = (props.multi_processor_count, (props.major, props.minor))
    return _DEVICE_INFO[idx]


def _group_mode(group_size: int, cpb: int, block_r: int, act_order: bool) -> int:
    if act_order or group_size % cpb:
        return 2
    if group_size % (block_r * cpb) == 0:
        return 0
    return 1


@dataclass(frozen=True)
class MatmulPlan:
    """Everything a launch of :func:`_afpq_mm_kernel` (or the dequant path) depends on."""

    path: str  # "gemv", "gemm" or "dequant"
    block_m: int
    block_n: int
    block_r: int
    use_dot: bool
    group_mode: int
    split_k: int
    iters_per_split: int
    num_warps: int
    num_stages: int
    grid: Tuple[int, int]

    @property
    def atomic(self) -> bool:
        return self.split_k > 1


def plan_matmul(
    M: int, N: int, K: int, *, bits: int, layout: str, group_size: int, act_order: bool = False,
    path: str = "auto", dtype: torch.dtype = torch.float16, on_cuda: bool = True, sms: int = 132,
    capability: Tuple[int, int] = (9, 0),
    block_m: Optional[int] = None, block_n: Optional[int] = None, block_r: Optional[int] = None,
    split_k: Optional[int] = None, num_warps: Optional[int] = None, num_stages: Optional[int] = None,
) -> MatmulPlan:
    """Choose path, tiles and split-K for an ``[M, K] x [K, N]`` product (keywords override).

    The defaults are not tuned on a GPU yet: they were chosen from ``ptxas`` register
    and shared-memory reports (:func:`aot_compile`; for LLaMA shapes no spills on sm_90,
    8-24 bytes on sm_80 for act-order 64x64 and 3-bit tiles; 3-bit tiles run
    unpipelined to stay within shared memory) and from occupancy arithmetic (split K
    until the grid covers the SMs). Retune with ``benchmarks/bench_kernels.py --sweep``.
    """
    if path not in PATHS:
        raise ValueError(f"unknown path {path!r}; choose one of {', '.join(PATHS)}")
    cpb, _ = _geometry(bits, layout)
    gs = K if group_size == -1 else group_size
    awq = layout == "awq"
    if path == "auto":
        if M <= GEMV_MAX_M:
            path = "gemv"
        elif M >= DEQUANT_MIN_M and on_cuda:
            path = "dequant"
        else:
            path = "gemm"
    R = K // cpb
    if path == "dequant":
        br = block_r or (32 if awq else max(1, 128 // cpb))
        bn = block_n or 64
        return MatmulPlan("dequant", 0, bn, br, False, _group_mode(gs, cpb, br, act_order), 1, 0,
                          num_warps or 4, num_stages or 1, (triton.cdiv(R, br), triton.cdiv(N, bn)))
    three_bit = bits == 3 and not awq
    if path == "gemv" and (block_m or (1 if M == 1 else 16)) < 16:
        # CUDA-core FMAs (M == 1 by default; block_m < 16 forces it for tiny M).
        bm, bn, use_dot = block_m or 1, 64, False
        br = 32 if awq else max(1, 128 // cpb)  # 128 input columns per iteration (gptq)
        warps, stages = 4, 3
    elif path == "gemv":
        bm, bn, use_dot = 16, 64, True
        br = 32 if awq else max(16, 128 // cpb)  # tl.dot needs K >= 16
        warps, stages = 4, 1 if three_bit else 3
    elif dtype == torch.float32:  # exact fp32 dot (FMA loops): small tiles or it spills
        bm, bn, br = 32, 64, 32 if awq else 16
        warps, stages = 4, 2
    else:
        bm = 32 if M <= 32 else 64 if (M <= 64 or capability[0] < 9) else 128
        bn = 64 if (N < 128 or three_bit) else 128
        # Mid-size M: smaller tiles before leaving SMs idle.
        while triton.cdiv(M, bm) * triton.cdiv(N, bn) < sms and max(bm, bn) > 64 and not (block_m or block_n):
            if bm >= bn:
                bm //= 2
            else:
                bn //= 2
        br = 32 if awq else 16
        warps = 8 if bm * bn >= 64 * 64 else 4
        stages = 1 if three_bit else 3
    bm = block_m or bm
    bn = block_n or bn
    br = block_r or br
    use_dot = use_dot if path == "gemv" and not block_m else (bm >= 16)
    warps = num_warps or warps
    stages = num_stages or stages
    if use_dot and (bm < 16 or bn < 16 or br < 16):
        raise ValueError(f"tl.dot tiles need BLOCK_M, BLOCK_N, BLOCK_R >= 16, got {bm}, {bn}, {br}")
    for name, v in (("block_m", bm), ("block_n", bn), ("block_r", br)):
        if v & (v - 1):
            raise ValueError(f"{name} must be a power of two, got {v}")
    tiles = max(1, triton.cdiv(M, bm) * triton.cdiv(N, bn))
    n_iters = max(1, triton.cdiv(R, br))
    if split_k is None:
        split_k = 1
        # Too few tiles to keep every SM streaming weights: split K (float32 atomics).
        if path == "gemv" and tiles < 2 * sms:
            split_k = min(triton.cdiv(4 * sms, tiles), 16)
        elif path == "gemm" and tiles < sms:
            split_k = min(triton.cdiv(2 * sms, tiles), 4)
    split_k = max(1, min(int(split_k), n_iters))
    per_split = triton.cdiv(n_iters, split_k)
    split_k = triton.cdiv(n_iters, per_split)  # no empty splits
    return MatmulPlan(path, bm, bn, br, use_dot, _group_mode(gs, cpb, br, act_order), split_k, per_split,
                      warps, stages, (tiles, split_k))


def mm_constexprs(plan: MatmulPlan, *, bits: int, layout: str, mode: str, group_size: int, K: int,
                  has_bias: bool, dtype: torch.dtype) -> dict:
    """The compile-time arguments of :func:`_afpq_mm_kernel` for ``plan``."""
    cpb, wpb = _geometry(bits, layout)
    return dict(
        AWQ=layout == "awq", BITS=bits, CPB=cpb, WPB=wpb, MODE=_MODE_ID[mode], GROUP_MODE=plan.group_mode,
        GROUP_SIZE=K if group_size == -1 else group_size, HAS_BIAS=has_bias, USE_DOT=plan.use_dot,
        IEEE=dtype == torch.float32, ATOMIC=plan.atomic, BLOCK_M=plan.block_m, BLOCK_N=plan.block_n,
        BLOCK_R=plan.block_r, GROUP_M=8,
    )


def _check_tensors(x, qweight, scales, second, lut, bits, layout, mode, group_size, g_idx, bias):
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D [M, in], got shape {tuple(x.shape)}")
    if x.dtype not in _DTYPES:
        raise TypeError(f"x must be float16, bfloat16 or float32, got {x.dtype}")
    if mode not in _MODE_ID:
        raise ValueError(f"unknown mode {mode!r}")
    if mode != "sym" and second is None:
        raise ValueError(f"mode {mode!r} needs its second group parameter (scales_neg or zeros)")
    if qweight.dtype != torch.int32:
        raise TypeError(f"qweight must be int32, got {qweight.dtype}")
    K = x.shape[1]
    N = scales.shape[1]
    expect = packed_shape(layout, bits, N, K)
    if tuple(qweight.shape) != expect:
        raise ValueError(f"qweight shape {tuple(qweight.shape)} != {expect} for in={K}, out={N}, {bits}-bit {layout}")
    groups = scales.shape[0]
    gs = K if group_size == -1 else group_size
    if gs <= 0 or K % gs or K // gs != groups:
        raise ValueError(f"scales has {groups} groups; in={K} with group_size {group_size} needs {K // max(gs, 1)}")
    if second is not None and second.shape != scales.shape:
        raise ValueError(f"second parameter shape {tuple(second.shape)} != scales {tuple(scales.shape)}")
    if second is not None and second.stride() != scales.stride():
        raise ValueError("scales and the second parameter must share strides")
    if lut.dtype != torch.float32 or lut.numel() != 1 << bits:
        raise ValueError(f"lut must be float32 with {1 << bits} entries")
    if g_idx is not None and (g_idx.numel() != K or g_idx.dtype not in (torch.int32, torch.int64)):
        raise ValueError("g_idx must be an int32/int64 vector of length in_features")
    if bias is not None and bias.shape != (N,):
        raise ValueError(f"bias shape {tuple(bias.shape)} != ({N},)")
    dev = x.device
    for name, t in (("qweight", qweight), ("scales", scales), ("second", second), ("lut", lut),
                    ("g_idx", g_idx), ("bias", bias)):
        if t is not None and t.device != dev:
            raise ValueError(f"{name} is on {t.device}, x on {dev}")
    if dev.type != "cuda" and not INTERPRET:
        raise RuntimeError("Triton AFPQ kernels need CUDA tensors (or TRITON_INTERPRET=1 set before import)")
    return K, N, gs


def _launch(kernel, grid, *args, **kwargs):
    with _interpreter_bf16_dot():
        kernel[grid](*args, **kwargs)


def _inspect_g_idx(g_idx: torch.Tensor, K: int, gs: int) -> bool:
    """True when ``g_idx`` is the plain ``i // gs``; ValueError when a group is out of
    range (the kernels gather scales with it unchecked). One host sync."""
    groups = K // gs
    lo, hi = torch.aminmax(g_idx)
    if int(lo) < 0 or int(hi) >= groups:
        raise ValueError(f"g_idx values must lie in [0, {groups}), got [{int(lo)}, {int(hi)}]")
    return bool(torch.equal(g_idx, torch.arange(K, device=g_idx.device, dtype=g_idx.dtype) // gs))


def _act_order(g_idx, K: int, gs: int, default_order: Optional[bool]) -> bool:
    if g_idx is None:
        return False
    if default_order is None:  # layer callers pass a cached answer
        default_order = _inspect_g_idx(g_idx, K, gs)
    return not default_order


def _gidx_arg(g_idx, K: int, gs: int, gmode: int, device) -> Optional[torch.Tensor]:
    if gmode == 2:
        if g_idx is None:  # default order with a group size that does not align with code blocks
            return torch.arange(K, device=device, dtype=torch.int32) // gs
        return g_idx
    return g_idx  # never read by the kernel (None: the caller passes a stand-in)


def dequantize(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    second: Optional[torch.Tensor],
    lut: torch.Tensor,
    *,
    bits: int,
    layout: str = "gptq",
    mode: str = "afpq",
    group_size: int = 128,
    in_features: int,
    g_idx: Optional[torch.Tensor] = None,
    default_order: Optional[bool] = None,
    dtype: torch.dtype = torch.float16,
    out: Optional[torch.Tensor] = None,
    block_n: Optional[int] = None,
    block_r: Optional[int] = None,
) -> torch.Tensor:
    """``W.T`` (``[in, out]``, ``dtype``) decoded by a Triton kernel (float32 maths as in
    core's ``decode``, one rounding to ``dtype``)."""
    probe = torch.empty(0, in_features, device=qweight.device, dtype=dtype)
    K, N, gs = _check_tensors(probe, qweight, scales, second, lut, bits, layout, mode, group_size, g_idx, None)
    if out is None:
        out = torch.empty(K, N, device=qweight.device, dtype=dtype)
    elif out.shape != (K, N) or out.dtype != dtype or out.device != qweight.device:
        raise ValueError(f"out must be [{K}, {N}] {dtype} on {qweight.device}")
    act = _act_order(g_idx, K, gs, default_order)
    plan = plan_matmul(0, N, K, bits=bits, layout=layout, group_size=group_size, act_order=act, path="dequant",
                       block_n=block_n, block_r=block_r)
    cpb, wpb = _geometry(bits, layout)
    s2 = second if second is not None else scales
    gidx = _gidx_arg(g_idx, K, gs, plan.group_mode, qweight.device)
    gidx = qweight if gidx is None else gidx
    _launch(
        _afpq_dequant_kernel, plan.grid,
        qweight, scales, s2, gidx, lut, out, N, K // cpb,
        qweight.stride(0), qweight.stride(1), scales.stride(0), scales.stride(1), out.stride(0), out.stride(1),
        AWQ=layout == "awq", BITS=bits, CPB=cpb, WPB=wpb, MODE=_MODE_ID[mode], GROUP_MODE=plan.group_mode,
        GROUP_SIZE=gs, BLOCK_N=plan.block_n, BLOCK_R=plan.block_r, num_warps=plan.num_warps,
    )
    return out


def afpq_matmul(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    second: Optional[torch.Tensor],
    lut: torch.Tensor,
    *,
    bits: int,
    layout: str = "gptq",
    mode: str = "afpq",
    group_size: int = 128,
    g_idx: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    default_order: Optional[bool] = None,
    out: Optional[torch.Tensor] = None,
    path: str = "auto",
    **tuning,
) -> torch.Tensor:
    """``x @ W.T (+ bias)`` from raw buffers; ``x`` is ``[M, in]``, the result ``[M, out]`` in ``x.dtype``.

    ``scales``/``second`` are ``[groups, out]`` (``second`` = s_neg for ``afpq``, the
    zero-points for ``zp``, ignored for ``sym``); ``lut`` is ``fmt.lut(mode, device)``
    (float32, ``2**bits`` entries). ``default_order`` tells whether ``g_idx`` is the plain
    ``i // group_size`` (None: checked here, one host sync). ``out`` (``[M, out]``,
    ``x.dtype``) receives the result. ``path`` and ``tuning`` (``block_m``, ``block_n``,
    ``block_r``, ``split_k``, ``num_warps``, ``num_stages``) override :func:`plan_matmul`.
    """
    K, N, gs = _check_tensors(x, qweight, scales, second, lut, bits, layout, mode, group_size, g_idx, bias)
    M = x.shape[0]
    if out is None:
        out = torch.empty(M, N, device=x.device, dtype=x.dtype)
    elif out.shape != (M, N) or out.dtype != x.dtype or out.device != x.device:
        raise ValueError(f"out must be [{M}, {N}] {x.dtype} on {x.device}")
    if M == 0:
        return out
    act = _act_order(g_idx, K, gs, default_order)
    sms, cap = _device_info(x.device)
    plan = plan_matmul(M, N, K, bits=bits, layout=layout, group_size=group_size, act_order=act, path=path,
                       dtype=x.dtype, on_cuda=x.is_cuda, sms=sms, capability=cap, **tuning)

    if plan.path == "dequant":
        w_t = dequantize(qweight, scales, second, lut, bits=bits, layout=layout, mode=mode, group_size=group_size,
                         in_features=K, g_idx=g_idx, default_order=not act, dtype=x.dtype,
                         block_n=plan.block_n, block_r=plan.block_r)
        if bias is not None:
            return torch.addmm(bias.to(x.dtype), x, w_t, out=out)
        return torch.mm(x, w_t, out=out)

    if plan.atomic:  # split-K partial sums meet in float32
        acc = out.zero_() if x.dtype == torch.float32 else torch.zeros(M, N, device=x.device, dtype=torch.float32)
    else:
        acc = out
    # Stand-in pointers for arguments the kernel never reads (no allocation, no launch).
    s2 = second if second is not None else scales
    b = bias if bias is not None else scales
    gidx = _gidx_arg(g_idx, K, gs, plan.group_mode, x.device)
    gidx = qweight if gidx is None else gidx
    _launch(
        _afpq_mm_kernel, plan.grid,
        x, qweight, scales, s2, gidx, lut, b, acc,
        M, N, K // _geometry(bits, layout)[0], plan.iters_per_split,
        x.stride(0), x.stride(1), qweight.stride(0), qweight.stride(1),
        scales.stride(0), scales.stride(1), acc.stride(0), acc.stride(1),
        **mm_constexprs(plan, bits=bits, layout=layout, mode=mode, group_size=group_size, K=K,
                        has_bias=bias is not None, dtype=x.dtype),
        num_warps=plan.num_warps, num_stages=plan.num_stages,
    )
    if acc is not out:
        out.copy_(acc)
    return out


_TL_NAME = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
#: Shared memory per block that a kernel may use, by compute capability major.
SHARED_LIMIT = {8: 166912, 9: 232448}


def aot_compile(
    plan: MatmulPlan, *, bits: int, layout: str, mode: str, group_size: int, K: int, has_bias: bool = True,
    dtype: torch.dtype = torch.float16, scale_dtype: torch.dtype = torch.float16,
    capability: Tuple[int, int] = (9, 0),
):
    """Compile the kernel ``plan`` launches for ``sm_{capability}`` without a GPU.

    Runs Triton's whole pipeline down to a cubin with its bundled ``ptxas``, for
    contiguous operands (unit strides specialised as at run time): a check of the
    compiled path on CPU-only machines, and a way to read register and shared-memory
    use (``.metadata.shared``, ``.asm``). Needs the module built without TRITON_INTERPRET.
    """
    if INTERPRET:
        raise RuntimeError("aot_compile needs the kernels built without TRITON_INTERPRET")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    cpb, wpb = _geometry(bits, layout)
    st = _TL_NAME[scale_dtype]
    gs = K if group_size == -1 else group_size
    if plan.path == "dequant":
        kernel = _afpq_dequant_kernel
        ptrs = dict(qw_ptr="i32", s1_ptr=st, s2_ptr=st, gidx_ptr="i32", lut_ptr="fp32", out_ptr=_TL_NAME[dtype])
        const = dict(stride_qn=1, stride_sn=1, stride_on=1, AWQ=layout == "awq", BITS=bits, CPB=cpb, WPB=wpb,
                     MODE=_MODE_ID[mode], GROUP_MODE=plan.group_mode, GROUP_SIZE=gs,
                     BLOCK_N=plan.block_n, BLOCK_R=plan.block_r)
    else:
        kernel = _afpq_mm_kernel
        ptrs = dict(x_ptr=_TL_NAME[dtype], qw_ptr="i32", s1_ptr=st, s2_ptr=st, gidx_ptr="i32", lut_ptr="fp32",
                    bias_ptr=st, out_ptr="fp32" if plan.atomic else _TL_NAME[dtype])
        const = dict(stride_xk=1, stride_qn=1, stride_sn=1, stride_on=1)
        const.update(mm_constexprs(plan, bits=bits, layout=layout, mode=mode, group_size=group_size, K=K,
                                   has_bias=has_bias, dtype=dtype))
    signature, attrs = {}, {}
    for i, name in enumerate(kernel.arg_names):
        if name in const:
            signature[name] = "constexpr"
        elif name in ptrs:
            signature[name] = "*" + ptrs[name]
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            signature[name] = "i32"
    target = GPUTarget("cuda", capability[0] * 10 + capability[1], 32)
    return triton.compile(ASTSource(kernel, signature, const, attrs), target=target,
                          options={"num_warps": plan.num_warps, "num_stages": plan.num_stages})


# --------------------------------------------------------------------------------------
# Layer entry points
# --------------------------------------------------------------------------------------

# layer -> (weakref to its g_idx tensor, that tensor's version, default order?)
_ORDER_CACHE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _default_order(layer) -> bool:
    """``layer.has_default_order()`` (plus a range check of ``g_idx``), cached until
    ``g_idx`` is replaced or written to: the check is a host sync."""
    g = layer.g_idx
    if g is None:
        return True
    hit = _ORDER_CACHE.get(layer)
    if hit is not None and hit[0]() is g and hit[1] == g._version:
        return hit[2]
    K = layer.in_features
    value = _inspect_g_idx(g, K, K if layer.group_size == -1 else layer.group_size)
    _ORDER_CACHE[layer] = (weakref.ref(g), g._version, value)
    return value


def _layer_args(layer, device):
    return dict(
        bits=layer.bits, layout=layer.layout, mode=layer.mode, group_size=layer.group_size,
        g_idx=layer.g_idx, default_order=_default_order(layer),
    ), layer.fmt.lut(layer.mode, device)


def linear(x: torch.Tensor, layer, **overrides) -> torch.Tensor:
    """Same contract as :func:`afpq_plugins.kernels.torch_ref.linear`: ``x`` ``[..., in]``
    -> ``[..., out]`` in ``x.dtype``. Activation dtypes other than fp16/bf16/fp32 fall
    back to the torch reference. ``overrides`` go to :func:`afpq_matmul`."""
    if x.shape[-1] != layer.in_features:
        raise ValueError(f"AFPQLinear: input has {x.shape[-1]} features, the layer expects {layer.in_features}")
    if x.dtype not in _DTYPES:
        from . import torch_ref

        return torch_ref.linear(x, layer)
    x2 = x.reshape(-1, layer.in_features)
    kw, lut = _layer_args(layer, x.device)
    out = afpq_matmul(x2, layer.qweight, layer.scales, layer.second, lut, bias=layer.bias, **kw, **overrides)
    return out.reshape(*x.shape[:-1], layer.out_features)


def dequantize_layer(layer, dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """``W.T`` (``[in, out]``) of an AFPQLinear, decoded by the Triton dequantize kernel."""
    kw, lut = _layer_args(layer, layer.qweight.device)
    return dequantize(layer.qweight, layer.scales, layer.second, lut, in_features=layer.in_features,
                      dtype=dtype, **kw)
