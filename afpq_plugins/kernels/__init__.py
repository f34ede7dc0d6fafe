"""Kernel dispatch for :class:`~afpq_plugins.nn.AFPQLinear`.

Backends: ``torch`` (reference LUT dequantize + matmul, any device) and, on CUDA,
fused Triton kernels where available. The choice is, in order: the layer's
``backend`` attribute if not ``"auto"``, the ``AFPQ_KERNEL`` environment variable
(``auto``/``torch``/``triton``), else ``auto`` (Triton on CUDA when importable,
torch otherwise).
"""

from __future__ import annotations

import functools
import os

import torch

from . import torch_ref

BACKENDS = ("auto", "torch", "triton")


@functools.lru_cache(maxsize=None)
def _triton_linear():
    try:
        from .triton_kernels import linear as triton_linear  # noqa: WPS433 (optional backend)
    except ImportError:
        return None
    return triton_linear


def select_backend(x: torch.Tensor, layer) -> str:
    choice = getattr(layer, "backend", "auto")
    if choice == "auto":
        choice = os.environ.get("AFPQ_KERNEL", "auto").lower()
    if choice not in BACKENDS:
        raise ValueError(f"unknown AFPQ kernel backend {choice!r}; choose one of {', '.join(BACKENDS)}")
    if choice == "auto":
        return "triton" if x.is_cuda and _triton_linear() is not None else "torch"
    if choice == "triton" and _triton_linear() is None:
        raise RuntimeError("AFPQ kernel backend 'triton' was requested but afpq_plugins.kernels.triton_kernels is unavailable")
    return choice


def afpq_linear(x: torch.Tensor, layer) -> torch.Tensor:
    if x.shape[-1] != layer.in_features:
        raise ValueError(
            f"AFPQLinear: input has {x.shape[-1]} features, the layer expects {layer.in_features}"
        )
    if select_backend(x, layer) == "triton":
        return _triton_linear()(x, layer)
    return torch_ref.linear(x, layer)
