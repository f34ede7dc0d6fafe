"""Kernel registry and dispatch for AFPQ linear layers: the one place that chooses a kernel.

A *kernel* is a :class:`Kernel` entry: a name, a priority, ``can_implement(x, layer) ->
(ok, reason)`` and ``apply(x, layer) -> y``. ``layer`` is anything with the attributes of
:class:`~afpq_plugins.nn.AFPQLinear` (``qweight``, ``scales``, ``second``, ``g_idx``, ``bias``,
``fmt``, ``bits``, ``mode``, ``layout``, ``group_size``, ``in_features``, ``out_features``,
``has_default_order()``), so other engines (vLLM) can pass a light view of their parameters.

:func:`choose_kernel` walks the registered kernels in priority order (highest first) and
returns the first that can run the call, with the reason each one before it was passed over
(the idea of vLLM's ``MPLinearKernel`` chooser). The choice can be forced by the layer's
``backend`` attribute (not ``"auto"``) or the ``AFPQ_KERNEL`` environment variable; a forced
kernel that cannot run the call is an error that says why. ``torch`` (reference LUT
dequantize + matmul) runs everything and is always last.

Chosen once: :func:`prepare` makes the choice for one layer and one kind of call (input
device and dtype, whether autograd needs a backward, the forced name, on CUDA whether the
batch is a small one) and caches it on the layer, so a forward does no registry work after
the first; :func:`afpq_linear` goes through it. The cache is dropped when the registry
changes (:func:`register_kernel`) and when an :class:`~afpq_plugins.nn.AFPQLinear` moves
(``.to()``) or gets new buffers (:meth:`~afpq_plugins.nn.AFPQLinear.invalidate`). What a
kernel derives from the weights (the native CPU kernel's repacked codes) is its own cache,
checked against in-place edits of the buffers.

Registering a new kernel is one :func:`register_kernel` call in this module's
``_register_builtin`` (built-in) or from the kernel's own module.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch

from . import torch_ref

__all__ = ["Kernel", "register_kernel", "kernels", "choose_kernel", "prepare", "explain", "afpq_linear",
           "SMALL_M"]

Check = Callable[[torch.Tensor, object], Tuple[bool, str]]
Apply = Callable[[torch.Tensor, object], torch.Tensor]
Runner = Callable[[torch.Tensor], torch.Tensor]
Bind = Callable[[torch.Tensor, object], Runner]


@dataclass(frozen=True)
class Kernel:
    name: str
    priority: int
    can_implement: Check
    apply: Apply
    #: Optional ``bind(x, layer) -> run(x)``: the kernel's per-layer preparation (repack, settings)
    #: done once; ``run`` is cached with the choice and called on every forward of that kind.
    bind: Optional[Bind] = None

    def runner(self, x: torch.Tensor, layer) -> Runner:
        if self.bind is not None:
            return self.bind(x, layer)
        apply = self.apply
        return lambda x: apply(x, layer)


_KERNELS: Dict[str, Kernel] = {}
#: Bumped by every registry change: choices cached on layers under an older value are stale.
_GENERATION = [0]
#: On CUDA, batches of at most this many rows are a separate kind of call (decode kernels).
SMALL_M = 8
_CACHE_ATTR = "_afpq_kernel_choice"


def register_kernel(kernel: Kernel) -> Kernel:
    """Add (or replace, same name) a kernel. Idempotent."""
    _KERNELS[kernel.name] = kernel
    kernels.cache_clear()
    _GENERATION[0] += 1
    return kernel


@functools.lru_cache(maxsize=None)
def kernels() -> Tuple[Kernel, ...]:
    """Registered kernels, highest priority first."""
    _register_builtin()
    return tuple(sorted(_KERNELS.values(), key=lambda k: -k.priority))


def _requested(layer) -> str:
    choice = getattr(layer, "backend", "auto") or "auto"
    if choice == "auto":
        choice = os.environ.get("AFPQ_KERNEL", "auto")
    choice = choice.lower()
    names = [k.name for k in kernels()]
    if choice != "auto" and choice not in names:
        raise ValueError(f"unknown AFPQ kernel {choice!r}; choose one of auto, {', '.join(names)}")
    return choice


def choose_kernel(x: torch.Tensor, layer) -> Tuple[Kernel, List[Tuple[str, str]]]:
    """The kernel that runs ``layer(x)``, and ``[(name, why not)]`` for those passed over."""
    choice = _requested(layer)
    skipped: List[Tuple[str, str]] = []
    for k in kernels():
        if choice != "auto" and k.name != choice:
            continue
        ok, why = k.can_implement(x, layer)
        if ok:
            return k, skipped
        if choice != "auto":
            raise RuntimeError(f"AFPQ kernel {choice!r} was requested but cannot run this layer: {why}")
        skipped.append((k.name, why))
    raise RuntimeError("no AFPQ kernel can run this layer: " + "; ".join(f"{n}: {w}" for n, w in skipped))


def explain(x: torch.Tensor, layer) -> str:
    """One line: which kernel runs ``layer(x)`` and why the others were passed over."""
    k, skipped = choose_kernel(x, layer)
    why = "".join(f"; {n} passed over: {w}" for n, w in skipped)
    return f"{k.name}{why}"


#: Environment variables a cached choice (or a kernel's bound settings) depends on (and torch's
#: float32 matmul precision, which the native CPU kernel follows for large float32 batches).
_ENV = ("AFPQ_KERNEL", "AFPQ_CPU_ISA", "AFPQ_CPU_PREFILL")


def _call_key(x: torch.Tensor, layer) -> tuple:
    """What the choice depends on besides the layer's static description (the weights' device
    is part of it through ``.to()``, which drops the cache)."""
    small = x.numel() <= SMALL_M * layer.in_features if x.is_cuda else None
    env = os.environ
    return (_GENERATION[0], x.device, x.dtype, x.requires_grad and torch.is_grad_enabled(),
            getattr(layer, "backend", "auto"), env.get(_ENV[0]), env.get(_ENV[1]), env.get(_ENV[2]), small,
            torch.get_float32_matmul_precision())


def _cached(x: torch.Tensor, layer) -> Tuple[Kernel, Runner]:
    d = getattr(layer, "__dict__", None)
    cache = d.get(_CACHE_ATTR) if d is not None else None
    if cache is None:
        cache = {}
        try:
            object.__setattr__(layer, _CACHE_ATTR, cache)
        except (AttributeError, TypeError):  # a layer object without a writable __dict__: no cache
            pass
    key = _call_key(x, layer)
    hit = cache.get(key)
    if hit is None:
        k = choose_kernel(x, layer)[0]
        hit = cache[key] = (k, k.runner(x, layer))
    return hit


def prepare(x: torch.Tensor, layer) -> Kernel:
    """The kernel for ``layer(x)``, chosen once per kind of call and cached on the layer
    (with what the kernel prepared for it: see :attr:`Kernel.bind`)."""
    return _cached(x, layer)[0]


def invalidate(layer) -> None:
    """Forget the kernel choices cached on ``layer`` (its device or buffers changed)."""
    if hasattr(layer, "__dict__"):
        layer.__dict__.pop(_CACHE_ATTR, None)


def afpq_linear(x: torch.Tensor, layer) -> torch.Tensor:
    if x.shape[-1] != layer.in_features:
        raise ValueError(
            f"AFPQLinear: input has {x.shape[-1]} features, the layer expects {layer.in_features}"
        )
    return _cached(x, layer)[1](x)


# -- built-in kernels -------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _triton_linear():
    try:
        from .triton import linear as triton_linear  # optional backend
    except ImportError:
        return None
    return triton_linear


def _triton_can(x: torch.Tensor, layer) -> Tuple[bool, str]:
    if not x.is_cuda:
        # Triton's interpreter runs CPU tensors, far too slowly to be chosen automatically:
        # only when it is asked for by name (tests of the kernels on a CPU-only machine).
        # Checked before importing triton, so CPU forwards never pay that import.
        if not (os.environ.get("TRITON_INTERPRET") == "1" and _requested(layer) == "triton"):
            return False, "input is not on a CUDA device"
    if _triton_linear() is None:
        return False, "triton is not importable"
    return True, ""


def _cpu_can(x: torch.Tensor, layer) -> Tuple[bool, str]:
    from . import cpu  # builds the native kernel on first use

    return cpu.can_implement(x, layer)


def _cpu_apply(x: torch.Tensor, layer) -> torch.Tensor:
    from . import cpu

    return cpu.linear(x, layer)


def _cpu_bind(x: torch.Tensor, layer) -> Runner:
    from . import cpu

    return cpu.bind(x, layer)


def _cuda_can(x: torch.Tensor, layer) -> Tuple[bool, str]:
    if not x.is_cuda:  # checked before importing the module: CPU forwards never pay for it
        return False, "input is not on a CUDA device"
    from . import cuda

    return cuda.can_implement(x, layer)


def _cuda_apply(x: torch.Tensor, layer) -> torch.Tensor:
    from . import cuda

    return cuda.apply(x, layer)  # a compile failure disables it for the process and falls back


def _register_builtin() -> None:
    if "torch" in _KERNELS:
        return
    # CUDA register-table GEMV for M <= 8 (NVRTC, compiled at first use); Triton for the rest.
    _KERNELS["cuda"] = Kernel("cuda", 150, _cuda_can, _cuda_apply)
    _KERNELS["torch"] = Kernel("torch", 0, lambda x, layer: (True, ""), torch_ref.linear)
    # Native CPU kernel (C++, AVX-512/AVX2/portable); falls back to torch with one warning.
    _KERNELS["cpu"] = Kernel("cpu", 50, _cpu_can, _cpu_apply, _cpu_bind)
    _KERNELS["triton"] = Kernel("triton", 100, _triton_can, lambda x, layer: _triton_linear()(x, layer))
