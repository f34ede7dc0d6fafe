"""Registration of ``quant_method: "afpq"`` with transformers: one place, idempotent, lazy.

:func:`register` uses the public API (``transformers.quantizers.auto.register_quantization_config``
and ``register_quantizer``, transformers >= 4.51, same signatures in 5.x). It is safe to
call any number of times, from any copy of this module: a registration of ours (same
class names from ``afpq_plugins.hf``) is left alone; a *foreign* "afpq" (say, a future
transformers with a native method of that name) is kept and reported, never
overwritten, unless ``force=True``.

:func:`register_lazily` is what ``import afpq_plugins`` calls (an installed package also registers
with no import of ours: ``_afpq_autoload``, run from a ``.pth`` file at interpreter start): it never imports
transformers itself (that costs 1 to 3 s). If ``transformers.quantizers.auto`` is
already imported it registers at once; otherwise a one-shot import hook registers
right after that module first executes (transformers imports it while importing
``modeling_utils``, i.e. before any ``from_pretrained`` can run).
"""

from __future__ import annotations

import importlib.util
import logging
import sys
import threading
from typing import Optional

from _afpq_autoload import TARGET as _TARGET
from _afpq_autoload import PostImportHook

__all__ = ["register", "register_lazily", "is_registered", "unregister", "METHOD"]

log = logging.getLogger(__name__)

METHOD = "afpq"
_lock = threading.RLock()


def _ours(cls) -> bool:
    return cls is not None and getattr(cls, "__module__", "").startswith("afpq_plugins.hf")


def is_registered() -> bool:
    """True when transformers maps "afpq" to this plugin's config and quantizer."""
    if _TARGET not in sys.modules:
        return False
    auto = sys.modules[_TARGET]
    return _ours(auto.AUTO_QUANTIZATION_CONFIG_MAPPING.get(METHOD)) and _ours(auto.AUTO_QUANTIZER_MAPPING.get(METHOD))


def register(force: bool = False) -> str:
    """Register "afpq" with transformers. Returns ``"registered"``, ``"already"`` or ``"foreign"``."""
    with _lock:
        from transformers.quantizers import auto

        from .config import AFPQConfig
        from .quantizer import AFPQHfQuantizer

        have_cfg = auto.AUTO_QUANTIZATION_CONFIG_MAPPING.get(METHOD)
        have_q = auto.AUTO_QUANTIZER_MAPPING.get(METHOD)
        if (have_cfg is not None and not _ours(have_cfg)) or (have_q is not None and not _ours(have_q)):
            if not force:
                log.warning(
                    "transformers already has a quantization method %r (%s / %s); afpq_plugins leaves it in place. "
                    "Call afpq_plugins.hf.register(force=True) to replace it.",
                    METHOD, getattr(have_cfg, "__qualname__", have_cfg), getattr(have_q, "__qualname__", have_q),
                )
                return "foreign"
        if have_cfg is AFPQConfig and have_q is AFPQHfQuantizer:
            return "already"
        # Ours from another copy of the module (reload), or foreign with force: replace through the public API.
        auto.AUTO_QUANTIZATION_CONFIG_MAPPING.pop(METHOD, None)
        auto.AUTO_QUANTIZER_MAPPING.pop(METHOD, None)
        auto.register_quantization_config(METHOD)(AFPQConfig)
        auto.register_quantizer(METHOD)(AFPQHfQuantizer)
        return "registered"


def unregister() -> None:
    """Remove this plugin's registration (tests); a foreign one is left alone."""
    with _lock:
        if _TARGET not in sys.modules:
            return
        auto = sys.modules[_TARGET]
        for mapping in (auto.AUTO_QUANTIZATION_CONFIG_MAPPING, auto.AUTO_QUANTIZER_MAPPING):
            if _ours(mapping.get(METHOD)):
                del mapping[METHOD]


def _safe_register() -> None:
    try:
        register()
    except Exception as exc:  # never break the host's import of transformers
        log.warning("afpq_plugins: could not register %r with transformers: %s", METHOD, exc)


#: The one post-import hook class (stdlib-only top-level module, shared with the .pth autoload, so a
#: hook already pending from interpreter start is recognised and not doubled).
_PostImportHook = PostImportHook


_hook: Optional[_PostImportHook] = None


def _remove_hook() -> None:
    global _hook
    with _lock:
        if _hook is not None:
            _hook.remove()
            _hook = None


def register_lazily() -> bool:
    """Register now if transformers' quantizer registry is loaded, else on its first import.

    Returns True if registered now. Does nothing (and imports nothing) when
    transformers is not installed. Idempotent.
    """
    global _hook
    with _lock:
        if _TARGET in sys.modules:
            _remove_hook()
            _safe_register()
            return True
        try:
            if importlib.util.find_spec("transformers") is None:
                return False
        except (ImportError, ValueError):  # a broken or blocked installation: stay out of the way
            return False
        if _hook is None and not any(isinstance(f, _PostImportHook) and f.target == _TARGET for f in sys.meta_path):
            _hook = _PostImportHook(_TARGET, _safe_register)
            sys.meta_path.insert(0, _hook)
        return False
