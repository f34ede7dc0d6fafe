"""GPTQ-AFPQ on an in-memory transformers model (used by the CLI and the benchmark)."""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch

from ..core.checkpoint import AFPQConfigDict
from .config import AFPQQuantizeConfig
from .hooks import quantized_module_names, wrap_model

__all__ = ["examples_from_ids", "quantize_model", "gptq_quantize", "run", "supports_model"]


def examples_from_ids(samples: Sequence[torch.Tensor]) -> List[dict]:
    """AutoGPTQ examples (``input_ids`` + ``attention_mask``, ``[1, seqlen]``) from 1-D token tensors."""
    out = []
    for ids in samples:
        ids = ids.reshape(1, -1).long()
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    return out


def quantize_model(model, cfg: AFPQQuantizeConfig, examples, batch_size: int = 1) -> AFPQConfigDict:
    """Run AutoGPTQ's GPTQ with ``cfg``'s grid on ``model`` (in place).

    ``model`` is a transformers causal LM of an architecture AutoGPTQ 0.7.1 supports; its
    quantized layers become :class:`~afpq_plugins.autogptq.AFPQQuantLinear`. Returns the
    checkpoint config for :func:`afpq_plugins.model.save_quantized` (with ``cfg.layer_specs``:
    each of those layers on its own settings, listed in the config's ``modules``).
    """
    if not isinstance(cfg, AFPQQuantizeConfig):
        raise TypeError("quantize_model needs an AFPQQuantizeConfig")
    from . import compat
    from .hooks import afpq_hooks, check_layer_specs

    wrapper = wrap_model(model, cfg, quantized=False)
    check_layer_specs(wrapper, cfg)
    with afpq_hooks(cfg, model), compat.cpu_quantize():  # also when the adapter is unregistered
        wrapper.quantize(examples, batch_size=batch_size)
    return cfg.to_afpq(quantized_module_names(model), modules_to_not_convert=[wrapper.lm_head_name])


def gptq_quantize(
    model, tokenizer, fmt, group_size: int, mode=None, *, scale_dtype: str = "float16", desc_act: bool = False,
    static_groups: bool = False, true_sequential: bool = True, damp_percent: float = 0.01,
    nsamples: int = 128, seqlen: int = 2048, seed: int = 0, scale_search=None, samples=None, layer_specs=None,
) -> AFPQConfigDict:
    """GPTQ-quantize ``model`` (in place) on ``samples`` (1-D token tensors), default the Austen
    calibration novels (``nsamples`` x ``seqlen``, ``seed``); the CLI's ``--method gptq``.
    ``layer_specs``: per-module settings (:class:`AFPQQuantizeConfig`)."""
    from ..core.formats import get_format
    from ..data import calibration_samples

    f = get_format(fmt)
    cfg = AFPQQuantizeConfig(
        bits=f.bits, group_size=group_size, fmt=f.name, mode=mode, scale_dtype=scale_dtype, desc_act=desc_act,
        static_groups=static_groups, true_sequential=true_sequential, damp_percent=damp_percent,
        scale_search=scale_search, layer_specs=layer_specs,
    )
    if samples is None:
        samples = calibration_samples(tokenizer, nsamples, seqlen, seed=seed)
    examples = examples_from_ids(samples)
    return quantize_model(model, cfg, examples)


def run(model, tokenizer, spec, calib, progress: bool = True, desc_act: bool = False, static_groups: bool = False,
        true_sequential: bool = True, damp_percent: float = 0.01, layer_specs=None) -> AFPQConfigDict:
    """The registry's ``gptq`` method with ``--backend autogptq``: :func:`gptq_quantize` with
    ``spec``'s settings (a :class:`~afpq_plugins.core.spec.QuantSpec`) and ``calib``'s windows;
    ``layer_specs`` (a bits budget's choice): those modules on their own settings."""
    if spec.layout_for("gptq") != "gptq" or tuple(spec.skip) != ("lm_head",):
        raise ValueError("--method gptq writes layout gptq and keeps only lm_head in float (AutoGPTQ's layer lists)")
    return gptq_quantize(model, tokenizer, spec.fmt, spec.group_size, spec.mode, scale_dtype=spec.scale_dtype,
                         desc_act=desc_act, static_groups=static_groups, true_sequential=true_sequential,
                         damp_percent=damp_percent, scale_search=spec.scale_search, samples=calib.samples(tokenizer),
                         layer_specs=layer_specs)


def supports_model(model) -> Optional[str]:
    """None when AutoGPTQ 0.7.1 knows ``model``'s type, else a one-line reason."""
    from auto_gptq.modeling.auto import GPTQ_CAUSAL_LM_MODEL_MAP

    mt = getattr(model.config, "model_type", None)
    if mt in GPTQ_CAUSAL_LM_MODEL_MAP:
        return None
    return f"model type {mt!r} is not supported by AutoGPTQ 0.7.1 (--backend autogptq)"
