"""``patched``: set one attribute for the duration of a ``with`` block, then restore it.

The one implementation of the scoped-shim primitive every upstream workaround in the
project uses (``autogptq/compat.py``, ``hf/compat.py``, ``autoawq/compat.py``).

Standard library only, and no package-relative imports, on purpose: the AutoGPTQ
shims are loaded by file path from ``patches/autogptq_cpu.py`` in processes that must
not import ``afpq_plugins``, and they load this file the same way.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

__all__ = ["patched"]


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

