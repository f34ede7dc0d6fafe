"""transformers and optimum integration of AFPQ.

::

    import afpq_plugins                       # registers quant_method "afpq" (lazily)
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(afpq_checkpoint)
    model.save_pretrained(out)                # the same checkpoint format

    from afpq_plugins.hf import AFPQGPTQQuantizer, AFPQConfig
    q = AFPQGPTQQuantizer(bits=3, fmt="nf3", group_size=64, dataset=texts)
    q.quantize_model(model, tokenizer); q.save(model, out)

Importing this subpackage is cheap (it imports neither transformers nor optimum); the
names below load on first use, and the first use of ``AFPQConfig`` /
``AFPQHfQuantizer`` / ``AFPQGPTQQuantizer`` registers "afpq" with transformers.
"""

from __future__ import annotations

from .registration import METHOD, is_registered, register, register_lazily, unregister

register_lazily()

__all__ = [
    "AFPQConfig", "AFPQHfQuantizer", "AFPQGPTQQuantizer", "METHOD", "register", "register_lazily",
    "is_registered", "unregister",
]

_LAZY = {
    "AFPQConfig": ".config",
    "AFPQHfQuantizer": ".quantizer",
    "AFPQGPTQQuantizer": ".optimum",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        obj = getattr(importlib.import_module(_LAZY[name], __name__), name)
        register()
        globals()[name] = obj
        return obj
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
