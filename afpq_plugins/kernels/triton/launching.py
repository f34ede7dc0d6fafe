"""Host side: argument checks, launches, and the layer entry points.

:func:`afpq_matmul` (raw buffers) and :func:`linear` (an ``AFPQLinear``-like layer) run
``x @ W.T (+ bias)``; :func:`dequantize` / :func:`dequantize_layer` write ``W.T``. On the
decode path (M = 1) a call is one or two kernel launches with no host sync and no
allocation besides its output: the plan is cached, the default-order answer for ``g_idx``
is cached per layer, and split-K partial tiles go to a per-device workspace
(:func:`_gemv_workspace`) that a second small kernel sums in a fixed order (two launches,
deterministic), so the call can be captured in a CUDA graph once it has run eagerly
(warm-up) for that shape.
"""

from __future__ import annotations

import weakref
from typing import Dict, List, Optional, Tuple

import torch
import triton

from ...core.packing import packed_shape
from .jit import INTERPRET, MODE_ID, afpq_dequant_kernel, afpq_mm_kernel, splitk_reduce_kernel
from .planning import device_info, geometry, mm_constexprs, plan_matmul

__all__ = ["afpq_matmul", "dequantize", "linear", "dequantize_layer"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _check_tensors(x, qweight, scales, second, lut, bits, layout, mode, group_size, g_idx, bias):
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D [M, in], got shape {tuple(x.shape)}")
    if x.dtype not in _DTYPES:
        raise TypeError(f"x must be float16, bfloat16 or float32, got {x.dtype}")
    if mode not in MODE_ID:
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
    kernel[grid](*args, **kwargs)




# (lut pointer, mode, device) -> (lut kept alive, its version, lut2)
_LUT2: Dict[tuple, Tuple[torch.Tensor, int, torch.Tensor]] = {}


def _lut2(lut: torch.Tensor, mode: str, dtype: torch.dtype) -> torch.Tensor:
    """The folded GEMV's table, built on the device from ``lut`` and cached: per code two
    values, float32 bit patterns in one int64 (``dtype`` float32, ``jit._folded_tile``) or
    fp16/bf16 ones in one int32 (``jit._folded_dot_tile``)."""
    key = (lut.data_ptr(), mode, lut.device, dtype)
    hit = _LUT2.get(key)
    if hit is not None and hit[1] == lut._version:
        return hit[2]
    if lut.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        raise RuntimeError("AFPQ Triton GEMV: run the layer once eagerly before capturing a CUDA graph (warm-up)")
    v = lut.float()
    zero = torch.zeros_like(v)
    if mode == "afpq":
        lo, hi = torch.where(v > 0, v, zero), torch.where(v > 0, zero, v)
    elif mode == "sym":
        lo, hi = v, zero
    else:
        lo, hi = v, torch.ones_like(v)
    pair = torch.stack([lo, hi], -1).to(dtype).contiguous()
    lut2 = pair.view(torch.int64 if dtype == torch.float32 else torch.int32).reshape(-1)
    _LUT2[key] = (lut, lut._version, lut2)
    return lut2


# device -> float32 workspaces, the last one the largest
_WORKSPACES: Dict[torch.device, List[torch.Tensor]] = {}


def _gemv_workspace(device: torch.device, numel: int) -> torch.Tensor:
    """A float32 workspace of at least ``numel`` elements for split-K GEMVs, shared by every
    layer on ``device`` (launches on one stream run one after the other; every element a
    launch reads was written by it). Outgrown buffers are kept, never freed: a captured
    CUDA graph may still point at them. Allocating inside a capture is refused (warm-up)."""
    entries = _WORKSPACES.setdefault(device, [])
    if entries and entries[-1].numel() >= numel:
        return entries[-1]
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            f"AFPQ Triton GEMV: no split-K workspace of {numel} floats yet on {device}; run the layer once "
            "eagerly with this batch size before capturing a CUDA graph (warm-up)")
    ws = torch.empty(max(numel, 1 << 16), device=device, dtype=torch.float32)
    entries.append(ws)
    return ws


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
    cpb, wpb = geometry(bits, layout)
    s2 = second if second is not None else scales
    gidx = _gidx_arg(g_idx, K, gs, plan.group_mode, qweight.device)
    gidx = qweight if gidx is None else gidx
    _launch(
        afpq_dequant_kernel, plan.grid,
        qweight, scales, s2, gidx, lut, out, N, K // cpb,
        qweight.stride(0), qweight.stride(1), scales.stride(0), scales.stride(1), out.stride(0), out.stride(1),
        AWQ=layout == "awq", BITS=bits, CPB=cpb, WPB=wpb, MODE=MODE_ID[mode], GROUP_MODE=plan.group_mode,
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
    sms, cap = device_info(x.device)
    plan = plan_matmul(M, N, K, bits=bits, layout=layout, group_size=group_size, act_order=act, path=path,
                       dtype=x.dtype, on_cuda=x.is_cuda, sms=sms, capability=cap, **tuning)

    if plan.path == "dequant":
        w_t = dequantize(qweight, scales, second, lut, bits=bits, layout=layout, mode=mode, group_size=group_size,
                         in_features=K, g_idx=g_idx, default_order=not act, dtype=x.dtype,
                         block_n=plan.block_n, block_r=plan.block_r)
        if bias is not None:
            return torch.addmm(bias.to(x.dtype), x, w_t, out=out)
        return torch.mm(x, w_t, out=out)

    lut2 = _lut2(lut, mode, x.dtype if plan.use_dot else torch.float32) if plan.fold else lut
    if not plan.split:
        ws = out  # stand-in, never read
    elif plan.path == "gemv":  # the decode path: a reused buffer
        ws = _gemv_workspace(x.device, plan.split_k * M * N)
    else:
        ws = torch.empty(plan.split_k * M * N, device=x.device, dtype=torch.float32)
    # Stand-in pointers for arguments the kernel never reads (no allocation, no launch).
    s2 = second if second is not None else scales
    b = bias if bias is not None else scales
    gidx = _gidx_arg(g_idx, K, gs, plan.group_mode, x.device)
    gidx = qweight if gidx is None else gidx
    _launch(
        afpq_mm_kernel, plan.grid,
        x, qweight, scales, s2, gidx, lut, lut2, b, out, ws,
        M, N, K // geometry(bits, layout)[0], plan.iters_per_split,
        x.stride(0), x.stride(1), qweight.stride(0), qweight.stride(1),
        scales.stride(0), scales.stride(1), out.stride(0), out.stride(1),
        **mm_constexprs(plan, bits=bits, layout=layout, mode=mode, group_size=group_size, K=K,
                        has_bias=bias is not None, dtype=x.dtype),
        num_warps=plan.num_warps, num_stages=plan.num_stages,
    )
    if plan.split:
        _launch(splitk_reduce_kernel, (triton.cdiv(M * N, _REDUCE_BLOCK),), ws, b, out, M, N, plan.split_k,
                out.stride(0), out.stride(1), HAS_BIAS=bias is not None, BLOCK=_REDUCE_BLOCK, num_warps=4)
    return out


_REDUCE_BLOCK = 512




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
        from .. import torch_ref

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
