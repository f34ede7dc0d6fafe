"""AutoAWQ 0.2.9 adapter: AWQ's activation-aware scale and clip search on AFPQ grids.

::

    from awq import AutoAWQForCausalLM
    from afpq_plugins.autoawq import AFPQAwqQuantizer, save_quantized, load_quantized

    model = AutoAWQForCausalLM.from_pretrained(path, torch_dtype=torch.float32)
    model.quantize(tok, quant_config={"w_bit": 3, "q_group_size": 64, "zero_point": True, "version": "gemm"},
                   quantizer_cls=AFPQAwqQuantizer, fmt="nf3", clip="two-sided", calib_data="austen")
    save_quantized(model, out)                 # AFPQ checkpoint (quant_method "afpq", method "awq")
    model = load_quantized(out, device="cpu")  # no IPEX, no CUDA, no AutoAWQ layer fusion

Importing this package is cheap; AutoAWQ is imported on first use of a name that
needs it (:class:`AFPQAwqQuantizer`, :func:`quantize_awq`, ...).
"""

from __future__ import annotations

import importlib

__all__ = [
    "AFPQAwqQuantizer",
    "CLIP_MODES",
    "awq_quantize",
    "wrap_for_awq",
    "calibration_token_lists",
    "load_quantized",
    "quantize_awq",
    "save_quantized",
]

_LAZY = {
    "AFPQAwqQuantizer": ".quantizer",
    "CLIP_MODES": ".quantizer",
    "calibration_token_lists": ".calib",
    "load_quantized": ".io",
    "save_quantized": ".saving",
    "quantize_awq": ".io",
    "awq_quantize": ".io",
    "wrap_for_awq": ".io",
}


def __getattr__(name: str):
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(mod, __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(list(globals()) + list(_LAZY))
