"""Scoped shims that let AutoGPTQ 0.7.1 quantize and load on a machine without CUDA.

Each shim is a context manager that replaces one name and restores it on exit; none is
active outside its ``with`` block, and none is entered when CUDA is available (they
are then no-ops). They are not AFPQ-specific: the INT workflow in the integration
tests uses the same ones, so a stock INT run and an INT run beside the AFPQ adapter
are compared under identical conditions.

This module imports only ``torch``, ``auto_gptq`` and the stdlib-only
``afpq_plugins/_patching.py`` (by path when it has no package), so it can be
loaded by file path in a process that must not import the adapter
(``patches/autogptq_cpu.py`` does exactly that).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

__all__ = [
    "cuda_available",
    "patched",
    "no_cuda_synchronize",
    "cpu_layer_device",
    "allow_cpu_from_pretrained",
    "cpu_quantize",
    "keyword_layer_calls",
    "generate_without_cpu_autocast",
]


def cuda_available() -> bool:
    return torch.cuda.is_available()


def _patching():
    """The project's ``patched`` primitive (``afpq_plugins/_patching.py``), also when this
    file is loaded by path outside the package (then that file is loaded by path too)."""
    try:
        from .. import _patching
    except ImportError:  # no parent package: loaded by file path
        import importlib.util
        import os

        path = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "_patching.py")
        spec = importlib.util.spec_from_file_location("_afpq_patching_standalone", os.path.normpath(path))
        _patching = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(_patching)
    return _patching


patched = _patching().patched
no_cuda_synchronize = _patching().no_cuda_synchronize  # shared with optimum on auto-gptq (hf.compat)


@contextlib.contextmanager
def cpu_layer_device() -> Iterator[None]:
    """auto-gptq 0.7.1 ``BaseGPTQForCausalLM.quantize`` moves every decoder layer found
    on CPU to ``CUDA_0`` (``auto_gptq.modeling._base.CUDA_0 = torch.device("cuda:0")``)
    before running it. Without CUDA that name points at the CPU instead, so the layers
    stay where they are (quantize then runs exactly as it does on a GPU)."""
    if cuda_available():
        yield
        return
    from auto_gptq.modeling import _base

    with patched(_base, "CUDA_0", torch.device("cpu")):
        yield


@contextlib.contextmanager
def allow_cpu_from_pretrained() -> Iterator[None]:
    """auto-gptq 0.7.1 ``BaseGPTQForCausalLM.from_pretrained`` starts with
    ``if not torch.cuda.is_available(): raise EnvironmentError(...)`` although it loads
    the float model on the CPU (``device_map=None``) and needs no GPU until
    ``quantize``. ``torch.cuda.is_available`` answers True for the duration of that one
    call only; everything it does afterwards (``empty_cache`` of an uninitialised CUDA,
    ``AutoModelForCausalLM.from_pretrained`` without a device map) stays on the CPU.
    Use it around ``from_pretrained`` alone, never around code that would try to use
    the GPU it pretends to have."""
    if cuda_available():
        yield
        return
    with patched(torch.cuda, "is_available", lambda: True):
        yield


@contextlib.contextmanager
def cpu_quantize() -> Iterator[None]:
    """Both shims ``BaseGPTQForCausalLM.quantize`` needs on a CPU-only machine."""
    with cpu_layer_device(), no_cuda_synchronize():
        yield


class _KeywordCall:
    """Calls ``module(hidden_states, **kwargs)`` with extra positional args named."""

    def __init__(self, module, names):
        self.module = module
        self.names = names

    def __call__(self, hidden_states=None, *args, **kwargs):
        if len(args) > len(self.names):
            raise TypeError(f"{type(self.module).__name__}: {len(args)} positional arguments, expected at most {len(self.names)}")
        for name, value in zip(self.names, args):
            if name in kwargs:
                raise TypeError(f"{type(self.module).__name__}: got multiple values for {name!r}")
            kwargs[name] = value
        return self.module(hidden_states, **kwargs)

    def __getattr__(self, name):
        return getattr(self.module, name)


@contextlib.contextmanager
def keyword_layer_calls(layers) -> Iterator[None]:
    """auto-gptq 0.7.1 catches the first decoder layer's inputs with a ``LayerHijacker``
    whose ``forward(self, inp=None, **kwargs)`` accepts the hidden states as its only
    positional argument. transformers >= 4.5x GPT-2 (``GPT2Model.forward`` in 4.53.3)
    calls its blocks as ``block(hidden_states, past_key_values, cache_position,
    causal_mask, head_mask[i], encoder_hidden_states, ...)``, which the hijacker rejects
    with a TypeError. While the block is active, iterating ``layers`` (the model's
    ``nn.ModuleList`` of decoder layers, the only way those models reach their blocks)
    yields callables that pass those extra positional arguments by the names of the
    decoder layer's own ``forward`` parameters, so the hijacker records them as keyword
    inputs and AutoGPTQ replays them to the real layer by keyword. Indexing, ``len``,
    ``.to`` and the state dict are unaffected; the instance's class is restored on exit.
    """
    import inspect

    from torch import nn

    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        yield
        return
    params = list(inspect.signature(type(layers[0]).forward).parameters.values())[2:]
    names = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    base = type(layers)

    def __iter__(self):
        for m in base.__iter__(self):
            yield _KeywordCall(m, names)

    keyword_list = type("KeywordCallModuleList", (base,), {"__iter__": __iter__})
    with patched(layers, "__class__", keyword_list):
        yield


def generate_without_cpu_autocast(wrapper, **kwargs):
    """``BaseGPTQForCausalLM.generate`` minus CPU autocast.

    auto-gptq 0.7.1 wraps ``model.generate`` in ``torch.amp.autocast(device.type)``; on
    CPU that autocasts to bfloat16, and a float16 model then fails inside its layer
    norms. Off CPU this is exactly upstream's method; bound to an instance (the AFPQ
    loader does it for the wrappers it returns), stock wrappers are untouched.
    """
    if wrapper.device.type != "cpu":
        with torch.inference_mode(), torch.amp.autocast(device_type=wrapper.device.type):
            return wrapper.model.generate(**kwargs)
    with torch.inference_mode():
        return wrapper.model.generate(**kwargs)
