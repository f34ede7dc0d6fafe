"""``AFPQLinear``: a Linear layer stored as packed grid codes plus group parameters.

Its buffers are exactly one quantized layer's checkpoint tensors (``qweight``,
``scales``, ``scales_neg`` or ``zeros``, ``g_idx``, ``bias``): shapes, dtypes, packing
layouts and the decode of each mode are in ``docs/format.md`` (sections 2 to 4).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..core.checkpoint import second_param_name
from ..core.formats import Format
from ..core.packing import pack, unpack
from ..core.quantize import QuantizedWeight, default_g_idx, quantize_weight
from ..core.spec import LayerGeometry, QuantSpec

__all__ = ["AFPQLinear", "second_param_name"]


class AFPQLinear(nn.Module):
    """Weight-only quantized Linear; the forward runs the kernel the registry chose for it.

    The settings come whole as ``spec`` (a :class:`~afpq_plugins.core.spec.QuantSpec`; its
    layout ``None`` means ``gptq``), or as the keyword arguments ``fmt``, ``group_size``,
    ``mode``, ``layout``, ``scale_dtype`` (which build one). ``geometry``: the layer's
    :class:`~afpq_plugins.core.spec.LayerGeometry` when the caller has checked it already
    (loaders plan every layer once), else it is checked here.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        spec: Optional[QuantSpec] = None,
        geometry: Optional[LayerGeometry] = None,
        fmt="nf4",
        group_size: int = 128,
        mode: Optional[str] = None,
        layout: str = "gptq",
        scale_dtype: torch.dtype = torch.float16,
        bias_dtype: Optional[torch.dtype] = None,
        device=None,
    ) -> None:
        super().__init__()
        if spec is None:
            spec = QuantSpec(fmt, group_size, mode, scale_dtype, layout)
        spec = spec.resolved()
        if geometry is None:
            geometry = spec.layer(in_features, out_features, f"AFPQLinear({in_features}->{out_features})")
        self.spec = spec
        self.fmt: Format = spec.format
        self.mode = spec.mode
        self.in_features = in_features
        self.out_features = out_features
        self.group_size = spec.group_size
        self.layout = spec.layout
        self.bits = spec.bits
        groups, qshape, scale_dtype = geometry.groups, geometry.qweight_shape, spec.torch_scale_dtype
        self._default_g_idx: Optional[torch.Tensor] = None
        self._order: Optional[tuple] = None  # (g_idx identity, version, default order?)
        #: Kernel choice: "auto" (the registry's choice) or a kernel's name ("torch", "cpu", "triton").
        self.backend = "auto"
        self.register_buffer("qweight", torch.zeros(qshape, dtype=torch.int32, device=device))
        self.register_buffer("scales", torch.zeros(groups, out_features, dtype=scale_dtype, device=device))
        second = second_param_name(self.mode)
        if second is not None:
            self.register_buffer(second, torch.zeros(groups, out_features, dtype=scale_dtype, device=device))
        if self.layout == "gptq":
            self.register_buffer("g_idx", default_g_idx(in_features, self.group_size, device))
        else:
            self.g_idx = None
        if bias:
            self.register_buffer(
                "bias", torch.zeros(out_features, dtype=bias_dtype or scale_dtype, device=device)
            )
        else:
            self.bias = None

    # -- construction ------------------------------------------------------------------
    @classmethod
    def from_quantized(
        cls,
        qw: QuantizedWeight,
        bias: Optional[torch.Tensor] = None,
        layout: str = "gptq",
        name: str = "weight",
        geometry: Optional[LayerGeometry] = None,
        spec: Optional[QuantSpec] = None,
    ) -> "AFPQLinear":
        """Pack a :class:`QuantizedWeight` (codes ``[out, in]``) into a new layer
        (``geometry``: already checked by the caller; ``spec``: the settings it was made with,
        kept on the layer, which must agree with ``qw``'s grid, group size, mode and scale dtype)."""
        out_f, in_f = qw.codes.shape
        own = QuantSpec(qw.fmt, qw.group_size, qw.mode, qw.scales.dtype, layout)
        if spec is not None:
            spec = spec.resolved()
            if (spec.fmt, spec.group_size, spec.mode, spec.scale_dtype, spec.layout) != \
                    (own.fmt, own.group_size, own.mode, own.scale_dtype, own.layout):
                raise ValueError(f"{name}: the spec {spec.describe()} does not describe the quantized weight "
                                 f"({own.describe()})")
        m = cls(
            in_f, out_f, bias is not None, spec=spec or own,
            geometry=geometry, bias_dtype=bias.dtype if bias is not None else None, device=qw.codes.device,
        )
        if layout == "awq" and not _is_default(qw.g_idx, in_f, qw.group_size):
            raise ValueError(f"{name}: the awq layout has no g_idx; act-order weights need layout 'gptq'")
        m.qweight.copy_(pack(qw.codes, m.bits, layout, name=f"{name}.qweight"))
        m.scales.copy_(qw.scales)
        if m.second is not None:
            m.second.copy_(qw.scales2)
        if m.g_idx is not None:
            m.g_idx.copy_(qw.g_idx.to(torch.int32))
        if bias is not None:
            m.bias.copy_(bias.detach())
        m.invalidate()
        return m

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        fmt="nf4",
        group_size: int = 128,
        mode: Optional[str] = None,
        layout: str = "gptq",
        scale_dtype: torch.dtype = torch.float16,
        name: str = "linear",
        search=None,
        *,
        spec: Optional[QuantSpec] = None,
        geometry: Optional[LayerGeometry] = None,
    ) -> "AFPQLinear":
        """Round-to-nearest quantize a float ``nn.Linear`` (``search``: opt-in scale search).

        With ``spec``, its settings are used (``search``, when given, overrides its scale
        search for this layer, e.g. the output search bound to the layer's energies)."""
        if spec is None:
            spec = QuantSpec(fmt, group_size, mode, scale_dtype, layout, scale_search=search)
        spec = spec.resolved()
        qw = quantize_weight(
            linear.weight.detach(), spec.format, spec.group_size, spec.mode, spec.torch_scale_dtype,
            name=f"{name}.weight", search=search if search is not None else spec.scale_search,
            groups=geometry.groups if geometry is not None else None,
        )
        return cls.from_quantized(qw, linear.bias, spec.layout, name=name, geometry=geometry, spec=spec)

    # -- decoding ------------------------------------------------------------------------
    @property
    def second(self) -> Optional[torch.Tensor]:
        name = second_param_name(self.mode)
        return getattr(self, name) if name else None

    def has_default_order(self) -> bool:
        """True when ``g_idx`` is absent or the plain ``i // group_size`` (no act-order).

        Computed once per ``g_idx`` tensor and version (in-place edits recompute it, except on
        inference tensors, which have no version counter)."""
        g = self.g_idx
        if g is None:
            return True
        seen = self._order
        # inference tensors (torch.inference_mode) keep no version counter: identity only, as
        # the native CPU kernel's pack cache does
        version = None if g.is_inference() else g._version
        if seen is not None and seen[0] is g and seen[1] == version:
            return seen[2]
        ref = self._default_g_idx
        if ref is None or ref.device != g.device:
            ref = self._default_g_idx = default_g_idx(self.in_features, self.group_size, g.device)
        value = bool(torch.equal(g, ref))
        self._order = (g, version, value)
        return value

    # -- kernel choice ----------------------------------------------------------------------
    def invalidate(self) -> None:
        """Forget the kernel choice and the cached order (after replacing or editing buffers;
        ``.to()``, ``load_state_dict`` and buffer assignment call it)."""
        from ..kernels import invalidate

        invalidate(self)
        self.__dict__["_order"] = None

    def prepare(self) -> "AFPQLinear":
        """Compute what a traced forward reads as constants (the act-order flag) and make the
        layer findable by the custom op; loaders call it once the buffers are filled."""
        from ..kernels import ops

        self.has_default_order()
        ops.register_view(self)
        return self

    def key(self) -> tuple:
        """The custom op's lookup key of this layer (its tensors and static description)."""
        from ..kernels import ops

        return ops.layer_key(self.qweight, self.scales, self.fmt.name, self.mode, self.layout, self.group_size,
                             self.in_features, self.out_features)

    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)
        self.invalidate()
        return out

    def __setattr__(self, name, value) -> None:
        super().__setattr__(name, value)
        if name in ("qweight", "scales", "scales_neg", "zeros", "g_idx", "bias") and "_order" in self.__dict__:
            self.invalidate()

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self.invalidate()

    def codes(self) -> torch.Tensor:
        """Unpacked codes, ``[out, in]`` uint8."""
        return unpack(self.qweight, self.bits, self.layout)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float weight ``[out, in]`` these buffers decode to."""
        from ..kernels.torch_ref import dequantize_t

        return dequantize_t(self, dtype).t()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            # Traced (torch.compile, transformers' compiled generate): one opaque custom op
            # with a fake implementation; the act-order flag is a constant (unknown: the
            # g_idx path, correct for any order).
            from ..kernels import ops

            seen = self._order
            default = bool(seen[2]) if seen is not None else self.g_idx is None
            return ops.linear(x, self.qweight, self.scales, self.second, self.g_idx, self.bias, self.fmt.name,
                              self.mode, self.layout, self.group_size, self.in_features, self.out_features,
                              default)
        # Eager: the op's implementation, without the dispatcher's cost per call.
        from ..kernels import afpq_linear

        return afpq_linear(x, self)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"fmt={self.fmt.name}, mode={self.mode}, group_size={self.group_size}, layout={self.layout}"
        )


def _is_default(g_idx: Optional[torch.Tensor], in_f: int, group_size: int) -> bool:
    return g_idx is None or torch.equal(g_idx.to(torch.int32).cpu(), default_g_idx(in_f, group_size))
