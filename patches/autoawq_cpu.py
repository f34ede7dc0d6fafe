"""CPU shim for AutoAWQ 0.2.9, usable without importing ``afpq_plugins``.

The shim lives in ``afpq_plugins/autoawq/compat.py`` (``AFPQAwqQuantizer`` enters it
on its own); this file loads that module by path so that a plain AutoAWQ INT run on
CPU can use it too::

    import importlib.util
    spec = importlib.util.spec_from_file_location("autoawq_cpu", "patches/autoawq_cpu.py")
    cpu = importlib.util.module_from_spec(spec); spec.loader.exec_module(cpu)

    class CpuSafeAwqQuantizer(AwqQuantizer):
        def _compute_best_scale(self, x, w_mean, x_mean, module2inspect, *args, **kw):
            with cpu.snapshot_state_dict(module2inspect):
                return super()._compute_best_scale(x, w_mean, x_mean, module2inspect, *args, **kw)

    model.quantize(tok, quant_config, quantizer_cls=CpuSafeAwqQuantizer)

``snapshot_state_dict(module)``: AutoAWQ 0.2.9's scale search saves a block's weights
with ``.cpu()`` (a no-op on CPU tensors) and then scales them in place, so on CPU every
candidate's scales accumulate in the weights. The shim makes that one module's
``state_dict()`` return copies for the duration of the block. ``awq_progress(enabled)``
silences AutoAWQ's progress bar.
"""

import importlib.util
import os

_spec = importlib.util.spec_from_file_location(
    "_afpq_autoawq_compat",
    os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "afpq_plugins", "autoawq", "compat.py"),
)
_mod = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_mod)

snapshot_state_dict = _mod.snapshot_state_dict
awq_progress = _mod.awq_progress
