"""An AutoGPTQ-compatible ``QuantLinear`` built on :class:`~afpq_plugins.nn.AFPQLinear`.

Same constructor as AutoGPTQ 0.7.1's ``QuantLinear`` (``bits, group_size, infeatures,
outfeatures, bias, ...``) and the same ``pack(linear, scales, zeros, g_idx)`` contract,
where ``scales`` / ``zeros`` are GPTQ's ``[out, groups]`` per-group ``.scale`` / ``.zero``
(here s_pos / s_neg) and ``g_idx`` maps each input column to its group. Codes are stored
in AutoGPTQ's own v1 row layout (the project's ``gptq`` layout). The grid is bound per
config with :func:`quant_linear_class`.
"""

from __future__ import annotations

import functools
import logging

import torch
import transformers
from torch import nn

from ..core.packing import pack_gptq
from ..nn.convert import quantized_from_engine
from ..nn import AFPQLinear

__all__ = ["AFPQQuantLinear", "quant_linear_class"]

log = logging.getLogger(__name__)


class AFPQQuantLinear(AFPQLinear):
    QUANT_TYPE = "afpq"
    FMT = "nf4"
    MODE = None
    SCALE_DTYPE = torch.float16

    def __init__(self, bits, group_size, infeatures, outfeatures, bias=True, use_cuda_fp16=True,
                 kernel_switch_threshold=128, trainable=False, weight_dtype=torch.float16, **kwargs):
        if trainable:
            raise NotImplementedError("AFPQQuantLinear is inference-only (trainable=False)")
        super().__init__(infeatures, outfeatures, bias, fmt=self.FMT, group_size=group_size, mode=self.MODE,
                         layout="gptq", scale_dtype=self.SCALE_DTYPE, bias_dtype=weight_dtype)
        if bits != self.bits:
            raise ValueError(f"AFPQQuantLinear: format {self.fmt.name!r} has {self.bits} bits, asked for {bits}")
        self.infeatures, self.outfeatures = infeatures, outfeatures
        #: Input columns whose re-encoded code disagreed with GPTQ's value (see pack).
        self.pack_mismatches = 0

    def pack(self, linear, scales, zeros, g_idx=None, name: str = "AFPQQuantLinear.pack"):
        """Encode ``linear``'s (already GPTQ-quantized) weight with GPTQ's parameters.

        ``scales``, ``zeros``: ``[out, groups]``; ``g_idx``: ``[in]`` (None: ``i // group_size``).
        A result that does not fit raises :class:`~afpq_plugins.core.errors.EngineResultError`
        naming ``name`` before this layer changes.
        """
        if isinstance(linear, nn.Conv2d):
            raise NotImplementedError("AFPQQuantLinear packs nn.Linear and transformers Conv1D layers")
        W = linear.weight.data
        if isinstance(linear, transformers.pytorch_utils.Conv1D):
            W = W.t()
        bias = linear.bias.data if linear.bias is not None else None
        self.pack_weight(W, bias, scales, zeros, g_idx, name)

    def pack_weight(self, W, bias, scales, zeros, g_idx, name: str) -> None:
        """:meth:`pack` from the ``[out, in]`` weight and the bias (or None) themselves."""
        if g_idx is None:
            g_idx = self.g_idx
        qw, mismatches = quantized_from_engine(self.spec, W, scales, zeros, g_idx, name, dtype=W.dtype)
        device = self.qweight.device
        qweight = pack_gptq(qw.codes, self.bits, name=f"{name}.qweight").to(device)
        self.pack_mismatches = mismatches
        self.qweight = qweight
        self.scales = qw.scales.to(device)
        if self.second is not None:
            setattr(self, "scales_neg" if self.mode == "afpq" else "zeros", qw.scales2.to(device))
        self.g_idx = g_idx.to(torch.int32).clone()
        if bias is not None:
            self.bias = bias.clone().to(W.dtype)
        else:
            self.bias = None  # AutoGPTQ's make_quant always asks for a bias buffer

    # AutoGPTQ calls these on its QuantLinear classes in some paths.
    def post_init(self):
        return None

    @classmethod
    def warmup(cls, *args, **kwargs):
        return None


@functools.lru_cache(maxsize=None)
def quant_linear_class(fmt: str, mode: str, scale_dtype: torch.dtype) -> type:
    """``AFPQQuantLinear`` with the grid bound (one class per grid, cached)."""
    return type("AFPQQuantLinear", (AFPQQuantLinear,), {
        "FMT": fmt, "MODE": mode, "SCALE_DTYPE": scale_dtype,
        "__module__": AFPQQuantLinear.__module__, "__qualname__": "AFPQQuantLinear",
    })
