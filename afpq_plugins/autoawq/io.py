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
import warnings
from typing import Optional, Sequence

import torch

from ..core.checkpoint import AFPQConfigDict
from .saving import make_awq_model_safe, save_quantized

__all__ = ["load_quantized", "wrap_for_awq", "awq_quantize", "quantize_awq", "run", "supports_model"]


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


def run(model, tokenizer, spec, calib, progress: bool = True, clip: str = "symmetric",
        layer_specs=None) -> AFPQConfigDict:
    """The registry's ``awq`` method with ``--backend autoawq``: :func:`awq_quantize` with
    ``spec``'s settings (a :class:`~afpq_plugins.core.spec.QuantSpec`; layout ``None``: ``awq``
    at 4 bits) on ``calib``'s windows; ``layer_specs`` (a bits budget's choice): those modules on
    their own settings (:class:`~afpq_plugins.autoawq.quantizer.AFPQAwqQuantizer`)."""
    kw = {"layer_specs": layer_specs} if layer_specs else {}
    return awq_quantize(model, tokenizer, spec.fmt, spec.group_size, spec.mode, clip=clip,
                        layout=spec.layout_for("awq"), skip=list(spec.skip), scale_dtype=spec.torch_scale_dtype,
                        calib_data=[s.tolist() for s in calib.samples(tokenizer)], n_samples=calib.nsamples,
                        seqlen=calib.seqlen, progress=progress, scale_search=spec.scale_search, **kw)


def supports_model(model) -> Optional[str]:
    """None when AutoAWQ 0.2.9 knows ``model``'s type, else a one-line reason."""
    with warnings.catch_warnings():  # AutoAWQ 0.2.9 warns at import that it is deprecated
        warnings.simplefilter("ignore")
        from awq.models.auto import AWQ_CAUSAL_LM_MODEL_MAP
    mt = getattr(model.config, "model_type", None)
    if mt in AWQ_CAUSAL_LM_MODEL_MAP:
        return None
    return f"model type {mt!r} is not supported by AutoAWQ 0.2.9 (--backend autoawq)"
