"""The torch reference kernel: LUT dequantize, then a dense matmul. Any device.

The maths is core's :func:`~afpq_plugins.core.quantize.decode`, applied once per
(group, column) to build a small table of all ``2**bits`` decoded values; each weight
is then one lookup. Codes are laid out as ``[in, out]`` (so ``x @ W.T`` needs no
transpose) and, on CPU, the forward walks the input
dimension in cache-sized slices: each slice is decoded and multiplied into the
output at once, which is several times faster than decoding the whole weight first
on a memory-bound CPU.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from ..core.packing import unpack_kn
from ..core.quantize import decode_table

#: Weights decoded per slice on CPU.
CPU_SLICE = 1 << 18


def _align(layer) -> int:
    """Input rows per slice must be whole packed words and whole groups."""
    word = 32 // math.gcd(layer.bits, 32) if layer.layout == "gptq" else 1
    gs = layer.group_size if layer.group_size > 0 else 1
    return math.lcm(word, gs)


def group_tables(layer, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Decoded value of every code for every (group, output column): ``[groups, out, 2**bits]``.

    Built with core's :func:`decode`, so each weight then costs one table lookup
    instead of a decode (lookup, sign test, two scales).
    """
    second = layer.second if layer.second is not None else layer.scales
    return decode_table(layer.fmt, layer.mode, layer.scales, second, dtype)


def dequantize_t(
    layer, dtype: torch.dtype = torch.float32, rows: Optional[slice] = None,
    tables: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``W.T[rows]`` (``[k, out]``) of an :class:`~afpq_plugins.nn.AFPQLinear`.

    ``rows`` must start and end on :func:`_align` boundaries (or the end of the input);
    ``tables`` is :func:`group_tables` (computed here when not given).
    """
    in_f, out_f = layer.in_features, layer.out_features
    k0, k1 = (0, in_f) if rows is None else (rows.start, rows.stop)
    if layer.layout == "gptq":
        per = 32 // math.gcd(layer.bits, 32)
        words = per * layer.bits // 32
        q = layer.qweight[k0 // per * words: k1 // per * words]
    else:
        q = layer.qweight[k0:k1]
    codes = unpack_kn(q, layer.bits, layer.layout)  # int32 [k, out]
    if tables is None:
        tables = group_tables(layer, dtype)
    n = tables.shape[-1]
    col = torch.arange(out_f, dtype=torch.int32, device=codes.device) * n
    if layer.has_default_order():
        gs = in_f if layer.group_size == -1 else layer.group_size
        g = torch.arange(k0, k1, device=codes.device, dtype=torch.int32) // gs
    else:
        g = layer.g_idx[k0:k1].to(device=codes.device, dtype=torch.int32)
    # Flat index of (group of row k, column o, code) in the tables.
    idx = codes.add_(col).add_((g * (out_f * n)).unsqueeze(1))
    return torch.index_select(tables.reshape(-1), 0, idx.reshape(-1)).view(codes.shape)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """fp32 on CPU (half matmuls are slow there), the activation dtype elsewhere."""
    return torch.float32 if x.device.type == "cpu" else x.dtype


def linear(x: torch.Tensor, layer) -> torch.Tensor:
    cdt = compute_dtype(x)
    x2 = x.reshape(-1, layer.in_features).to(cdt)
    in_f, out_f = layer.in_features, layer.out_features
    align = _align(layer)
    step = max(align, CPU_SLICE // out_f // align * align) if x.device.type == "cpu" else in_f
    tables = group_tables(layer, cdt)
    if step >= in_f:
        out = x2 @ dequantize_t(layer, cdt, tables=tables)
    else:
        out = torch.zeros(x2.shape[0], out_f, dtype=cdt, device=x.device)
        for k0 in range(0, in_f, step):
            k1 = min(k0 + step, in_f)
            out.addmm_(x2[:, k0:k1], dequantize_t(layer, cdt, slice(k0, k1), tables))
    if layer.bias is not None:
        out = out.add_(layer.bias.to(cdt))
    return out.to(x.dtype).reshape(*x.shape[:-1], out_f)
