"""``patched``: set one attribute for the duration of a ``with`` block, then restore it.

The one implementation of the scoped-shim primitive every upstream workaround in the
project uses (the adapters' ``compat`` modules, the CLI), and the CPU shims more than one
adapter enters (:func:`no_cuda_synchronize`: AutoGPTQ's and optimum-on-AutoGPTQ's GPTQ).

Standard library only at import (torch is imported inside the shim that needs it), and no
package-relative imports, on purpose: the AutoGPTQ shims are loaded by file path from
``patches/autogptq_cpu.py`` in processes that must not import ``afpq_plugins``, and they
load this file the same way.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

__all__ = ["patched", "no_cuda_synchronize"]


@contextlib.contextmanager
def patched(obj, name: str, value) -> Iterator[None]:
    """Set ``obj.name = value`` for the duration of the block, then restore it
    (an attribute that did not exist is deleted again)."""
    missing = object()
    old = getattr(obj, name, missing)
    setattr(obj, name, value)
    try:
        yield
    finally:
        if old is missing:
            delattr(obj, name)
        else:
            setattr(obj, name, old)



def _noop(*args, **kwargs) -> None:
    return None


@contextlib.contextmanager
def no_cuda_synchronize() -> Iterator[None]:
    """auto-gptq 0.7.1 ``GPTQ.fasterquant`` calls ``torch.cuda.synchronize()``
    unconditionally (only to time itself); on a CPU-only torch that raises
    "Torch not compiled with CUDA enabled". Made a no-op while CUDA is absent."""
    import torch

    if torch.cuda.is_available():
        yield
        return
    with patched(torch.cuda, "synchronize", _noop):
        yield
