"""CUDA register-table GEMV for AFPQ layers, M = 1..8 (decode and small batches).

``y = x @ W.T (+ bias)`` straight from the packed codes, one launch (two with act-order):
per (output column, group) the ``2**bits`` decoded values (core's float32 decode, rounded
once to the activation dtype) are built in registers as fp16/bf16 byte planes, and every
4-bit word decodes with PTX ``prmt`` byte permutes (21 integer instructions per 8 codes; the
device code and its design are in :mod:`.source`, the host planning and repack in
:mod:`.planning`, a bit-exact numpy model in :mod:`.prmt_model`). The source is compiled at
first use by NVRTC (:mod:`.nvrtc`; no extension build, no CUDA toolkit) and the cubin cached
per source hash and architecture.

Covers: gptq 4 bits as stored, awq 4 bits, gptq 3 bits (repacked once), act-order ``g_idx``
(inputs sorted by group once, ``x`` gathered per call), modes afpq / sym / zp, any group size,
fp16 and bf16 activations, scales in fp16 / bf16 / fp32, float32 accumulation across chains
and groups, a deterministic in-block K reduction (CUDA-graph replay == eager bit for bit).
Everything else is declined by :func:`can_implement` with the reason (the registry falls back).

API (``layer`` is anything with :class:`~afpq_plugins.nn.AFPQLinear`'s attributes):

``can_implement(x, layer) -> (ok, reason)``  cheap, no host sync
``prepare(layer) -> Prepared``              the one-time plan + repack (cache it on the layer)
``linear(x, layer, prepared=None, out=None) -> y``  the forward (prepares and caches when not given)
``register()`` / ``unregister()``           add / remove the ``cuda`` kernel (priority 150) in the registry

A compile or module-load failure at a first call through the registry disables the kernel for
the process (one warning; ``can_implement`` then gives the reason) and that call runs the torch
path.

Environment: ``AFPQ_CUDA_CACHE`` (cubin cache directory), ``AFPQ_NVRTC`` (libnvrtc path),
``AFPQ_CUDA_SLICES`` (force the K-slices per block: 1, 2, 4, 8 or 16; tuning).
"""

from __future__ import annotations

import functools
import os
import threading
import weakref
from typing import Dict, Optional, Tuple

import torch

from . import nvrtc, planning, source
from .planning import Prepared, layer_key

__all__ = ["MAX_M", "MIN_CAPABILITY", "why_not", "can_implement", "prepare", "get_prepared", "linear", "apply", "register",
           "unregister", "Prepared", "kernel_source", "launch_config"]

MAX_M = source.MAX_M
#: ``cvt.rn.f16x2.f32`` / ``bf16x2`` and ``fma.rn.bf16x2`` need sm_80.
MIN_CAPABILITY = (8, 0)
_ACT = {torch.float16: False, torch.bfloat16: True}


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> Tuple[int, int]:
    return torch.cuda.get_device_capability(index)


@functools.lru_cache(maxsize=None)
def _sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


@functools.lru_cache(maxsize=None)
def _nvrtc_ok() -> Tuple[bool, str]:
    return nvrtc.available()


def why_not(m: int, dtype: torch.dtype, layer) -> str:
    """The device-independent part of :func:`can_implement`: "" when an ``m``-row call with
    ``dtype`` activations is covered, else the reason."""
    if dtype not in _ACT:
        return f"activations in {dtype} (float16 or bfloat16 only)"
    if m > MAX_M:
        return f"M = {m} rows > {MAX_M} (the GEMV is for decode batches; larger M: dequantize + cuBLAS)"
    if layer.bits not in (3, 4):
        return f"{layer.bits}-bit codes (3 or 4 only)"
    if layer.layout not in ("gptq", "awq"):
        return f"layout {layer.layout!r}"
    if layer.mode not in planning.MODES:
        return f"mode {layer.mode!r}"
    if layer.scales.dtype not in planning.SCALE_TYPES:
        return f"scales in {layer.scales.dtype} (float16, bfloat16 or float32 only)"
    second = layer.second
    if second is not None and second.dtype not in planning.SCALE_TYPES:
        return f"second group parameter in {second.dtype}"
    return ""


