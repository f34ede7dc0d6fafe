"""AutoGPTQ 0.7.1 adapter: GPTQ with AFPQ grids in existing AutoGPTQ workflows.

    import afpq_plugins.autogptq                      # registers the adapter
    from afpq_plugins.autogptq import AFPQQuantizeConfig
    from auto_gptq import AutoGPTQForCausalLM
    cfg = AFPQQuantizeConfig(bits=3, group_size=64, fmt="nf3", desc_act=True)
    model = AutoGPTQForCausalLM.from_pretrained(path, cfg)
    model.quantize(examples)
    model.save_quantized(out)                          # the project's checkpoint format
    model = AutoGPTQForCausalLM.from_quantized(out, device="cpu")

Importing this package imports ``auto_gptq`` and wraps five of its entry points
(:mod:`.hooks`); the wrappers act only on :class:`AFPQQuantizeConfig` objects and AFPQ
checkpoints and hand everything else to AutoGPTQ untouched. ``unregister()`` removes
them; ``with registered():`` scopes them (all side effects: ``afpq_plugins`` docstring).
:func:`quantize_model` runs the same GPTQ on an in-memory transformers model.
"""

from __future__ import annotations

from . import hooks as _hooks
from .config import AFPQQuantizeConfig
from .hooks import afpq_hooks, is_registered, load_afpq, register, registered, save_afpq, unregister, wrap_model
from .qlinear import AFPQQuantLinear, quant_linear_class
from .quantizer import AFPQGPTQ, AFPQQuantizer
from .api import examples_from_ids, gptq_quantize, quantize_model

__all__ = [
    "AFPQQuantizeConfig", "AFPQQuantizer", "AFPQGPTQ", "AFPQQuantLinear", "quant_linear_class",
    *_hooks.__all__,
    "quantize_model", "examples_from_ids", "gptq_quantize",
]

register()
