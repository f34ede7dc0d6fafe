"""llm-compressor 0.14 adapter: AFPQ as a drop-in for ``GPTQModifier`` and ``AWQModifier`` in ``oneshot``.

    from llmcompressor import oneshot
    from afpq_plugins.llmcompressor import AFPQAWQModifier, AFPQGPTQModifier, save
    recipe = [AFPQGPTQModifier(fmt="nf3", group_size=64, ignore=["lm_head"])]
    # or AWQ: [AFPQAWQModifier(fmt="nf3", group_size=64, ignore=["lm_head"], duo_scaling="both")]
    oneshot(model=model, dataset=ds, recipe=recipe, num_calibration_samples=128)
    save(model, out, tokenizer=tok)          # the project's checkpoint format

All are subclasses of llm-compressor's modifiers; nothing of llm-compressor is edited.

* :class:`AFPQGPTQModifier` (:mod:`.gptq`): overrides ``compress_module_list`` and registers
  GPTQ's column update with compressed-tensors' ``ImplBackend``.
* AWQ (:mod:`.awq`): llm-compressor 0.14's AWQ is a transform followed by a quantization
  modifier, and so is the drop-in: ``AFPQAWQTransformModifier`` + ``AFPQQuantizationModifier``
  (``AFPQAWQModifier(...)`` returns both, like llm-compressor's own one-call
  ``AWQModifier``). AWQ's scale search (``_compute_best_scale``) dequantizes through
  compressed-tensors' one-scale ``(q - zero) * scale`` (``forward_quantize``, no registered
  entry point), so the override rebinds that name in llm-compressor's AWQ module to core's
  two-scale fake quantizer for the duration of each search call only; the smoothed
  weights are quantized by core and packed at ``on_finalize``. llm-compressor's AWQ has no
  clip search.
"""

from __future__ import annotations

__all__ = ["AFPQGPTQModifier", "AFPQAWQModifier", "AFPQAWQTransformModifier", "AFPQQuantizationModifier", "save",
           "quantize_model", "run_gptq", "run_awq"]
_AWQ = ("AFPQAWQModifier", "AFPQAWQTransformModifier", "AFPQQuantizationModifier")


def __getattr__(name):
    if name == "AFPQGPTQModifier":  # imports llmcompressor: on first use only
        from .gptq import AFPQGPTQModifier

        return AFPQGPTQModifier
    if name in _AWQ:
        from . import awq

        return getattr(awq, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def save(model, out_dir: str, tokenizer=None, overwrite: bool = True) -> str:
    """Write a model quantized by an AFPQ modifier (GPTQ, AWQ, quantization) as an AFPQ checkpoint."""
    from ..model import save_quantized

    qc = getattr(model, "_afpq_config", None)
    if qc is None:
        raise ValueError("save: the model was not quantized by an AFPQ modifier (no AFPQ config on it)")
    return save_quantized(model, out_dir, qc, tokenizer=tokenizer, overwrite=overwrite)


def quantize_model(model, tokenizer, spec, calib, method: str = "gptq", progress: bool = True,
                   damp_percent: float = 0.01, duo_scaling=True, n_grid: int = 20, layer_specs=None):
    """GPTQ or AWQ with ``spec``'s grid through llm-compressor's ``oneshot`` on the in-memory ``model``.

    The registry's ``gptq`` and ``awq`` methods with ``--backend llmcompressor``; ``calib``: a
    resolved :class:`~afpq_plugins.methods.Calibration` (Austen windows); ``spec``: a
    :class:`~afpq_plugins.core.spec.QuantSpec` (AWQ: layout ``None`` writes ``awq`` at 4 bits). ``damp_percent``:
    GPTQ only; ``duo_scaling`` / ``n_grid``: AWQ only (llm-compressor's defaults). ``layer_specs``:
    ``{module name: QuantSpec}``, per-module format, group size and mode (the registry's bits budget).
    """
    from datasets import Dataset
    from llmcompressor import oneshot

    common = dict(fmt=spec.fmt, group_size=spec.group_size, mode=spec.mode, scale_dtype=spec.scale_dtype,
                  scale_search=spec.scale_search, ignore=list(spec.skip), layer_specs=layer_specs)
    if method == "gptq":
        from .gptq import AFPQGPTQModifier

        recipe = [AFPQGPTQModifier(**common, dampening_frac=damp_percent)]
    elif method == "awq":
        from .awq import AFPQAWQModifier

        recipe = AFPQAWQModifier(**common, layout=spec.layout_for("awq"), duo_scaling=duo_scaling, n_grid=n_grid)
    else:
        raise ValueError(f"llm-compressor: unknown method {method!r} (gptq or awq)")
    samples = calib.samples(tokenizer)
    ds = Dataset.from_dict({"input_ids": [s.tolist() for s in samples],
                            "attention_mask": [[1] * s.numel() for s in samples]})
    oneshot(model=model, dataset=ds, recipe=recipe, num_calibration_samples=len(samples),
            max_seq_length=calib.seqlen, tokenizer=tokenizer)
    return model._afpq_config


def run_gptq(model, tokenizer, spec, calib, progress: bool = True, **options):
    """The registry's ``gptq`` method with ``--backend llmcompressor`` (:func:`quantize_model`)."""
    return quantize_model(model, tokenizer, spec, calib, method="gptq", progress=progress, **options)


def run_awq(model, tokenizer, spec, calib, progress: bool = True, **options):
    """The registry's ``awq`` method with ``--backend llmcompressor`` (:func:`quantize_model`)."""
    return quantize_model(model, tokenizer, spec, calib, method="awq", progress=progress, **options)