def can_implement(x: torch.Tensor, layer) -> Tuple[bool, str]:
    """Whether :func:`linear` runs ``layer(x)``, and why not. No host sync, no compile."""
    if not x.is_cuda:
        return False, "input is not on a CUDA device"
    K = layer.in_features
    if x.shape[-1] != K:
        return False, f"input has {x.shape[-1]} features, the layer {K}"
    why = why_not(x.numel() // K if K else 0, x.dtype, layer)
    if why:
        return False, why
    if layer.qweight.device != x.device:
        return False, f"weights on {layer.qweight.device}, input on {x.device}"
    if x.requires_grad and torch.is_grad_enabled():
        return False, "input requires grad (the CUDA GEMV has no backward)"
    cap = _capability(x.device.index if x.device.index is not None else torch.cuda.current_device())
    if cap < MIN_CAPABILITY:
        return False, f"compute capability {cap[0]}.{cap[1]} < 8.0"
    ok, why = _nvrtc_ok()
    if not ok:
        return False, why
    if _BROKEN:
        return False, _BROKEN["why"]
    return True, ""


def prepare(layer) -> Prepared:
    """Plan and repack ``layer`` once (see :mod:`.planning` for the layouts).

    Memory held by the result beyond the layer's own buffers (``Prepared.extra_bytes``):
    nothing for gptq 4-bit in the default order with a group size that is a multiple of 8
    (``qweight`` is used as stored); one copy of the codes (the size of ``qweight``, plus the
    group padding, if any) for awq, 3 bits, act-order or other group sizes, plus ``4 K``
    bytes of input map with act-order / padding (and ``2 M K`` bytes of gathered
    activations per call); ``4 N`` bytes of float32 bias. Scales are read in place.
    One host sync (the ``g_idx`` check)."""
    return planning.prepare_buffers(layer)


_ATTR = "_afpq_cuda_prepared"
_SIDE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def get_prepared(layer) -> Prepared:
    """The layer's cached :class:`Prepared`, rebuilt when its buffers change."""
    prep = getattr(layer, _ATTR, None)
    if prep is None:
        try:
            prep = _SIDE.get(layer)
        except TypeError:
            prep = None
    if prep is not None and prep.key == layer_key(layer):
        return prep
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        raise RuntimeError("AFPQ CUDA GEMV: run the layer once eagerly before capturing a CUDA graph (warm-up)")
    prep = prepare(layer)
    try:
        object.__setattr__(layer, _ATTR, prep)
    except (AttributeError, TypeError):
        _SIDE[layer] = prep
    return prep


def kernel_source(prep: Prepared, bf16: bool, m: int) -> str:
    ch = prep.plan.ch(m, bf16)
    return source.render(bits=prep.plan.bits, mode=prep.mode, bf16=bf16, s1t=prep.s1t, s2t=prep.s2t, ch=ch,
                         chain=planning.chain_codes(prep.plan.bits, bf16, ch), grid=prep.grid)


def launch_config(prep: Prepared, m: int, sms: int) -> Tuple[Tuple[int, int, int], Tuple[int, int, int], int, int]:
    """(grid, block, shared bytes, K-slices) of an M-row call."""
    ks = planning.slices(prep.out_features, prep.plan.units, sms, m)
    force = os.environ.get("AFPQ_CUDA_SLICES")
    if force:
        ks = max(1, min(source.max_threads(m) // 32, int(force)))
    return (-(-prep.out_features // 32), 1, 1), (32 * ks, 1, 1), ks * m * 32 * 4, ks


_MODULES: Dict[Tuple[str, int], nvrtc.Module] = {}
_LOCK = threading.Lock()


def _module(src: str, device_index: int) -> nvrtc.Module:
    key = (src, device_index)
    mod = _MODULES.get(key)
    if mod is None:
        with _LOCK:
            mod = _MODULES.get(key)
            if mod is None:
                if torch.cuda.is_current_stream_capturing():
                    raise RuntimeError("AFPQ CUDA GEMV: compile happens at the first eager call; run the layer once "
                                       "eagerly with this batch size and dtype before capturing a CUDA graph")
                image, _ = nvrtc.compile_for_device(src, _capability(device_index))
                mod = _MODULES[key] = nvrtc.Module(image, device_index)
    return mod


_ARGS = threading.local()


def _launcher(kind: str) -> nvrtc.Launch:
    la = getattr(_ARGS, kind, None)
    if la is None:
        la = nvrtc.Launch(("pppppp" + "iiiiii") if kind == "gemv" else ("ppp" + "iii"))
        setattr(_ARGS, kind, la)
    return la


def linear(x: torch.Tensor, layer, prepared: Optional[Prepared] = None,
           out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``layer(x)`` (``x`` ``[..., in]`` fp16/bf16 on CUDA, at most 8 rows) -> ``[..., out]`` in
    ``x.dtype``; ``out`` (contiguous, ``[M, out]`` or ``[..., out]``, ``x.dtype``) receives it."""
    prep = prepared if prepared is not None else get_prepared(layer)
    K, N = prep.in_features, prep.out_features
    lead = x.shape[:-1]
    x2 = x.reshape(-1, K)
    M = x2.shape[0]
    if M > MAX_M:
        raise ValueError(f"AFPQ CUDA GEMV: {M} rows > {MAX_M}")
    if out is None:
        y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    else:
        if out.numel() != M * N or out.dtype != x.dtype or out.device != x.device or not out.is_contiguous():
            raise ValueError(f"out must be a contiguous {x.dtype} tensor of {M} x {N} on {x.device}")
        y = out.view(M, N)
    if M == 0:
        return y.reshape(*lead, N) if out is None else out
    bf16 = _ACT[x.dtype]
    if not x2.is_contiguous() or x2.data_ptr() % 16:
        x2 = x2.contiguous() if not x2.is_contiguous() else x2.clone()
    dev = x.device.index if x.device.index is not None else torch.cuda.current_device()
    hit = prep.launches.get((dev, bf16, M))
    if hit is None:  # once per (device, dtype, M): render, compile or load, look up, plan the launch
        if prep.q.device != x.device:
            raise ValueError(f"AFPQ CUDA GEMV: input on {x.device}, weights on {prep.q.device}")
        mod = _module(kernel_source(prep, bf16, M), dev)
        grid, block, smem, _ = launch_config(prep, M, _sms(dev))
        hit = prep.launches[(dev, bf16, M)] = (mod.function(source.KERNEL_NAMES[M - 1]),
                                               mod.function(source.GATHER_NAME), grid, block, smem)
    func, gather, grid, block, smem = hit
    stream = torch.cuda.current_stream(x.device).cuda_stream
    xs = K
    if prep.kmap is not None:
        kp = prep.plan.kp
        xg = torch.empty(M, kp, dtype=x.dtype, device=x.device)
        g = _launcher("gather")
        for i, v in enumerate((x2.data_ptr(), prep.kmap.data_ptr(), xg.data_ptr(), M, kp, K)):
            g.set(i, v)
        g(gather, (-(-M * kp // 256), 1, 1), (256, 1, 1), 0, stream)
        x2, xs = xg, kp
    la = _launcher("gemv")
    vals = (prep.q.data_ptr(), prep.s1.data_ptr(), prep.s2.data_ptr(), x2.data_ptr(),
            prep.bias.data_ptr() if prep.bias is not None else None, y.data_ptr(),
            N, prep.plan.units, prep.plan.upg, prep.plan.bpu, xs, N)
    for i, v in enumerate(vals):
        la.set(i, v)
    la(func, grid, block, smem, stream)
    return y.reshape(*lead, N) if out is None else out


#: Set when a kernel source failed to compile or load: the registry then passes this kernel over
#: (with this reason) instead of failing every forward.
_BROKEN: Dict[str, str] = {}


def apply(x: torch.Tensor, layer) -> torch.Tensor:
    """The registry's entry: :func:`linear`; a compile / load failure disables the kernel for the
    process (one warning, the reason in ``explain``) and this call falls back to the torch path."""
    try:
        return linear(x, layer)
    except (nvrtc.CompileError, OSError) as exc:
        import warnings

        from .. import torch_ref

        _BROKEN["why"] = f"disabled after a failure: {type(exc).__name__}: {str(exc)[:200]}"
        warnings.warn(f"AFPQ CUDA GEMV {_BROKEN['why']}; using the torch path", RuntimeWarning, stacklevel=2)
        return torch_ref.linear(x, layer)


def register(priority: int = 150):
    """Register this kernel as ``cuda`` in :mod:`afpq_plugins.kernels` (chosen before Triton, 100)."""
    from .. import Kernel, register_kernel

    return register_kernel(Kernel("cuda", priority, can_implement, apply))


def unregister() -> None:
    """Remove the ``cuda`` kernel from the registry again (benchmarks, tests)."""
    from .. import _KERNELS, kernels

    _KERNELS.pop("cuda", None)
    kernels.cache_clear()
