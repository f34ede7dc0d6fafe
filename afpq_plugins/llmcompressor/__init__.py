"""llm-compressor 0.14 adapter: AFPQ as a drop-in for ``GPTQModifier`` in ``oneshot``.

    from llmcompressor import oneshot
    from afpq_plugins.llmcompressor import AFPQGPTQModifier, save
    recipe = [AFPQGPTQModifier(fmt="nf3", group_size=64, ignore=["lm_head"])]
    oneshot(model=model, dataset=ds, recipe=recipe, num_calibration_samples=128)
    save(model, out, tokenizer=tok)          # the project's checkpoint format

``AWQModifier`` is not covered: llm-compressor 0.14's AWQ is a transform whose scale
search quantizes through compressed-tensors' ``forward_quantize`` (an affine
``(q - zero) * scale`` with one scale per group; only the rounding step ``_quantize`` is
a registered ``ImplBackend`` entry point, the dequantization is not), so a two-scale
grid cannot be put into its search without overriding private methods.
"""

from __future__ import annotations

__all__ = ["AFPQGPTQModifier", "save", "quantize_model"]


def __getattr__(name):
    if name == "AFPQGPTQModifier":  # imports llmcompressor: on first use only
        from .gptq import AFPQGPTQModifier

        return AFPQGPTQModifier
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def save(model, out_dir: str, tokenizer=None, overwrite: bool = True) -> str:
    """Write a model quantized by :class:`AFPQGPTQModifier` as an AFPQ checkpoint."""
    from ..model import save_quantized

    qc = getattr(model, "_afpq_config", None)
    if qc is None:
        raise ValueError("save: the model was not quantized by an AFPQ modifier (no AFPQ config on it)")
    return save_quantized(model, out_dir, qc, tokenizer=tokenizer, overwrite=overwrite)


def quantize_model(model, tokenizer, spec, calib, progress: bool = True, damp_percent: float = 0.01):
    """GPTQ with ``spec``'s grid through llm-compressor's ``oneshot`` on the in-memory ``model``.

    The registry's ``gptq`` method with ``--backend llmcompressor``; ``calib``: a resolved
    :class:`~afpq_plugins.methods.Calibration` (Austen windows).
    """
    from datasets import Dataset
    from llmcompressor import oneshot

    from .gptq import AFPQGPTQModifier

    samples = calib.samples(tokenizer)
    ds = Dataset.from_dict({"input_ids": [s.tolist() for s in samples],
                            "attention_mask": [[1] * s.numel() for s in samples]})
    mod = AFPQGPTQModifier(fmt=spec.fmt, group_size=spec.group_size, mode=spec.mode, scale_dtype=spec.scale_dtype,
                           scale_search=spec.scale_search, ignore=list(spec.skip), dampening_frac=damp_percent)
    oneshot(model=model, dataset=ds, recipe=[mod], num_calibration_samples=len(samples),
            max_seq_length=calib.seqlen, tokenizer=tokenizer)
    return model._afpq_config
