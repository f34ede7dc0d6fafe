"""Names and small tables of the AFPQ checkpoint format, in one place.

Every module that needs one of these imports it from here; see ``docs/format.md`` for
what they mean.
"""

from __future__ import annotations

from typing import Dict, Tuple

import torch

__all__ = [
    "QUANT_METHOD",
    "FORMAT_VERSION",
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "SCALE_DTYPES",
    "SCALE_DTYPE_NAMES",
    "scale_dtype",
    "scale_dtype_name",
    "LAYER_PARAM_SUFFIXES",
    "PLACEHOLDER_SUFFIXES",
    "QUANTIZED_KEY_SUFFIXES",
]

#: ``quantization_config.quant_method`` of every AFPQ checkpoint.
QUANT_METHOD = "afpq"
#: ``quantization_config.version`` this code writes and reads.
FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"

#: Storage dtypes of the group parameters (``quantization_config.scale_dtype``).
SCALE_DTYPES: Dict[str, torch.dtype] = {
    "float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32,
}
SCALE_DTYPE_NAMES: Tuple[str, ...] = tuple(SCALE_DTYPES)


def scale_dtype(value, what: str = "scale_dtype") -> torch.dtype:
    """``"float16"`` / ``torch.float16`` -> ``torch.float16``; anything else is a
    ``ValueError`` naming ``what``."""
    if isinstance(value, torch.dtype) and value in SCALE_DTYPES.values():
        return value
    if isinstance(value, str) and value in SCALE_DTYPES:
        return SCALE_DTYPES[value]
    raise ValueError(f"{what} must be one of {', '.join(SCALE_DTYPE_NAMES)}, got {value!r}")


def scale_dtype_name(dtype) -> str:
    """``torch.float16`` -> ``"float16"`` (the checkpoint's spelling)."""
    return str(scale_dtype(dtype)).replace("torch.", "")


#: Tensors of one quantized layer besides ``bias``: ``<layer>.<suffix>``.
LAYER_PARAM_SUFFIXES: Tuple[str, ...] = ("qweight", "scales", "scales_neg", "zeros", "g_idx")
#: Keys of a quantized layer that hold the uint8 ``[1]`` refusal placeholder.
PLACEHOLDER_SUFFIXES: Tuple[str, ...] = ("weight", "qzeros")
#: Key endings that only a quantized checkpoint has (AFPQ or GPTQ/AWQ INT): a float
#: model's ``config.json`` beside such tensors lost its ``quantization_config``.
QUANTIZED_KEY_SUFFIXES: Tuple[str, ...] = (".qweight", ".scales_neg", ".qzeros")
