"""The one skeleton builder: a float model becomes its AFPQ skeleton from a checkpoint config.

Every loader (:func:`afpq_plugins.model.load_quantized`, the transformers quantizer
:class:`afpq_plugins.hf.quantizer.AFPQHfQuantizer`, and any later one) calls
:func:`build_skeleton`: for each quantized layer of the checkpoint it puts an empty
:class:`~afpq_plugins.nn.AFPQLinear` (zeros, on the replaced module's device) where
the float module was; the loader then fills its buffers from the checkpoint.

One rule decides which float modules may be replaced (:func:`linear_dims`):

* ``torch.nn.Linear``: ``in_features`` / ``out_features``;
* a transformers ``Conv1D`` (GPT-2's ``c_attn`` / ``c_proj`` / ``c_fc``): its weight is
  ``[in, out]`` and it computes ``x @ W + b``, the same function as a Linear holding
  ``W.T``, so it is replaced like one with ``in, out = W.shape``;
* anything else is a :class:`~afpq_plugins.core.checkpoint.CheckpointError` naming it.

Validate, then mutate: every listed name is resolved and checked before the first
module is replaced, so a bad config leaves the model exactly as it was.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Dict, Iterable, Mapping, Optional

import torch
from torch import nn

from ..core.checkpoint import AFPQConfigDict, CheckpointError, quantized_module_names
from ..core.spec import LayerGeometry, QuantSpec
from .linear import AFPQLinear

__all__ = ["LayerSpec", "build_skeleton", "plan_skeleton", "linear_dims", "set_module", "tied_parameter_names"]


@dataclass(frozen=True)
class LayerSpec:
    """What one quantized layer of a checkpoint looks like in the model."""

    in_features: int
    out_features: int
    has_bias: bool
    bias_dtype: Optional[torch.dtype] = None
    geometry: Optional[LayerGeometry] = field(default=None, compare=False)  # checked once by plan_skeleton
    spec: Optional[QuantSpec] = field(default=None, compare=False)  # the layer's settings (per-module overrides)


_SET_LOCK = threading.Lock()


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """``model.<name> = new`` for a dotted ``name`` (the one module swap of the package;
    serialized, so engines that finalize layers on worker threads may call it)."""
    parent_name, _, child = name.rpartition(".")
    with _SET_LOCK:
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, new)


def linear_dims(mod: nn.Module, name: str, source: str = "checkpoint"):
    """``(in, out)`` of a module a checkpoint may quantize (the rule in the module docstring)."""
    if isinstance(mod, nn.Linear):
        return mod.in_features, mod.out_features
    if type(mod).__name__ == "Conv1D" and getattr(mod, "weight", None) is not None and mod.weight.dim() == 2:
        in_f, out_f = mod.weight.shape
        return int(in_f), int(out_f)
    raise CheckpointError(
        f"{source}: quantized module {name!r} is a {type(mod).__name__}, expected nn.Linear or transformers Conv1D"
    )


def plan_skeleton(
    model: nn.Module, qc: AFPQConfigDict, names: Iterable[str], source: str = "checkpoint",
    spec: Optional[QuantSpec] = None,
) -> Dict[str, LayerSpec]:
    """``{name: LayerSpec}`` of the layers :func:`build_skeleton` would replace; raises
    :class:`CheckpointError` naming the module or key, changes nothing. A module that is
    already an :class:`AFPQLinear` (a repeated call) is described as it is. Each layer is
    checked once against its settings (``qc.spec_for(name)``; ``spec``: one for every layer
    instead): the plan carries its geometry and settings."""
    names = list(names)
    if not names:
        raise CheckpointError(f"{source}: quantization_config.quantized_modules is empty and no tensor ends in .qweight")
    seen = set()
    plan: Dict[str, LayerSpec] = {}
    for name in names:
        if not isinstance(name, str) or not name:
            raise CheckpointError(f"{source}: quantization_config.quantized_modules holds {name!r}, not a module name")
        if name in seen:
            raise CheckpointError(f"{source}: quantization_config.quantized_modules names {name!r} twice")
        seen.add(name)
        try:
            mod = model.get_submodule(name)
        except AttributeError:
            raise CheckpointError(
                f"{source}: quantized module {name!r} (quantization_config.quantized_modules) does not exist in "
                f"{type(model).__name__}"
            ) from None
        if isinstance(mod, AFPQLinear):
            plan[name] = LayerSpec(mod.in_features, mod.out_features, mod.bias is not None,
                                   mod.bias.dtype if mod.bias is not None else None)
            continue
        in_f, out_f = linear_dims(mod, name, source)
        bias = getattr(mod, "bias", None)
        layer_spec = spec if spec is not None else qc.spec_for(name)
        try:
            geometry = layer_spec.layer(in_f, out_f, f"AFPQLinear({in_f}->{out_f})")
        except ValueError as exc:  # e.g. group size does not divide in_features
            raise CheckpointError(f"{source}: quantized module {name!r}: {exc}") from None
        plan[name] = LayerSpec(in_f, out_f, bias is not None, bias.dtype if bias is not None else None, geometry,
                               layer_spec)
    return plan


def build_skeleton(
    model: nn.Module,
    qc: AFPQConfigDict,
    names: Optional[Iterable[str]] = None,
    keys: Iterable[str] = (),
    bias_dtypes: Optional[Mapping[str, torch.dtype]] = None,
    source: str = "checkpoint",
    plan: Optional[Dict[str, LayerSpec]] = None,
) -> Dict[str, LayerSpec]:
    """Replace the checkpoint's quantized modules of ``model`` by empty :class:`AFPQLinear` s.

    ``names``: the quantized layers (default:
    :func:`~afpq_plugins.core.checkpoint.quantized_module_names` of ``qc`` and the
    checkpoint's tensor ``keys``). ``bias_dtypes``: ``{name: dtype}`` of the biases
    (default: the float module's bias dtype). Each new layer is on the replaced module's
    device (``meta`` under ``init_empty_weights``) and needs no gradient. Returns the
    plan (:func:`plan_skeleton`; ``plan``: one made already for this config, reused without
    checking the layers again); nothing is replaced unless every layer checks out.
    """
    if plan is None:
        if names is None:
            names = quantized_module_names(qc, keys)
        plan = plan_skeleton(model, qc, names, source)
    for name, spec in plan.items():
        old = model.get_submodule(name)
        if isinstance(old, AFPQLinear):
            continue
        device = getattr(old, "weight", None)
        device = device.device if isinstance(device, torch.Tensor) else None
        bias_dtype = (bias_dtypes or {}).get(name, spec.bias_dtype) if spec.has_bias else None
        layer = AFPQLinear(
            spec.in_features, spec.out_features, spec.has_bias, spec=spec.spec or qc.spec_for(name),
            geometry=spec.geometry,
            bias_dtype=bias_dtype, device=device,
        )
        layer.requires_grad_(False)
        set_module(model, name, layer)
    return plan


def tied_parameter_names(model: nn.Module) -> set:
    """Parameter names that ``tie_weights`` fills (e.g. ``lm_head.weight``), which a
    checkpoint stores once."""
    names = set()
    cfg = getattr(model, "config", None)
    if cfg is not None and getattr(cfg, "tie_word_embeddings", False):
        out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if out is not None:
            for name, mod in model.named_modules():
                if mod is out:
                    names.add(f"{name}.weight")
                    break
    return names
