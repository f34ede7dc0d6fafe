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
from ..core.formats import Format, get_format, resolve_mode
from ..core.packing import pack, packed_shape, unpack
from ..core.quantize import QuantizedWeight, default_g_idx, group_count, quantize_weight

__all__ = ["AFPQLinear", "second_param_name"]


class AFPQLinear(nn.Module):
    """Weight-only quantized Linear with a LUT dequantize + matmul forward."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        fmt="nf4",
        group_size: int = 128,
        mode: Optional[str] = None,
        layout: str = "gptq",
        scale_dtype: torch.dtype = torch.float16,
        bias_dtype: Optional[torch.dtype] = None,
        device=None,
    ) -> None:
        super().__init__()
        self.fmt: Format = get_format(fmt)
        self.mode = resolve_mode(self.fmt, mode)
        self.in_features = in_features
        self.out_features = out_features
        self.group_size = group_size
        self.layout = layout
        self.bits = self.fmt.bits
        groups = group_count(in_features, group_size, f"AFPQLinear({in_features}->{out_features})")
        qshape = packed_shape(layout, self.bits, out_features, in_features)
        self._default_g_idx: Optional[torch.Tensor] = None
        #: Kernel choice: "auto" (Triton on CUDA when available, else torch), "torch", "triton".
        self.backend = "auto"
        self.register_buffer("qweight", torch.zeros(qshape, dtype=torch.int32, device=device))
        self.register_buffer("scales", torch.zeros(groups, out_features, dtype=scale_dtype, device=device))
        second = second_param_name(self.mode)
        if second is not None:
            self.register_buffer(second, torch.zeros(groups, out_features, dtype=scale_dtype, device=device))
        if layout == "gptq":
            self.register_buffer("g_idx", default_g_idx(in_features, group_size, device))
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
    ) -> "AFPQLinear":
        """Pack a :class:`QuantizedWeight` (codes ``[out, in]``) into a new layer."""
        out_f, in_f = qw.codes.shape
        m = cls(
            in_f, out_f, bias is not None, fmt=qw.fmt, group_size=qw.group_size, mode=qw.mode,
            layout=layout, scale_dtype=qw.scales.dtype,
            bias_dtype=bias.dtype if bias is not None else None, device=qw.codes.device,
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
    ) -> "AFPQLinear":
        """Round-to-nearest quantize a float ``nn.Linear`` (``search``: opt-in scale search)."""
        qw = quantize_weight(
            linear.weight.detach(), fmt, group_size, mode, scale_dtype, name=f"{name}.weight", search=search
        )
        return cls.from_quantized(qw, linear.bias, layout, name=name)

    # -- decoding ------------------------------------------------------------------------
    @property
    def second(self) -> Optional[torch.Tensor]:
        name = second_param_name(self.mode)
        return getattr(self, name) if name else None

    def has_default_order(self) -> bool:
        """True when ``g_idx`` is absent or the plain ``i // group_size`` (no act-order)."""
        if self.g_idx is None:
            return True
        ref = self._default_g_idx
        if ref is None or ref.device != self.g_idx.device:
            ref = self._default_g_idx = default_g_idx(self.in_features, self.group_size, self.g_idx.device)
        return bool(torch.equal(self.g_idx, ref))

    def codes(self) -> torch.Tensor:
        """Unpacked codes, ``[out, in]`` uint8."""
        return unpack(self.qweight, self.bits, self.layout)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float weight ``[out, in]`` these buffers decode to."""
        from ..kernels.torch_ref import dequantize_t

        return dequantize_t(self, dtype).t()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from ..kernels import afpq_linear

        return afpq_linear(x, self)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"fmt={self.fmt.name}, mode={self.mode}, group_size={self.group_size}, layout={self.layout}"
        )


def _is_default(g_idx: Optional[torch.Tensor], in_f: int, group_size: int) -> bool:
    return g_idx is None or torch.equal(g_idx.to(torch.int32).cpu(), default_g_idx(in_f, group_size))
