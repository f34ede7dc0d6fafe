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

``gemv``     M <= 16: split-K over a 2-D grid ``(tiles, SPLIT_K)``. M <= 4 uses CUDA-core
             FMAs into a ``[BLOCK_M, BLOCK_R, BLOCK_N]`` float32 accumulator reduced once
             at the end (no tensor-core layout shuffles for a GEMV); 5..16 uses ``tl.dot``
             with ``BLOCK_M = 16``. With ``SPLIT_K > 1`` partial sums are added with
             float32 atomics into a zeroed float32 buffer (the output itself for fp32
             activations), then cast.
``gemm``     tiled ``tl.dot`` with grouped program ordering for L2 reuse.
``dequant``  very large M (compute bound): a Triton kernel writes ``W.T`` once in the
             activation dtype, then cuBLAS multiplies (``torch.addmm``).

Group parameters per K-tile: ``GROUP_MODE`` 0 = the whole tile lies in one group (one
``[BLOCK_N]`` load of each scale per iteration); 1 = the group depends on the code block
only (a ``[BLOCK_R, BLOCK_N]`` gather per iteration); 2 = per input column, read from
``g_idx`` (act-order; a gather per code position).

Importing this module raises :class:`ImportError` when Triton is missing or broken (the
dispatcher in :mod:`afpq_plugins.kernels` relies on that). Kernels are decorated at
import time, so ``TRITON_INTERPRET=1`` must be set before the import to run them on CPU
with Triton's interpreter.
"""

from __future__ import annotations

import contextlib
import math
import weakref
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
            xk = tl.load(x_ptr + offs_m[:, None] * stride_xm + k[None, :] * stride_xk,
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
    o_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
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
        tl.store(out_ptr + k[:, None] * stride_ok + offs_n[None, :] * stride_on,
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


_SM_COUNT = {}


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # interpreter: a nominal machine, so that heuristics stay exercised
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _group_mode(group_size: int, cpb: int, block_r: int, act_order: bool) -> int:
    if act_order or group_size % cpb:
        return 2
    if group_size % (block_r * cpb) == 0:
        return 0
    return 1


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
    block_n: int = 64,
    block_r: Optional[int] = None,
) -> torch.Tensor:
    """``W.T`` (``[in, out]``, ``dtype``) decoded by a Triton kernel (fp32 maths, one rounding)."""
    x_probe = torch.empty(0, in_features, device=qweight.device, dtype=dtype if dtype in _DTYPES else torch.float32)
    K, N, gs = _check_tensors(x_probe, qweight, scales, second, lut, bits, layout, mode, group_size, g_idx, None)
    cpb, wpb = _geometry(bits, layout)
    R = K // cpb
    if block_r is None:
        block_r = 32 if layout == "awq" else max(1, 128 // cpb)
    act = _act_order(g_idx, K, gs, default_order)
    gmode = _group_mode(gs, cpb, block_r, act)
    gidx = _gidx_arg(g_idx, K, gs, gmode, qweight.device)
    if out is None:
        out = torch.empty(K, N, device=qweight.device, dtype=dtype)
    elif out.shape != (K, N):
        raise ValueError(f"out shape {tuple(out.shape)} != ({K}, {N})")
    s2 = second if second is not None else scales
    grid = (triton.cdiv(R, block_r), triton.cdiv(N, block_n))
    _launch(
        _afpq_dequant_kernel, grid,
        qweight, scales, s2, gidx, lut, out, N, R,
        qweight.stride(0), qweight.stride(1), scales.stride(0), scales.stride(1), out.stride(0), out.stride(1),
        AWQ=layout == "awq", BITS=bits, CPB=cpb, WPB=wpb, MODE=_MODE_ID[mode], GROUP_MODE=gmode,
        GROUP_SIZE=gs, BLOCK_N=block_n, BLOCK_R=block_r, num_warps=4,
    )
    return out


def _act_order(g_idx, K: int, gs: int, default_order: Optional[bool]) -> bool:
    if g_idx is None:
        return False
    if default_order is None:  # one host sync; layer callers pass a cached answer
        ref = torch.arange(K, device=g_idx.device, dtype=g_idx.dtype) // gs
        default_order = bool(torch.equal(g_idx, ref))
    return not default_order


def _gidx_arg(g_idx, K: int, gs: int, gmode: int, device) -> torch.Tensor:
    if gmode == 2:
        if g_idx is None:  # default order with a group size that does not align with code blocks
            return torch.arange(K, device=device, dtype=torch.int32) // gs
        return g_idx
    # Unused by the kernel: any int32 tensor on the device stands in for the pointer.
    return g_idx if g_idx is not None else torch.zeros(1, device=device, dtype=torch.int32)


def _config(path: str, M: int, N: int, bits: int, layout: str, cpb: int):
    """(BLOCK_M, BLOCK_N, BLOCK_R, USE_DOT, num_warps, num_stages) defaults per path."""
    awq = layout == "awq"
    if path == "gemv":
        if M <= 4:
            block_r = 64 if awq else max(1, 128 // cpb)  # 128 input columns per iteration
            return _next_pow2(M), 64, block_r, False, 4, 3
        block_r = 64 if awq else max(16, 128 // cpb)  # tl.dot needs K >= 16
        return 16, 64, block_r, True, 4, 3
    block_m = 32 if M <= 32 else 64 if M <= 64 else 128
    block_n = 128 if N >= 128 else 64
    block_r = 64 if awq else 16
    warps = 8 if block_m * block_n >= 128 * 128 else 4
    return block_m, block_n, block_r, True, warps, 3


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
    block_m: Optional[int] = None,
    block_n: Optional[int] = None,
    block_r: Optional[int] = None,
    split_k: Optional[int] = None,
    num_warps: Optional[int] = None,
    num_stages: Optional[int] = None,
) -> torch.Tensor:
    """``x @ W.T (+ bias)`` from raw buffers; ``x`` is ``[M, in]``, the result ``[M, out]`` in ``x.dtype``.

    ``scales``/``second`` are ``[groups, out]`` (``second`` = s_neg for ``afpq``, the
    zero-points for ``zp``, ignored for ``sym``); ``lut`` is ``fmt.lut(mode, device)``
    (float32, ``2**bits`` entries). ``default_order`` tells whether ``g_idx`` is the plain
    ``i // group_size`` (None: checked here, one host sync). ``out`` (``[M, out]``,
    ``x.dtype``) receives the result. The remaining keywords override the heuristics.
    """
    K, N, gs = _check_tensors(x, qweight, scales, second, lut, bits, layout, mode, group_size, g_idx, bias)
    M = x.shape[0]
    if out is None:
        out = torch.empty(M, N, device=x.device, dtype=x.dtype)
    elif out.shape != (M, N) or out.dtype != x.dtype or out.device != x.device:
        raise ValueError(f"out must be [{M}, {N}] {x.dtype} on {x.device}")
    if M == 0:
        return out
    if path not in PATHS:
        raise ValueError(f"unknown path {path!r}; choose one of {', '.join(PATHS)}")
    if path == "auto":
        if M <= GEMV_MAX_M:
            path = "gemv"
        elif M >= DEQUANT_MIN_M and x.is_cuda:
            path = "dequant"
        else:
            path = "gemm"
    cpb, wpb = _geometry(bits, layout)
    R = K // cpb
    act = _act_order(g_idx, K, gs, default_order)

    if path == "dequant":
        w_t = dequantize(qweight, scales, second, lut, bits=bits, layout=layout, mode=mode, group_size=group_size,
                         in_features=K, g_idx=g_idx, default_order=not act, dtype=x.dtype)
        if bias is not None:
            return torch.addmm(bias.to(x.dtype), x, w_t, out=out)
        return torch.mm(x, w_t, out=out)

    bm, bn, br, use_dot, warps, stages = _config(path, M, N, bits, layout, cpb)
    bm = block_m or bm
    bn = block_n or bn
    br = block_r or br
    use_dot = bm >= 16 if block_m else use_dot
    warps = num_warps or warps
    stages = num_stages or stages
    if use_dot and (bm < 16 or bn < 16 or br < 16):
        raise ValueError(f"tl.dot tiles need BLOCK_M, BLOCK_N, BLOCK_R >= 16, got {bm}, {bn}, {br}")
    gmode = _group_mode(gs, cpb, br, act)
    gidx = _gidx_arg(g_idx, K, gs, gmode, x.device)

    tiles = triton.cdiv(M, bm) * triton.cdiv(N, bn)
    n_iters = triton.cdiv(R, br)
    if split_k is None:
        split_k = 1
        sms = _num_sms(x.device)
        if path == "gemv" and tiles < sms:
            split_k = min(triton.cdiv(2 * sms, tiles), n_iters, 16)
    split_k = max(1, min(int(split_k), n_iters))
    per_split = triton.cdiv(n_iters, split_k)
    split_k = triton.cdiv(n_iters, per_split)  # no empty splits
    atomic = split_k > 1
    if atomic:
        acc = out.zero_() if x.dtype == torch.float32 else torch.zeros(M, N, device=x.device, dtype=torch.float32)
    else:
        acc = out
    s2 = second if second is not None else scales
    b = bias if bias is not None else scales  # a stand-in pointer when HAS_BIAS is False
    _launch(
        _afpq_mm_kernel, (tiles, split_k),
        x, qweight, scales, s2, gidx, lut, b, acc,
        M, N, R, per_split,
        x.stride(0), x.stride(1), qweight.stride(0), qweight.stride(1),
        scales.stride(0), scales.stride(1), acc.stride(0), acc.stride(1),
        AWQ=layout == "awq", BITS=bits, CPB=cpb, WPB=wpb, MODE=_MODE_ID[mode], GROUP_MODE=gmode,
        GROUP_SIZE=gs, HAS_BIAS=bias is not None, USE_DOT=use_dot, IEEE=x.dtype == torch.float32,
        ATOMIC=atomic, BLOCK_M=bm, BLOCK_N=bn, BLOCK_R=br, GROUP_M=8,
        num_warps=warps, num_stages=stages,
    )
    if acc is not out:
        out.copy_(acc)
    return out


# --------------------------------------------------------------------------------------
# Layer entry points
# --------------------------------------------------------------------------------------

# layer -> (weakref to its g_idx tensor, that tensor's version, default order?)
_ORDER_CACHE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _default_order(layer) -> bool:
    """``layer.has_default_order()``, cached until ``g_idx`` is replaced or written to
    (its check is a host sync per call otherwise)."""
    g = layer.g_idx
    if g is None:
        return True
    hit = _ORDER_CACHE.get(layer)
    if hit is not None and hit[0]() is g and hit[1] == g._version:
        return hit[2]
    value = bool(layer.has_default_order())
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
