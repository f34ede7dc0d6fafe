"""Save, load and one-call quantization for the AutoAWQ adapter.

* :func:`save_quantized` writes the project's one checkpoint format
  (``quant_method: "afpq"``, ``method: "awq"``, layout ``awq`` at 4 bits, ``gptq`` at 3).
* :func:`load_quantized` reads it with :func:`afpq_plugins.model.load_quantized`
  (pure torch + transformers: no IPEX, no CUDA, no AutoAWQ layer fusion, which only
  knows ``WQLinear_*`` modules) and wraps the model in its AutoAWQ class so
  ``model.generate`` / ``model.model`` work as after ``from_quantized``.
* AutoAWQ's own ``save_quantized`` on a model quantized here would write
  ``quant_method: "awq"`` and let stock AutoAWQ decode AFPQ codes as INT;
  :func:`make_awq_model_safe` points that method of the instance at ours.
"""

from __future__ import annotations

import time
import types
import warnings
from typing import Optional, Sequence

import torch
from torch import nn

from ..core.checkpoint import AFPQConfigDict, CheckpointError

__all__ = ["save_quantized", "load_quantized", "make_awq_model_safe", "wrap_for_awq", "awq_quantize", "quantize_awq"]


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


def load_quantized(path: str, device="cpu", dtype: Optional[torch.dtype] = None, wrap: bool = True):
    """Load an AFPQ checkpoint; with ``wrap`` (default) as an AutoAWQ model object.

    Never touches IPEX, CUDA kernels or AutoAWQ's ``fuse_layers``. ``wrap=False``
    returns the plain transformers model (as ``afpq_plugins.model.load_quantized``).
    """
    from ..core.checkpoint import read_quant_config
    from ..model import load_quantized as _load

    read_quant_config(path)  # a foreign or broken config fails here, naming the key
    hf = _load(path, device=device, dtype=dtype)
    if not wrap:
        return hf
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from awq.models._config import AwqConfig
        from awq.models.auto import AWQ_CAUSAL_LM_MODEL_MAP
    cls = AWQ_CAUSAL_LM_MODEL_MAP.get(hf.config.model_type)
    if cls is None:
        raise ValueError(f"AutoAWQ 0.2.9 has no model class for {hf.config.model_type!r}; use wrap=False")
    qd = hf.config.quantization_config
    awq_cfg = AwqConfig(quant_method="afpq", zero_point=qd["mode"] == "zp", q_group_size=qd["group_size"],
                        w_bit=qd["bits"], version="gemm", modules_to_not_convert=qd.get("modules_to_not_convert"))
    wrapped = cls(hf, hf.config.model_type, is_quantized=True, config=hf.config, quant_config=awq_cfg, processor=None)
    qc = AFPQConfigDict.from_dict(qd)
    hf._afpq_config = qc
    tok = None
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    except Exception:  # a checkpoint without tokenizer files is still a model
        tok = None
    make_awq_model_safe(wrapped, qc, tok)
    return wrapped


def wrap_for_awq(hf_model):
    """An AutoAWQ model object around an already loaded transformers causal LM
    (what ``AutoAWQForCausalLM.from_pretrained`` returns, without loading twice)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from awq.models._config import AwqConfig
        from awq.models.auto import AWQ_CAUSAL_LM_MODEL_MAP
    # As AutoAWQ's from_pretrained(use_cache=False): with a KV cache, the layer inputs
    # AutoAWQ captures carry a DynamicCache that grows on every calibration forward.
    hf_model.config.use_cache = False
    mt = hf_model.config.model_type
    cls = AWQ_CAUSAL_LM_MODEL_MAP.get(mt)
    if cls is None:
        raise ValueError(f"AutoAWQ 0.2.9 does not support model type {mt!r}")
    return cls(hf_model, mt, is_quantized=False, config=hf_model.config, quant_config=AwqConfig(), processor=None)


def awq_quantize(
    model,
    tokenizer,
    fmt="nf4",
    group_size: int = 128,
    mode: Optional[str] = None,
    clip: str = "symmetric",
    layout: Optional[str] = None,
    calib_data="austen",
    n_samples: int = 128,
    seqlen: int = 512,
    skip: Sequence[str] = ("lm_head",),
    scale_dtype=torch.float16,
    progress: bool = True,
    **quantize_kwargs,
) -> AFPQConfigDict:
    """AWQ on an AFPQ grid over a loaded transformers model (or AutoAWQ wrapper), in place.

    Returns the checkpoint's ``quantization_config``; save with
    :func:`afpq_plugins.model.save_quantized` or :func:`save_quantized`.
    ``calib_data`` defaults to the embedded Austen text (no download).
    """
    from ..core.formats import get_format
    from .quantizer import AFPQAwqQuantizer

    f = get_format(fmt)
    if isinstance(scale_dtype, str):
        scale_dtype = getattr(torch, scale_dtype)
    awq_model = model if hasattr(model, "quantize") and hasattr(model, "is_quantized") else wrap_for_awq(model)
    extra_skip = [s for s in skip if s != "lm_head"]
    qcfg = {"w_bit": f.bits, "q_group_size": group_size, "zero_point": True, "version": "gemm"}
    if extra_skip:
        qcfg["modules_to_not_convert"] = extra_skip
    from .compat import awq_progress

    with awq_progress(progress):
        awq_model.quantize(
            tokenizer, quant_config=qcfg, quantizer_cls=AFPQAwqQuantizer, calib_data=calib_data,
            max_calib_samples=n_samples, max_calib_seq_len=seqlen,
            fmt=f.name, mode=mode, clip=clip, layout=layout, scale_dtype=scale_dtype, **quantize_kwargs,
        )
    return getattr(awq_model.model, "_afpq_config", None)  # None after export_compatible=True (call pack())


def quantize_awq(model_path: str, out_dir: Optional[str] = None, dtype: torch.dtype = torch.float32,
                 overwrite: bool = False, **kwargs):
    """Load a float model folder, run :func:`awq_quantize`, optionally save.

    Returns ``(awq_model, tokenizer, seconds spent in AutoAWQ's quantize)``.
    """
    from ..data import load_model_and_tokenizer

    hf, tok = load_model_and_tokenizer(str(model_path), dtype=dtype)
    awq_model = wrap_for_awq(hf)
    t0 = time.perf_counter()
    awq_quantize(awq_model, tok, **kwargs)
    seconds = time.perf_counter() - t0
    if out_dir is not None:
        save_quantized(awq_model, out_dir, tokenizer=tok, overwrite=overwrite)
    return awq_model, tok, seconds
