"""The torch reference kernel: LUT dequantize, then a dense matmul. Any device.

The maths is core's :func:`~afpq_plugins.core.quantize.decode`; this module only
lays the codes out as ``[in, out]`` so that no transpose is needed for
``x @ W.T`` and so that groups broadcast without gathering scales per weight.
"""

from __future__ import annotations

import torch

from ..core.packing import unpack_kn
from ..core.quantize import decode


def dequantize_t(layer, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``W.T`` (``[in, out]``) of an :class:`~afpq_plugins.nn.AFPQLinear`."""
    codes = unpack_kn(layer.qweight, layer.bits, layer.layout)
    scales = layer.scales
    second = layer.second if layer.second is not None else scales
    in_f, out_f = codes.shape
    groups = scales.shape[0]
    if layer.has_default_order():
        c = codes.view(groups, in_f // groups, out_f)
        w = decode(c, layer.fmt, layer.mode, scales.unsqueeze(1), second.unsqueeze(1), dtype)
        return w.view(in_f, out_f)
    g = layer.g_idx.to(device=codes.device, dtype=torch.int32)
    return decode(codes, layer.fmt, layer.mode, scales.index_select(0, g), second.index_select(0, g), dtype)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """fp32 on CPU (half matmuls are slow there), the activation dtype elsewhere."""
    return torch.float32 if x.device.type == "cpu" else x.dtype


def linear(x: torch.Tensor, layer) -> torch.Tensor:
    cdt = compute_dtype(x)
    w_t = dequantize_t(layer, cdt)
    out = x.reshape(-1, layer.in_features).to(cdt) @ w_t
    if layer.bias is not None:
        out = out.add_(layer.bias.to(cdt))
    return out.to(x.dtype).reshape(*x.shape[:-1], layer.out_features)
