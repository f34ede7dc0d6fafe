"""AutoGPTQ's ``Quantizer`` and ``GPTQ`` with an AFPQ grid.

``AFPQQuantizer`` keeps AutoGPTQ's contract: after ``find_params(W[:, cols], weight=True)``
``.scale`` and ``.zero`` are ``[rows, 1]`` tensors that GPTQ copies per group, and
``quantize(w)`` fake-quantizes a ``[rows, 1]`` column. Here ``.scale`` holds s_pos and
``.zero`` holds s_neg (mode ``afpq``), the one scale twice (``sym``) or the scale and
integer zero-point (``zp``), so GPTQ's group, act-order, static-group and ``g_idx``
bookkeeping runs unchanged. The maths is core's
:class:`~afpq_plugins.core.quantize.ColumnQuantizer` (``find_params`` /
``round_params``, then a per-column path equal to ``decode(encode(...))``); parameters
are rounded to the storage dtype before use, so GPTQ's error feedback sees exactly the
weights the checkpoint will decode to.
"""

from __future__ import annotations

import torch
from auto_gptq.quantization.gptq import GPTQ
from auto_gptq.quantization.quantizer import Quantizer

from ..core.formats import get_format, resolve_mode
from ..core.quantize import ColumnQuantizer, ScaleSearch, resolve_search

__all__ = ["AFPQQuantizer", "AFPQGPTQ"]


class AFPQQuantizer(Quantizer):
    def __init__(self, shape=1, fmt="nf4", mode=None, scale_dtype=torch.float16, search=None):
        super().__init__(shape)
        self.fmt = get_format(fmt)
        self.mode = resolve_mode(self.fmt, mode)
        self.scale_dtype = scale_dtype
        self.search = resolve_search(search)
        self._ready = False

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
        self._q = ColumnQuantizer(x, self.fmt, self.mode, self.scale_dtype, self.perchannel, self.search)
        self.scale, self.zero = self._q.p1, self._q.p2
        self._ready = True

    def quantize(self, x):
        # GPTQ's [rows, 1] columns take core's fast column path (ColumnQuantizer)
        return self._q(x) if self.ready() else x

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
