"""The tile planner: which path, tiles, split-K, warps and stages a product gets.

Pure host code (no launch): :func:`plan_matmul` is cached, so the per-call cost on the
decode path is one dictionary lookup.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import triton

from .jit import MODE_ID

__all__ = ["PATHS", "GEMV_MAX_M", "DEQUANT_MIN_M", "MatmulPlan", "plan_matmul", "mm_constexprs",
           "geometry", "group_mode", "device_info"]

PATHS = ("auto", "gemv", "gemm", "dequant")
#: Largest M served by the split-K GEMV path (without CUDA: the interpreter).
GEMV_MAX_M = 16
#: Smallest M for which "auto" dequantizes once and calls cuBLAS (CUDA only). Measured on
#: an H200 (benchmarks/RESULTS.md, GPU): from M = 2 on, writing ``W.T`` once and calling
#: cuBLAS beat the fused tensor-core kernels at every LLaMA shape (M = 4/16: 1.1-1.9x;
#: M = 128: 4-16x), the fused kernels being bound by the per-weight decode instructions.
DEQUANT_MIN_M = 2


def geometry(bits: int, layout: str) -> Tuple[int, int]:
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


def device_info(device: torch.device) -> Tuple[int, Tuple[int, int]]:
    """(SM count, compute capability); the interpreter gets a nominal 4-SM sm_90."""
    if device.type != "cuda":
        return 4, (9, 0)
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _DEVICE_INFO:
        props = torch.cuda.get_device_properties(idx)
        _DEVICE_INFO[idx] = (props.multi_processor_count, (props.major, props.minor))
    return _DEVICE_INFO[idx]


def group_mode(group_size: int, cpb: int, block_r: int, act_order: bool) -> int:
    if act_order or group_size % cpb:
        return 2
    if group_size % (block_r * cpb) == 0:
        return 0
    return 1


@dataclass(frozen=True)
class MatmulPlan:
    """Everything a launch of :func:`~.jit.afpq_mm_kernel` (or the dequant path) depends on."""

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
    fold: bool = False  # single-row GEMV with the group parameters applied per K-tile
    prefetch: bool = False  # folded CUDA-core GEMV: next K-tile loaded ahead by hand

    @property
    def split(self) -> bool:
        """Split-K: partial tiles in a workspace, then :func:`~.jit.splitk_reduce_kernel`."""
        return self.split_k > 1


@functools.lru_cache(maxsize=4096)
def plan_matmul(
    M: int, N: int, K: int, *, bits: int, layout: str, group_size: int, act_order: bool = False,
    path: str = "auto", dtype: torch.dtype = torch.float16, on_cuda: bool = True, sms: int = 132,
    capability: Tuple[int, int] = (9, 0),
    block_m: Optional[int] = None, block_n: Optional[int] = None, block_r: Optional[int] = None,
    split_k: Optional[int] = None, num_warps: Optional[int] = None, num_stages: Optional[int] = None,
    fold: Optional[bool] = None, prefetch: Optional[bool] = None,
) -> MatmulPlan:
    """Choose path, tiles and split-K for an ``[M, K] x [K, N]`` product (keywords override).

    Tuned from the sweep of ``benchmarks/gpu_check.py`` on an H200 (LLaMA-7B/13B/70B
    shapes, group 128; figures in benchmarks/RESULTS.md, GPU): M = 1 runs the folded
    CUDA-core GEMV, 16 code blocks x 64 columns (32 when K > 4096) per step, unpipelined,
    not prefetched, split K to about 8 programs per SM (3 bits: 128 columns, up to 32
    splits); other M on
    CUDA dequantize once and call cuBLAS. Forced ``gemv`` (2..16 rows) uses 16 x 128
    tensor-core tiles, unpipelined (pipelining turns the table gathers into async copies
    through shared memory: more instructions); forced ``gemm`` 32 x 128 tiles up to M =
    128. Without CUDA (interpreter) "auto" keeps gemv / gemm. Retune with
    ``python3 benchmarks/gpu_check.py`` (its sweep section).
    """
    if path not in PATHS:
        raise ValueError(f"unknown path {path!r}; choose one of {', '.join(PATHS)}")
    cpb, _ = geometry(bits, layout)
    gs = K if group_size == -1 else group_size
    awq = layout == "awq"
    if path == "auto":
        if M >= DEQUANT_MIN_M and on_cuda:
            path = "dequant"
        elif M <= GEMV_MAX_M:
            path = "gemv"
        else:
            path = "gemm"
    R = K // cpb
    if path == "dequant":
        br = block_r or (32 if awq else max(1, 128 // cpb))
        bn = block_n or 64
        return MatmulPlan("dequant", 0, bn, br, False, group_mode(gs, cpb, br, act_order), 1, 0,
                          num_warps or 4, num_stages or 1, (triton.cdiv(R, br), triton.cdiv(N, bn)))
    three_bit = bits == 3 and not awq
    if path == "gemv" and (block_m or (1 if M == 1 else 16)) < 16:
        # CUDA-core FMAs (M == 1 by default; block_m < 16 forces it for tiny M).
        bm, use_dot = block_m or 1, False
        bn = 128 if three_bit else 64 if K <= 4096 else 32
        br = 32 if awq else max(1, 128 // cpb)  # 128 input columns per iteration (gptq)
        warps, stages = 4, 1
    elif path == "gemv":
        bm, bn, use_dot = 16, 128 if N >= 128 else 64, True
        br = 32 if awq else max(16, 128 // cpb)  # tl.dot needs K >= 16
        warps, stages = 4, 1
    elif dtype == torch.float32:  # exact fp32 dot (FMA loops): small tiles or it spills
        bm, bn, br = 32, 64, 32 if awq else 16
        warps, stages = 4, 2
    else:
        bm = 32 if M <= 128 else 64 if (M <= 256 or capability[0] < 9) else 128
        bn = 64 if (N < 128 or three_bit) else 128
        # Mid-size M: smaller tiles before leaving SMs idle (measured: not below 32 x 128).
        while (triton.cdiv(M, bm) * triton.cdiv(N, bn) < sms and max(bm, bn) > 64 and bm > 32
               and not (block_m or block_n)):
            if bm >= bn:
                bm //= 2
            else:
                bn //= 2
        br = 32 if awq else 16
        warps = 8 if bm * bn >= 32 * 128 else 4
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
        # Too few tiles to keep every SM streaming weights: split K (partials + a reduction).
        if path == "gemv" and tiles < 8 * sms:
            split_k = min(triton.cdiv(16 * sms, tiles), 32) if three_bit else min(triton.cdiv(8 * sms, tiles), 8)
        elif path == "gemm" and tiles < sms:
            split_k = min(triton.cdiv(2 * sms, tiles), 4)
    split_k = max(1, min(int(split_k), n_iters))
    per_split = triton.cdiv(n_iters, split_k)
    split_k = triton.cdiv(n_iters, per_split)  # no empty splits
    gmode = group_mode(gs, cpb, br, act_order)
    can_fold = path == "gemv" and (gmode == 0 and dtype != torch.float32 if use_dot else bm == 1 and gmode != 2)
    if fold and not can_fold:
        raise ValueError("fold needs the gemv path, no act-order, and on tensor cores fp16/bf16 activations with "
                         "one group per K-tile (block_r * codes per block dividing the group size)")
    fold = can_fold if fold is None else fold
    # Hand prefetching measured neutral to 15 % slower on the H200 (the loop is bound by
    # decode instructions, not load latency): off unless asked for.
    prefetch = bool(prefetch and fold and not use_dot)
    return MatmulPlan(path, bm, bn, br, use_dot, gmode, split_k, per_split, warps, stages, (tiles, split_k), fold,
                      prefetch)


def mm_constexprs(plan: MatmulPlan, *, bits: int, layout: str, mode: str, group_size: int, K: int,
                  has_bias: bool, dtype: torch.dtype) -> dict:
    """The compile-time arguments of :func:`~.jit.afpq_mm_kernel` for ``plan``."""
    cpb, wpb = geometry(bits, layout)
    return dict(
        AWQ=layout == "awq", BITS=bits, CPB=cpb, WPB=wpb, MODE=MODE_ID[mode], GROUP_MODE=plan.group_mode,
        GROUP_SIZE=K if group_size == -1 else group_size, HAS_BIAS=has_bias, USE_DOT=plan.use_dot,
        IEEE=dtype == torch.float32, SPLIT=plan.split, FOLD=plan.fold,
        PREFETCH=plan.prefetch,
        BLOCK_M=plan.block_m, BLOCK_N=plan.block_n,
        BLOCK_R=plan.block_r, GROUP_M=8,
    )

