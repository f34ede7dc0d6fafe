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
from ..core.quantize import (
    ScaleSearch, check_finite, decode, decode_table, encode, find_params, resolve_search, round_params,
)

__all__ = ["AFPQQuantizer", "AFPQGPTQ"]


class AFPQQuantizer(Quantizer):
    def __init__(self, shape=1, fmt="nf4", mode=None, scale_dtype=torch.float16, search=None):
        super().__init__(shape)
        self.fmt = get_format(fmt)
        self.mode = resolve_mode(self.fmt, mode)
        self.scale_dtype = scale_dtype
        self.search = resolve_search(search)
        self._ready = False
        self._table = None

    def configure(self, bits, perchannel=False, sym=True, mse=False, norm=2.4, grid=100, maxshrink=0.8, trits=False):
        if bits != self.fmt.bits:
            raise ValueError(f"AFPQQuantizer: format {self.fmt.name!r} has {self.fmt.bits} bits, asked for {bits}")
        if trits:
            raise NotImplementedError("AFPQQuantizer: trits are not supported")
        if mse and self.search is None:
            # AutoGPTQ's mse search shrinks the range by 1 - i / grid for i < maxshrink * grid
            # and scores |w - q| ** norm: the same candidates as core's ScaleSearch below.
            steps = max(1, int(maxshrink * grid))
            self.search = ScaleSearch(grid=steps, min_shrink=1.0 - (steps - 1) / grid, norm=norm)
        super().configure(bits, perchannel=perchannel, sym=sym, mse=False)

    def find_params(self, x, weight=False):
        if not weight:
            raise NotImplementedError("AFPQQuantizer quantizes weights only (weight=True)")
        rows = x.shape[0]
        x2 = x.flatten(1) if self.perchannel else x.flatten().unsqueeze(0)
        check_finite(x2, "GPTQ weight")
        p1, p2 = find_params(x2, self.fmt, self.mode, dim=-1, search=self.search)
        p1, p2 = round_params(p1, p2, self.mode, self.scale_dtype, name="GPTQ weight")
        if not self.perchannel:
            p1, p2 = p1.expand(rows, 1), p2.expand(rows, 1)
        self.scale = p1.reshape(rows, 1).clone()
        self.zero = p2.reshape(rows, 1).clone()
        self._prepare_columns()
        self._ready = True

    def _prepare_columns(self) -> None:
        """Precompute what quantizing one ``[rows, 1]`` column needs.

        GPTQ quantizes every column separately, so per-call work must be a handful of
        small ops, like AutoGPTQ's own five: the safe divisors, the float32 rounding
        thresholds (``torch.bucketize`` counts thresholds below each value: core's
        encoder in one op on a small column) and each row's decoded value of every
        sorted grid position (``[rows, levels]``: one gather decodes the column).
        Values and codes are core's (``encode`` / ``decode_table``); tests compare them.
        """
        s1, s2 = self.scale, self.zero
        self._div1 = torch.where(s1 == 0, torch.ones_like(s1), s1)
        self._div2 = torch.where(s2 == 0, torch.ones_like(s2), s2)
        self._uniform = self.mode == "zp" and self.fmt.uniform_int
        table = decode_table(self.fmt, self.mode, s1.squeeze(1), s2.squeeze(1))  # [rows, 2**bits]
        self._table = table
        if self._uniform:
            self._sorted_table = None
            return
        dev = s1.device
        self._thresholds = self.fmt.thresholds(self.mode, dev)
        self._sorted_table = table.index_select(1, self.fmt.code_of_sorted(dev).long()).contiguous()

    def codes(self, x):
        return encode(x, self.fmt, self.mode, self.scale, self.zero)

    def _column(self, x):
        """Fake-quantized ``[rows, 1]`` column: equal to ``decode(encode(x))``."""
        x = x.float()
        if self._uniform:
            return torch.gather(self._table, 1, self.codes(x).long())
        if self.mode == "afpq":
            y = x / torch.where(x >= 0, self._div1, self._div2)  # w >= 0: s_pos, w < 0: s_neg
        elif self.mode == "sym":
            y = x / self._div1
        else:
            y = (x / self._div1).add_(self.zero)
        return torch.gather(self._sorted_table, 1, torch.bucketize(y, self._thresholds))

    def quantize(self, x):
        if not self.ready():
            return x
        if x.dim() == 2 and x.shape[1] == 1 and x.shape[0] == self._table.shape[0]:
            return self._column(x).to(x.dtype)  # GPTQ's [rows, 1] column
        return decode(self.codes(x), self.fmt, self.mode, self.scale, self.zero, x.dtype)

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
    search = None

    def __init__(self, layer):
        super().__init__(layer)
        self.quantizer = AFPQQuantizer(fmt=self.fmt, mode=self.mode, scale_dtype=self.scale_dtype, search=self.search)

    @classmethod
    def bind(cls, fmt, mode, scale_dtype, search=None) -> type:
        """A subclass with the settings baked in (AutoGPTQ builds ``GPTQ(layer)`` itself)."""
        attrs = {"fmt": fmt, "mode": mode, "scale_dtype": scale_dtype, "search": resolve_search(search),
                 "__module__": cls.__module__, "__qualname__": cls.__qualname__}
        return type(cls.__name__, (cls,), attrs)
