"""The torch-only core: formats, quantization maths, packing, checkpoint format."""

from .formats import MODES, Format, get_format, list_formats, register_format, resolve_mode
from .packing import pack, unpack
from .quantize import (
    QuantizedWeight,
    decode,
    dequantize_weight,
    encode,
    fake_quantize,
    find_params,
    quantize_weight,
)

__all__ = [
    "MODES", "Format", "get_format", "list_formats", "register_format", "resolve_mode",
    "pack", "unpack", "QuantizedWeight", "decode", "dequantize_weight", "encode",
    "fake_quantize", "find_params", "quantize_weight",
]
