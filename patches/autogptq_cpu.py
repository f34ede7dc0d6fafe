"""CPU shims for AutoGPTQ 0.7.1, usable without importing ``afpq_plugins``.

The shims themselves live in ``afpq_plugins/autogptq/compat.py`` (the adapter enters them
on its own); this file loads that module by path (it loads the stdlib-only
``afpq_plugins/_patching.py`` the same way) so that a plain AutoGPTQ script, or a
test that must not import the adapter, can use them too::

    import importlib.util
    spec = importlib.util.spec_from_file_location("autogptq_cpu", "patches/autogptq_cpu.py")
    cpu = importlib.util.module_from_spec(spec); spec.loader.exec_module(cpu)
    with cpu.allow_cpu_from_pretrained():
        model = AutoGPTQForCausalLM.from_pretrained(path, BaseQuantizeConfig(bits=4, group_size=128))
    with cpu.cpu_quantize():
        model.quantize(examples)

Each shim patches one name for the duration of its block and is a no-op when CUDA is
available:

``no_cuda_synchronize``       ``torch.cuda.synchronize`` (called by ``GPTQ.fasterquant``)
``cpu_layer_device``          ``auto_gptq.modeling._base.CUDA_0`` (quantize moves layers there)
``allow_cpu_from_pretrained`` ``torch.cuda.is_available`` (``from_pretrained``'s CUDA guard)
``cpu_quantize``              the first two together
``keyword_layer_calls``       a decoder-layer ``ModuleList``'s iteration (transformers 4.53
                              GPT-2 passes block inputs positionally; AutoGPTQ's
                              ``LayerHijacker`` takes keywords only)
"""

from __future__ import annotations

import importlib.util
import os
import sys

_COMPAT = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "afpq_plugins", "autogptq", "compat.py")
_spec = importlib.util.spec_from_file_location("_afpq_autogptq_compat_standalone", os.path.normpath(_COMPAT))
_mod = importlib.util.module_from_spec(_spec)
sys.modules.setdefault(_spec.name, _mod)
_spec.loader.exec_module(_mod)

from _afpq_autogptq_compat_standalone import (  # noqa: E402
    allow_cpu_from_pretrained,
    cpu_layer_device,
    cpu_quantize,
    keyword_layer_calls,
    no_cuda_synchronize,
    patched,
)

__all__ = ["allow_cpu_from_pretrained", "cpu_layer_device", "cpu_quantize", "keyword_layer_calls",
           "no_cuda_synchronize", "patched"]
