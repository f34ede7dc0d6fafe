"""Registered when installed: ``quant_method "afpq"`` for transformers with no import of ours.

The wheel (and the editable install) puts ``afpq_plugins-autoload.pth`` into site-packages;
Python runs its one line at interpreter start::

    import os; os.environ.get("AFPQ_PLUGINS_AUTOLOAD", "1") ... and __import__("_afpq_autoload").install()

:func:`install` puts one :class:`PostImportHook` at the front of ``sys.meta_path``. It is
stdlib only and imports nothing else: until ``transformers.quantizers.auto`` is imported
(transformers imports it while importing ``modeling_utils``, i.e. before any
``from_pretrained``), the whole cost is this module and one ``fullname != target`` comparison
per import. When that module has executed, the hook removes itself and calls
``afpq_plugins.hf.registration.register`` (which imports afpq_plugins and its transformers
config and quantizer classes; torch and transformers are already loaded by then). So
``AutoModelForCausalLM.from_pretrained(afpq_checkpoint)``, ``pipeline(...)`` and
``lm_eval --model hf`` load AFPQ checkpoints in a fresh process.

Turn it off with ``AFPQ_PLUGINS_AUTOLOAD=0`` (also ``false``, ``no``, ``off``): transformers
then behaves as stock (it refuses an AFPQ checkpoint), and ``import afpq_plugins`` still
registers explicitly. A foreign ``"afpq"`` in transformers is never overwritten, and an error
while registering is logged, never raised into the host's ``import transformers``.
"""

from __future__ import annotations

import os
import sys

__all__ = ["ENV", "TARGET", "PostImportHook", "enabled", "install", "installed", "uninstall"]

ENV = "AFPQ_PLUGINS_AUTOLOAD"
TARGET = "transformers.quantizers.auto"
_OFF = ("0", "false", "no", "off")
# No importlib.abc, importlib.util or threading at start-up (they cost milliseconds in every
# Python process): a finder and a loader are plain objects with find_spec / exec_module.


def enabled(environ=None) -> bool:
    """False when ``AFPQ_PLUGINS_AUTOLOAD`` is 0/false/no/off."""
    env = os.environ if environ is None else environ
    return env.get(ENV, "1").strip().lower() not in _OFF


class PostImportHook:
    """Calls ``callback()`` right after module ``target`` first executes, then removes itself."""

    def __init__(self, target: str, callback) -> None:
        self.target = target
        self.callback = callback

    def remove(self) -> None:
        try:
            sys.meta_path.remove(self)
        except ValueError:
            pass

    def find_spec(self, fullname, path, target=None):
        if fullname != self.target:
            return None
        import importlib.util

        self.remove()
        spec = importlib.util.find_spec(fullname)  # the normal finders, without us
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        loader, callback = spec.loader, self.callback

        class _Loader:
            """The original loader, plus one call after ``exec_module``."""

            def create_module(self, spec_):
                return loader.create_module(spec_)

            def exec_module(self, module):
                loader.exec_module(module)
                callback()

            def __getattr__(self, name):  # get_source, get_code, is_package, ... (linecache, inspect)
                return getattr(loader, name)

        spec.loader = _Loader()
        return spec


def _register() -> None:
    try:
        from afpq_plugins.hf.registration import _safe_register
    except Exception as exc:  # afpq_plugins removed or broken: never break the host's import of transformers
        import logging

        logging.getLogger("afpq_plugins").warning("afpq_plugins autoload: could not import afpq_plugins: %s", exc)
        return
    _safe_register()


def installed() -> bool:
    """True while a hook for transformers' quantizer registry is pending (ours or the package's)."""
    return any(isinstance(f, PostImportHook) and f.target == TARGET for f in sys.meta_path)


def install() -> bool:
    """Register at once if transformers' quantizer registry is loaded, else on its first import.

    Returns False (and does nothing) when disabled by ``AFPQ_PLUGINS_AUTOLOAD``. Idempotent.
    """
    if not enabled():
        return False
    if TARGET in sys.modules:
        _register()
    elif not installed():
        sys.meta_path.insert(0, PostImportHook(TARGET, _register))
    return True


def uninstall() -> None:
    """Remove every pending hook of this module (tests)."""
    for f in [f for f in sys.meta_path if isinstance(f, PostImportHook) and f.target == TARGET]:
        f.remove()
