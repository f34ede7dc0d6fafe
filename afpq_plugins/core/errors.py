"""The project's named error for bad checkpoints (one type, so callers catch one thing).

``CheckpointError`` subclasses ``ValueError`` (code written against the older
``except ValueError`` keeps working); ``SafetensorsError`` is the ``CheckpointError``
of a malformed ``.safetensors`` file. Messages name the file, key or tensor.
``MethodUnavailable`` says a quantization method or its engine cannot run here.
"""

from __future__ import annotations

__all__ = ["CheckpointError", "SafetensorsError", "MethodUnavailable"]


class CheckpointError(ValueError):
    """A checkpoint is invalid, or cannot be read or written as asked; the message names
    the file, key or tensor."""


class SafetensorsError(CheckpointError):
    """A safetensors file is malformed; the message names the file and the tensor."""


class MethodUnavailable(ValueError):
    """The method or its engine cannot run here (engine not installed, model type unsupported)."""
