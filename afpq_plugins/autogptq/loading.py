"""Loading AFPQ checkpoints of models whose layers are transformers ``Conv1D`` (GPT-2).

``afpq_plugins.model.load_quantized`` is the loader; it accepts ``nn.Linear`` layers
only. For a checkpoint whose quantized modules include a ``Conv1D`` (GPT-2's
``c_attn``/``c_proj``/``c_fc``: weight ``[in, out]``, ``y = x @ W + b``) this module swaps
those modules for :class:`AFPQLinear` with ``in = weight.shape[0]``, ``out =
weight.shape[1]`` (AFPQLinear computes ``x @ W.T + b`` with ``W = Conv1D.weight.T``, the
same function), with the same validation and state dict loading as the core loader.
Checkpoints without ``Conv1D`` layers go straight to ``load_quantized``. TODO(core): once ``model.load_quantized`` takes ``Conv1D``, this module
reduces to a call to it.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
from torch import nn

from ..core.checkpoint import (
    CheckpointError,
    load_checkpoint_tensors,
    read_quant_config,
    validate_layer_tensors,
)
from ..nn import AFPQLinear

__all__ = ["load_checkpoint"]


def _quantized_names(qc, tensors):
    return qc.quantized_modules or sorted(k[: -len(".qweight")] for k in tensors if k.endswith(".qweight"))


def _has_conv1d(path: str, qc, tensors) -> bool:
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    config = AutoConfig.from_pretrained(path)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    for name in _quantized_names(qc, tensors):
        try:
            if isinstance(model.get_submodule(name), Conv1D):
                return True
        except AttributeError:
            return False
    return False


def load_checkpoint(path: str, device="cpu", dtype: Optional[torch.dtype] = None) -> nn.Module:
    from ..model import load_quantized

    _, qc = read_quant_config(path)
    tensors = load_checkpoint_tensors(path)
    if not _has_conv1d(path, qc, tensors):
        return load_quantized(path, device=device, dtype=dtype)
    return _load_conv1d(path, qc, tensors, device, dtype)


def _load_conv1d(path, qc, tensors, device, dtype) -> nn.Module:
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    from ..model import _set_module, _tied_names

    src = os.path.join(path, "model.safetensors")
    config = AutoConfig.from_pretrained(path)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    for name in _quantized_names(qc, tensors):
        try:
            mod = model.get_submodule(name)
        except AttributeError:
            raise CheckpointError(f"{src}: quantized module {name!r} does not exist in {type(model).__name__}") from None
        if isinstance(mod, Conv1D):
            in_f, out_f = mod.weight.shape
        elif isinstance(mod, nn.Linear):
            in_f, out_f = mod.in_features, mod.out_features
        else:
            raise CheckpointError(f"{src}: quantized module {name!r} is a {type(mod).__name__}, expected Linear or Conv1D")
        has_bias = mod.bias is not None
        validate_layer_tensors(name, tensors, qc, in_f, out_f, has_bias, source=src)
        layer = AFPQLinear(
            in_f, out_f, has_bias, fmt=qc.fmt, group_size=qc.group_size, mode=qc.mode, layout=qc.layout,
            scale_dtype=qc.torch_scale_dtype, bias_dtype=tensors[f"{name}.bias"].dtype if has_bias else None,
        )
        _set_module(model, name, layer)
    expected = set(model.state_dict())
    tied = _tied_names(model)
    missing = sorted(expected - set(tensors) - tied)
    if missing:
        raise CheckpointError(f"{src}: tensor {missing[0]!r} is missing" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    unexpected = sorted(set(tensors) - expected)
    if unexpected:
        raise CheckpointError(f"{src}: unexpected tensor {unexpected[0]!r} (not in {type(model).__name__})")
    sd = model.state_dict()
    for k, t in tensors.items():
        if tuple(sd[k].shape) != tuple(t.shape):
            raise CheckpointError(f"{src}: tensor {k!r} has shape {tuple(t.shape)}, expected {tuple(sd[k].shape)}")
    quant_suffixes = ("qweight", "scales", "scales_neg", "zeros", "g_idx")
    if dtype is not None:
        tensors = {k: (t.to(dtype) if t.is_floating_point() and k.rsplit(".", 1)[-1] not in quant_suffixes else t)
                   for k, t in tensors.items()}
    model.load_state_dict(tensors, strict=False, assign=True)
    if tied:
        model.tie_weights()
    # Non-persistent buffers (GPT-2's attention bias mask and the like) are rebuilt, not stored.
    leftover = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.device.type == "meta"]
    if leftover:
        raise CheckpointError(f"{src}: tensor {leftover[0]!r} was not loaded")
    model.config.quantization_config = qc.to_dict()
    return model.to(device).eval()
