"""afpq-plugins: Asymmetric Floating-Point Quantization (arXiv 2311.01792) for LLM tools.

``import afpq_plugins`` is cheap: it loads the torch-only core. Adapters for
AutoGPTQ, AutoAWQ, transformers and optimum live in subpackages and import their
backends lazily. The format itself is described in ``docs/format.md``.

Side effects on other libraries, all of them (:func:`side_effects` reports which are
active in this process):

1. ``import afpq_plugins`` (and ``import afpq_plugins.hf``) registers ``quant_method
   "afpq"`` with transformers (:mod:`afpq_plugins.hf.registration`): at once if
   ``transformers.quantizers.auto`` is already imported, else through a one-shot import
   hook on ``sys.meta_path`` that registers right after that module first executes and
   then removes itself. Nothing is imported from transformers until then; a foreign
   ``"afpq"`` is never overwritten. Undo: ``afpq_plugins.hf.unregister()``.
2. ``import afpq_plugins.autogptq`` (the documented opt-in: "change the import and the
   config") imports ``auto_gptq`` and wraps five of its entry points
   (``BaseGPTQForCausalLM.from_pretrained / quantize / save_quantized / from_quantized``,
   ``AutoGPTQForCausalLM.from_quantized``); each wrapper passes anything that is not an
   AFPQ config or checkpoint to the original untouched. Undo:
   ``afpq_plugins.autogptq.unregister()``; scoped use: ``with afpq_plugins.autogptq.registered():``
   after ``unregister()``. ``import afpq_plugins`` alone never does this.
3. Reading a checkpoint config (:class:`afpq_plugins.core.checkpoint.AFPQConfigDict`
   validation) whose ``format`` the registry does not know registers that grid from the
   config's ``table`` (so a custom grid reloads by name); built-in names are never
   replaced.
4. Loading with the transformers plugin binds two attributes on the *loaded model
   instance* only (transformers 4.53 ``_fix_state_dict_keys_on_save``, 5.x
   ``_keys_to_ignore_on_load_unexpected``), and :func:`afpq_plugins.autoawq.io.make_awq_model_safe`
   rebinds one AutoAWQ wrapper's ``save_quantized``; classes are untouched.
5. ``import afpq_plugins`` sets ``GPTQMODEL_CPU_WORKERS`` when it is unset, from the cores
   this process may run on, at least 2 (:mod:`afpq_plugins._engine_env`: GPTQModel 7.6's own
   default, 1 on a 2-core machine, cannot start its loader pool). A value already set is kept.
6. Every other upstream workaround is a scoped shim (``with`` block, one name, restored
   on exit: :func:`afpq_plugins._patching.patched`), never active outside its block.
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
from . import _engine_env

from .core.version import VERSION as __version__  # noqa: F401,E402


def _register_with_transformers() -> None:
    """Register quant_method "afpq" with transformers, lazily (afpq_plugins.hf.registration)."""
    from .hf.registration import register_lazily  # stdlib only; never imports transformers

    register_lazily()


def side_effects() -> dict:
    """Which of the side effects listed in the module docstring are active now.

    ``{"transformers": "registered" | "pending import hook" | "off",
    "autogptq": "wrapped" | "off", "custom_formats": [names registered beyond the built-ins]}``.
    Imports nothing that is not imported already.
    """
    import sys

    from .core.formats import get_format, list_formats

    hf = "off"
    reg = sys.modules.get("afpq_plugins.hf.registration")
    if reg is not None:
        if reg.is_registered():
            hf = "registered"
        elif any(isinstance(f, reg._PostImportHook) for f in sys.meta_path):
            hf = "pending import hook"
    gptq = "off"
    hooks = sys.modules.get("afpq_plugins.autogptq.hooks")
    if hooks is not None and "auto_gptq" in sys.modules and hooks.is_registered():
        gptq = "wrapped"
    custom = sorted(n for n in list_formats() if get_format(n).kind == "custom")
    return {"transformers": hf, "autogptq": gptq, "custom_formats": custom}


_register_with_transformers()
_engine_env.configure()
