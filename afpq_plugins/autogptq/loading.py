"""Loading AFPQ checkpoints written by the AutoGPTQ adapter.

The project's loader, :func:`afpq_plugins.model.load_quantized`, reads every AFPQ
checkpoint, including models whose quantized layers are transformers ``Conv1D``
(GPT-2's ``c_attn``/``c_proj``/``c_fc``: weight ``[in, out]``, swapped for an
:class:`~afpq_plugins.nn.AFPQLinear` computing the same function).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

__all__ = ["load_checkpoint"]


def load_checkpoint(path: str, device="cpu", dtype: Optional[torch.dtype] = None) -> nn.Module:
    from ..model import load_quantized

    return load_quantized(path, device=device, dtype=dtype)
