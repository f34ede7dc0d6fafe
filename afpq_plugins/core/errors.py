"""The project's named error for bad checkpoints (one type, so callers catch one thing).

``CheckpointError`` subclasses ``ValueError`` (code written against the older
``except ValueError`` keeps working); ``SafetensorsError`` is the ``CheckpointError``
of a malformed ``.safetensors`` file. Messages name the file, key or tensor.
``MethodUnavailable`` says a quantization method or its engine cannot run here.
``EngineResultError`` says an engine's per-layer result (GPTQ/AWQ group parameters, the
fake-quantized weight) cannot become an AFPQ layer; it names the layer and the tensor.
"""

from __future__ import annotations

__all__ = ["CheckpointError", "SafetensorsError", "MethodUnavailable", "EngineResultError"]


class CheckpointError(ValueError):
    """A checkpoint is invalid, or cannot be read or written as asked; the message names
    the file, key or tensor."""


class SafetensorsError(CheckpointError):
    """A safetensors file is malformed; the message names the file and the tensor."""


class MethodUnavailable(ValueError):
    """The method or its engine cannot run here (engine not installed, model type unsupported)."""


class EngineResultError(ValueError):
    """An engine's result for one layer (its group parameters, ``g_idx`` or fake-quantized
    weight) does not fit the layer or the spec; the message names the layer and the tensor.
    Raised before any module of the model is replaced."""
