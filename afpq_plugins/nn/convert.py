"""An engine's GPTQ/AWQ result as an AFPQ layer: the one conversion every adapter uses.

GPTQ and AWQ engines (AutoGPTQ, GPTQModel, optimum, llm-compressor) end with a layer's
fake-quantized weight ``W`` (the grid values times the group parameters) and the group
parameters they used (``scale``, ``zero``: ``[out, groups]``; for AFPQ ``zero`` holds
s_neg) plus, under act-order, ``g_idx``. :func:`quantized_from_engine` re-encodes ``W`` on
the spec's grid with those parameters (core's :func:`~afpq_plugins.core.gptq.encode_gptq`)
and :func:`linear_from_engine` packs the result into an :class:`~afpq_plugins.nn.AFPQLinear`
in the spec's layout.

One policy for weights that do not decode back to the engine's value (a *mismatch*: none
when the engine used the AFPQ quantizer, a few where an engine rounds differently): a
warning that names the layer and the count; the count is returned so callers can report
it. The layer is still written (its codes are the nearest grid values).
"""

from __future__ import annotations

import logging
import threading
from typing import Optional, Tuple

import torch
from torch import nn

from ..core.gptq import encode_gptq
from ..core.quantize import QuantizedWeight
from ..core.spec import QuantSpec
from .linear import AFPQLinear

__all__ = ["quantized_from_engine", "linear_from_engine", "float_weight"]

log = logging.getLogger(__name__)
_LOCK = threading.Lock()


def float_weight(module: nn.Module) -> torch.Tensor:
    """``[out, in]`` weight of an ``nn.Linear`` or transformers ``Conv1D`` (stored ``[in, out]``)."""
    W = module.weight.data
    if isinstance(module, nn.Conv2d):
        raise NotImplementedError("AFPQ packs nn.Linear and transformers Conv1D layers")
    return W.t() if type(module).__name__ == "Conv1D" else W


def quantized_from_engine(
    spec: QuantSpec, W: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, g_idx: Optional[torch.Tensor],
    name: str, dtype: Optional[torch.dtype] = None,
) -> Tuple[QuantizedWeight, int]:
    """``(QuantizedWeight, mismatches)`` of the engine's fake-quantized ``W`` ``[out, in]`` (CPU)."""
    W = W.detach().to("cpu")
    res = encode_gptq(W.float().contiguous(), scale.detach().cpu(), zero.detach().cpu(),
                      None if g_idx is None else g_idx.detach().cpu(), spec.format, spec.mode, spec.group_size,
                      dtype=dtype or W.dtype)
    if res.mismatches:
        log.warning("%s: %d weight(s) do not decode back to the engine's value on the %s grid", name,
                    res.mismatches, spec.fmt)
    sdt = spec.torch_scale_dtype
    qw = QuantizedWeight(res.codes, res.scales.to(sdt), None if spec.mode == "sym" else res.scales2.to(sdt),
                         res.g_idx.to(torch.int32), spec.format, spec.mode, spec.group_size)
    return qw, res.mismatches


def linear_from_engine(
    spec: QuantSpec, module: nn.Module, scale: torch.Tensor, zero: torch.Tensor, g_idx: Optional[torch.Tensor],
    name: str,
) -> Tuple[AFPQLinear, int]:
    """``(AFPQLinear, mismatches)``: ``module`` (holding the engine's fake-quantized weight)
    packed in ``spec``'s layout, on the module's device."""
    W = float_weight(module)
    qw, mismatches = quantized_from_engine(spec, W, scale, zero, g_idx, name, dtype=module.weight.dtype)
    bias = module.bias.detach().cpu() if getattr(module, "bias", None) is not None else None
    layer = AFPQLinear.from_quantized(qw, bias, spec.resolved().layout, name=name)
    return layer.to(module.weight.device), mismatches
