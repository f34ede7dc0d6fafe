"""The project's named error for bad checkpoints (one type, so callers catch one thing).

``CheckpointError`` subclasses ``ValueError`` (code written against the older
``except ValueError`` keeps working); ``SafetensorsError`` is the ``CheckpointError``
of a malformed ``.safetensors`` file. Messages name the file, key or tensor.
"""

from __future__ import annotations

__all__ = ["CheckpointError", "SafetensorsError"]


class CheckpointError(ValueError):
    """A checkpoint is invalid, or cannot be read or written as asked; the message names
    the file, key or tensor."""


class SafetensorsError(CheckpointError):
    """A safetensors file is malformed; the message names the file and the tensor."""
