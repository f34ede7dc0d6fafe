"""Writing an AutoAWQ model quantized on an AFPQ grid: the checkpoint save and the wrapper's save hook."""

from __future__ import annotations

import types
from typing import Optional

from torch import nn

from ..core.checkpoint import AFPQConfigDict

__all__ = ["save_quantized", "make_awq_model_safe"]


def _hf_model(model) -> nn.Module:
    """The transformers model inside an AutoAWQ wrapper (or the model itself)."""
    inner = getattr(model, "model", None)
    if inner is not None and hasattr(model, "quant_config") and hasattr(model, "is_quantized"):
        return inner
    return model


def save_quantized(model, out_dir: str, tokenizer=None, overwrite: bool = False) -> str:
    """Write a model quantized with :class:`AFPQAwqQuantizer` as an AFPQ checkpoint.

    ``model``: the AutoAWQ wrapper (or its transformers model). ``tokenizer``: saved
    alongside (default: the one the quantizer was given).
    """
    from ..model import save_quantized as _save

    hf = _hf_model(model)
    qc: Optional[AFPQConfigDict] = getattr(hf, "_afpq_config", None)
    if qc is None:
        raise ValueError(
            "this model was not quantized with afpq_plugins.autoawq.AFPQAwqQuantizer "
            "(or quantize(..., export_compatible=True) was not followed by pack())"
        )
    from awq.modules.act import ScaledActivation

    scaled = [n for n, m in hf.named_modules() if isinstance(m, ScaledActivation)]
    if scaled:
        raise NotImplementedError(
            f"{scaled[0]}: AWQ folded its scales into an activation (ScaledActivation), which the "
            "AFPQ checkpoint format cannot represent yet"
        )
    if tokenizer is None:
        q = getattr(model, "quantizer", None)
        tokenizer = getattr(q, "tokenizer", None)
    return _save(hf, out_dir, qc, tokenizer=tokenizer, overwrite=overwrite)


def make_awq_model_safe(awq_model, qc: AFPQConfigDict, tokenizer=None) -> None:
    """Route the wrapper's AutoAWQ ``save_quantized`` to :func:`save_quantized`.

    Patches this instance only (not the class): AutoAWQ 0.2.9's ``save_quantized``
    would write ``quant_method: "awq"`` over AFPQ tensors. Also marks its
    ``quant_config`` as ``afpq``.
    """

    def _safe_save(self, save_dir, safetensors=True, shard_size="5GB", overwrite=True):
        if not safetensors:
            raise ValueError("AFPQ checkpoints are safetensors only")
        return save_quantized(self, save_dir, tokenizer=tokenizer, overwrite=overwrite)

    object.__setattr__(awq_model, "save_quantized", types.MethodType(_safe_save, awq_model))
    qcfg = getattr(awq_model, "quant_config", None)
    if qcfg is not None and hasattr(qcfg, "quant_method"):
        qcfg.quant_method = "afpq"
