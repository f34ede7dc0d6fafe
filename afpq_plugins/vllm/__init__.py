"""vLLM integration of AFPQ: serve AFPQ checkpoints with ``vllm serve`` / ``LLM(...)``.

::

    vllm serve out/nf4                      # quant_method "afpq" in config.json selects the plugin
    vllm serve out/nf4 --quantization afpq  # accepted too

    from vllm import LLM
    llm = LLM(model="out/nf4", tensor_parallel_size=2)

vLLM loads :func:`register` in every process it starts (API server, engine core, each
tensor-parallel worker) through the ``vllm.general_plugins`` entry point declared in
``pyproject.toml``; it registers :class:`~afpq_plugins.vllm.config.AFPQVllmConfig` as
``"afpq"`` with vLLM's public ``register_quantization_config``. Registration is
idempotent and cheap (vLLM is already imported by then; nothing is read from disk).

Importing this subpackage does not import vLLM; the names below load on first use.
"""

from __future__ import annotations

import logging
import threading

__all__ = ["register", "is_registered", "METHOD", "AFPQVllmConfig", "AFPQLinearMethod"]

log = logging.getLogger(__name__)

METHOD = "afpq"
_lock = threading.Lock()


def _ours(cls) -> bool:
    return cls is not None and getattr(cls, "__module__", "").startswith("afpq_plugins.vllm")


def is_registered() -> bool:
    """True when vLLM maps "afpq" to this plugin's config class (imports vLLM's quantization registry)."""
    from vllm.model_executor.layers import quantization as q

    return METHOD in q.QUANTIZATION_METHODS and _ours(q._CUSTOMIZED_METHOD_TO_QUANT_CONFIG.get(METHOD))


def register() -> str:
    """Register "afpq" with vLLM (the ``vllm.general_plugins`` entry point).

    Returns ``"registered"`` or ``"already"``. A vLLM that ships its own "afpq" is left
    alone (``"foreign"``, with a warning).
    """
    with _lock:
        from vllm.model_executor.layers import quantization as q

        have = q._CUSTOMIZED_METHOD_TO_QUANT_CONFIG.get(METHOD)
        if _ours(have) and METHOD in q.QUANTIZATION_METHODS:
            return "already"
        if have is None and METHOD in q.QUANTIZATION_METHODS:
            log.warning("vLLM already has a built-in quantization method %r; afpq_plugins leaves it in place", METHOD)
            return "foreign"
        from .config import AFPQVllmConfig

        q.register_quantization_config(METHOD)(AFPQVllmConfig)
        return "registered"


_LAZY = {"AFPQVllmConfig": ".config", "AFPQLinearMethod": ".linear_method"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        obj = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = obj
        return obj
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
