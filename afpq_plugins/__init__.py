"""afpq-plugins: Asymmetric Floating-Point Quantization (arXiv 2311.01792) for LLM tools.

``import afpq_plugins`` is cheap: it loads the torch-only core. Adapters for
AutoGPTQ, AutoAWQ, transformers and optimum live in subpackages and import their
backends lazily.
"""

from .core import (  # noqa: F401
    MODES,
    Format,
    fake_quantize,
    get_format,
    list_formats,
    quantize_weight,
    register_format,
)
from .nn import AFPQLinear  # noqa: F401

__version__ = "0.1.0"


def _register_with_transformers() -> None:
    """Register quant_method "afpq" with transformers, lazily (afpq_plugins.hf.registration)."""
    from .hf.registration import register_lazily  # stdlib only; never imports transformers

    register_lazily()


_register_with_transformers()
