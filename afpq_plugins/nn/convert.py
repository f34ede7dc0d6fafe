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

Validate, then mutate: :func:`check_engine_result` checks one layer's result (the weight's
shape and values, the spec's group size and packing geometry, ``scale`` / ``zero`` shapes
``[out, groups]`` and values, ``g_idx``) and raises :class:`~afpq_plugins.core.errors.EngineResultError`
naming the layer and the tensor; :func:`quantized_from_engine` runs it first, so no adapter
builds (let alone installs) a layer from a bad result. Adapters that convert many layers at
once build every new module before replacing any (AutoGPTQ's ``pack_model``, AutoAWQ's
per-decoder-layer ``_apply_quant``); GPTQModel finalizes one module per task, so its GPTQ
processor checks each result when it is computed, before any module of that decoder layer is
finalized (:mod:`afpq_plugins.gptqmodel.processors`).
"""

from __future__ import annotations

import logging
import threading
from typing import Optional, Tuple

import torch
from torch import nn

from ..core.errors import EngineResultError
from ..core.gptq import encode_gptq
from ..core.quantize import QuantizedWeight
from ..core.spec import QuantSpec
from .linear import AFPQLinear

__all__ = ["quantized_from_engine", "linear_from_engine", "float_weight", "check_engine_result"]

log = logging.getLogger(__name__)
_LOCK = threading.Lock()


def float_weight(module: nn.Module) -> torch.Tensor:
    """``[out, in]`` weight of an ``nn.Linear`` or transformers ``Conv1D`` (stored ``[in, out]``)."""
    W = module.weight.data
    if isinstance(module, nn.Conv2d):
        raise NotImplementedError("AFPQ packs nn.Linear and transformers Conv1D layers")
    return W.t() if type(module).__name__ == "Conv1D" else W


def _count_bad(ok: torch.Tensor) -> int:
    return int((~ok).sum())


def check_engine_result(
    spec: QuantSpec, W: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, g_idx: Optional[torch.Tensor],
    name: str,
) -> None:
    """Raise :class:`EngineResultError` naming ``name`` and the tensor unless the engine's
    result for one layer can be encoded: ``W`` ``[out, in]`` finite; the spec's group size
    divides ``in`` and its layout packs the shape; ``scale`` / ``zero`` ``[out, groups]``
    and finite, scales (``scale``; ``zero`` too outside mode ``zp``, where it is the
    zero-point) not negative; ``g_idx`` ``[in]`` of integers in ``[0, groups)``. Reads only."""
    if W.dim() != 2:
        raise EngineResultError(f"{name}: weight has shape {tuple(W.shape)}, expected [out_features, in_features]")
    out_f, in_f = W.shape
    try:
        groups = spec.layer(in_f, out_f, name).groups
    except ValueError as exc:
        raise EngineResultError(str(exc)) from None
    if not torch.isfinite(W).all():
        raise EngineResultError(f"{name}: weight holds {_count_bad(torch.isfinite(W))} non-finite value(s)")
    for what, t in (("scale", scale), ("zero", zero)):
        if t is None or tuple(t.shape) != (out_f, groups):
            got = None if t is None else tuple(t.shape)
            raise EngineResultError(f"{name}: {what} has shape {got}, expected {(out_f, groups)} "
                                    f"([out_features, groups] at group size {spec.group_size})")
        tf = t.detach().float()
        fin = torch.isfinite(tf)
        if not fin.all():
            raise EngineResultError(f"{name}: {what} holds {_count_bad(fin)} non-finite value(s)")
        if (what == "scale" or spec.mode != "zp") and (tf < 0).any():
            raise EngineResultError(f"{name}: {what} holds {int((tf < 0).sum())} negative scale(s)")
    if g_idx is not None:
        if tuple(g_idx.shape) != (in_f,):
            raise EngineResultError(f"{name}: g_idx has shape {tuple(g_idx.shape)}, expected ({in_f},)")
        if g_idx.is_floating_point() or g_idx.is_complex() or g_idx.dtype == torch.bool:
            raise EngineResultError(f"{name}: g_idx is {g_idx.dtype}, expected an integer tensor")
        if in_f and (int(g_idx.min()) < 0 or int(g_idx.max()) >= groups):
            raise EngineResultError(f"{name}: g_idx holds group indices outside [0, {groups})")


def quantized_from_engine(
    spec: QuantSpec, W: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, g_idx: Optional[torch.Tensor],
    name: str, dtype: Optional[torch.dtype] = None,
) -> Tuple[QuantizedWeight, int]:
    """``(QuantizedWeight, mismatches)`` of the engine's fake-quantized ``W`` ``[out, in]`` (CPU);
    :class:`EngineResultError` first if the result does not fit (:func:`check_engine_result`)."""
    W = W.detach().to("cpu")
    check_engine_result(spec, W, scale, zero, g_idx, name)
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
