"""AFPQ linear as a torch custom op: ``torch.ops.afpq.linear``.

Engines that trace their models (vLLM runs ``torch.compile`` by default) need the
quantized matmul as one opaque op: the kernel registry (:mod:`afpq_plugins.kernels`)
picks a kernel at run time from Python attributes, which Dynamo cannot trace. The op
takes the layer's tensors and its static description, finds the layer's registered
:class:`LayerView` (:func:`register_view`; a fresh one otherwise) and calls :func:`afpq_plugins.kernels.afpq_linear`, so whichever
kernel the registry chooses (torch reference, native CPU, Triton) runs inside it. Its
fake (meta) implementation gives the output shape ``[*x.shape[:-1], out_features]``
without touching data, which is all a tracer needs.

``default_order`` is passed in rather than recomputed (``has_default_order()`` compares
``g_idx`` with ``arange`` on every call otherwise); callers compute it once per layer.

Importing this module registers the op once per process (later imports reuse it).
"""

# No `from __future__ import annotations`: torch.library reads the annotations for the schema.
import weakref
from typing import Optional

import torch

from ..core.spec import QuantSpec

__all__ = ["LayerView", "linear", "register_view", "layer_key", "OP_NAME"]

OP_NAME = "afpq::linear"


class LayerView:
    """Duck-typed stand-in for :class:`~afpq_plugins.nn.AFPQLinear` (what kernels read): the
    layer's tensors plus its :class:`~afpq_plugins.core.spec.QuantSpec` and shape.

    Kernels may cache derived data on the layer object (the native CPU kernel keeps its
    repacked weights there), so an engine should keep one view per layer alive and
    :func:`register_view` it: the op then reuses that view instead of a fresh one per call.
    """

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, second: Optional[torch.Tensor],
                 g_idx: Optional[torch.Tensor], bias: Optional[torch.Tensor], spec: QuantSpec,
                 in_features: int, out_features: int, default_order: bool, backend: str = "auto") -> None:
        self.qweight, self.scales, self.second, self.g_idx, self.bias = qweight, scales, second, g_idx, bias
        spec = spec.resolved()
        self.spec = spec
        self.fmt, self.bits, self.mode, self.layout = spec.format, spec.bits, spec.mode, spec.layout
        self.group_size, self.in_features, self.out_features = spec.group_size, in_features, out_features
        self.backend = backend
        self._default_order = default_order

    def has_default_order(self) -> bool:
        return self._default_order

    def key(self) -> tuple:
        return layer_key(self.qweight, self.scales, self.fmt.name, self.mode, self.layout, self.group_size,
                    self.in_features, self.out_features)


def layer_key(qweight, scales, fmt: str, mode: str, layout: str, group_size: int, in_features: int, out_features: int):
    return (qweight.data_ptr(), scales.data_ptr(), str(qweight.device), fmt, mode, layout, group_size,
            in_features, out_features)


#: Views kept alive by their owners (engine layers), found again by their tensors.
_VIEWS: "weakref.WeakValueDictionary" = weakref.WeakValueDictionary()


def register_view(view: LayerView) -> LayerView:
    """Let the op reuse ``view`` (and what kernels cache on it) for calls on its tensors.

    The registry holds it weakly: the caller keeps it alive (e.g. as a layer attribute)."""
    _VIEWS[view.key()] = view
    return view


def _linear_impl(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, second: Optional[torch.Tensor],
    g_idx: Optional[torch.Tensor], bias: Optional[torch.Tensor], fmt: str, mode: str, layout: str,
    group_size: int, in_features: int, out_features: int, default_order: bool,
) -> torch.Tensor:
    from . import afpq_linear

    view = _VIEWS.get(layer_key(qweight, scales, fmt, mode, layout, group_size, in_features, out_features))
    if view is None:
        spec = QuantSpec(fmt, group_size, mode, scales.dtype, layout)
        view = LayerView(qweight, scales, second, g_idx, bias, spec, in_features, out_features, default_order)
    elif isinstance(view, LayerView):
        view.qweight, view.scales, view.second, view.g_idx, view.bias = qweight, scales, second, g_idx, bias
        view._default_order = default_order
    y = afpq_linear(x, view)
    # A custom op's output may not alias an input (a kernel could hand back x's storage
    # for a degenerate shape); clone only in that case.
    if y.untyped_storage().data_ptr() == x.untyped_storage().data_ptr():
        y = y.clone()
    return y


def _linear_fake(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, second: Optional[torch.Tensor],
    g_idx: Optional[torch.Tensor], bias: Optional[torch.Tensor], fmt: str, mode: str, layout: str,
    group_size: int, in_features: int, out_features: int, default_order: bool,
) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], out_features))


def _defined() -> bool:
    try:
        torch.ops.afpq.linear.default
    except (AttributeError, RuntimeError):
        return False
    return True


if _defined():  # module re-executed (importlib.reload): keep the op already registered
    linear = torch.ops.afpq.linear
else:
    linear = torch.library.custom_op(OP_NAME, mutates_args=())(_linear_impl)
    linear.register_fake(_linear_fake)
