"""AutoGPTQ's ``Quantizer`` and ``GPTQ`` with an AFPQ grid.

``AFPQQuantizer`` keeps AutoGPTQ's contract: after ``find_params(W[:, cols], weight=True)``
``.scale`` and ``.zero`` are ``[rows, 1]`` tensors that GPTQ copies per group, and
``quantize(w)`` fake-quantizes a ``[rows, 1]`` column. Here ``.scale`` holds s_pos and
``.zero`` holds s_neg (mode ``afpq``), the one scale twice (``sym``) or the scale and
integer zero-point (``zp``), so GPTQ's group, act-order, static-group and ``g_idx``
bookkeeping runs unchanged. The maths is core's ``find_params`` / ``round_params`` /
``encode`` / ``decode``; parameters are rounded to the storage dtype before use, so
GPTQ's error feedback sees exactly the weights the checkpoint will decode to.
"""

from __future__ import annotations

import torch
from auto_gptq.quantization.gptq import GPTQ
from auto_gptq.quantization.quantizer import Quantizer

from ..core.formats import get_format, resolve_mode
from ..core.quantize import check_finite, decode, decode_table, encode, find_params, round_params

__all__ = ["AFPQQuantizer", "AFPQGPTQ"]


class AFPQQuantizer(Quantizer):
    def __init__(self, shape=1, fmt="nf4", mode=None, scale_dtype=torch.float16):
        super().__init__(shape)
        self.fmt = get_format(fmt)
        self.mode = resolve_mode(self.fmt, mode)
        self.scale_dtype = scale_dtype
        self._ready = False
        self._table = None

    def configure(self, bits, perchannel=False, sym=True, mse=False, norm=2.4, grid=100, maxshrink=0.8, trits=False):
        if bits != self.fmt.bits:
            raise ValueError(f"AFPQQuantizer: format {self.fmt.name!r} has {self.fmt.bits} bits, asked for {bits}")
        if mse or trits:
            raise NotImplementedError("AFPQQuantizer: mse scale search and trits are not supported (the paper uses neither)")
        super().configure(bits, perchannel=perchannel, sym=sym, mse=False)

    def find_params(self, x, weight=False):
        if not weight:
            raise NotImplementedError("AFPQQuantizer quantizes weights only (weight=True)")
        rows = x.shape[0]
        x2 = x.flatten(1) if self.perchannel else x.flatten().unsqueeze(0)
        check_finite(x2, "GPTQ weight")
        p1, p2 = find_params(x2, self.fmt, self.mode, dim=-1)
        p1, p2 = round_params(p1, p2, self.mode, self.scale_dtype, name="GPTQ weight")
        if not self.perchannel:
            p1, p2 = p1.expand(rows, 1), p2.expand(rows, 1)
        self.scale = p1.reshape(rows, 1).clone()
        self.zero = p2.reshape(rows, 1).clone()
        # Every code's value for every row, by core's decode: GPTQ then quantizes a
        # column with one encode and one gather instead of a full decode per column.
        self._table = decode_table(self.fmt, self.mode, self.scale.squeeze(1), self.zero.squeeze(1))
        self._ready = True

    def codes(self, x):
        return encode(x, self.fmt, self.mode, self.scale, self.zero)

    def quantize(self, x):
        if not self.ready():
            return x
        codes = self.codes(x)
        if x.dim() == 2 and x.shape[1] == 1 and x.shape[0] == self._table.shape[0]:
            return torch.gather(self._table, 1, codes.long()).to(x.dtype)  # GPTQ's [rows, 1] column
        return decode(codes, self.fmt, self.mode, self.scale, self.zero, x.dtype)

    def enabled(self):
        return True

    def ready(self):
        # A zero s_pos (a row with no positive weight) is a valid AFPQ parameter, so
        # readiness is "find_params has run", not AutoGPTQ's ``all(scale != 0)``.
        return self._ready


class AFPQGPTQ(GPTQ):
    """AutoGPTQ's GPTQ (unchanged algorithm) with an :class:`AFPQQuantizer`.

    The adapter binds a config with :meth:`bind`; AutoGPTQ then builds it as
    ``GPTQ(layer)`` and calls ``.quantizer.configure(bits, perchannel=True, sym=...)``.
    """

    fmt = "nf4"
    mode = None
    scale_dtype = torch.float16

    def __init__(self, layer):
        super().__init__(layer)
        self.quantizer = AFPQQuantizer(fmt=self.fmt, mode=self.mode, scale_dtype=self.scale_dtype)

    @classmethod
    def bind(cls, fmt, mode, scale_dtype) -> type:
        return type(cls.__name__, (cls,), {"fmt": fmt, "mode": mode, "scale_dtype": scale_dtype,
                                           "__module__": cls.__module__, "__qualname__": cls.__qualname__})
