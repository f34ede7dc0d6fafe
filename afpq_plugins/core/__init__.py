"""The torch-only core: formats, quantization maths, packing, the settings value, checkpoint format.

Importing it registers the built-in scale searches (``mse``: :mod:`.search`; ``output``:
:mod:`.output_search`) in the leaf registry :mod:`.search_registry`.
"""

from . import output_search as _output_search  # noqa: F401  (registers "output")
from . import search as _search  # noqa: F401  (registers "mse")
from .errors import CheckpointError, MethodUnavailable
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
from .spec import QuantSpec

__all__ = [
    "MODES", "Format", "get_format", "list_formats", "register_format", "resolve_mode",
    "pack", "unpack", "QuantizedWeight", "decode", "dequantize_weight", "encode",
    "fake_quantize", "find_params", "quantize_weight", "QuantSpec", "CheckpointError", "MethodUnavailable",
]
