"""AutoGPTQ's ``Quantizer`` and ``GPTQ`` with an AFPQ grid.

``AFPQQuantizer`` keeps AutoGPTQ's contract: after ``find_params(W[:, cols], weight=True)``
``.scale`` and ``.zero`` are ``[rows, 1]`` tensors that GPTQ copies per group, and
``quantize(w)`` fake-quantizes a ``[rows, 1]`` column. Here ``.scale`` holds s_pos and
``.zero`` holds s_neg (mode ``afpq``), the one scale twice (``sym``) or the scale and
integer zero-point (``zp``), so GPTQ's group, act-order, static-group and ``g_idx``
bookkeeping runs unchanged. The maths is core's (:mod:`afpq_plugins.core.gptq`), the
same code as the GPTQModel and optimum paths.

Per-module settings (a bits budget): AutoGPTQ builds ``GPTQ(layer)`` for each Linear and
then asks it for the config's bits and group size; a bound :class:`AFPQGPTQ` that knows
``layer`` (by identity) gives it that layer's own grid, bits and group size instead, so
the algorithm (and its ``g_idx``) runs per layer on that layer's settings.
"""

from __future__ import annotations

import inspect
from typing import Mapping, Optional

import torch
from auto_gptq.quantization.gptq import GPTQ
from auto_gptq.quantization.quantizer import Quantizer

from ..core.gptq import GridQuantizerMixin
from ..core.search_registry import resolve_search

__all__ = ["AFPQQuantizer", "AFPQGPTQ"]


class AFPQQuantizer(GridQuantizerMixin, Quantizer):
    """AutoGPTQ's ``Quantizer`` on an AFPQ grid: core's :class:`~afpq_plugins.core.gptq.GridQuantizerMixin`."""

    def __init__(self, shape=1, fmt="nf4", mode=None, scale_dtype=torch.float16, search=None,
                 config_bits: Optional[int] = None):
        super().__init__(shape)
        self._grid_init(fmt, mode, scale_dtype, search)
        #: a layer with its own format: AutoGPTQ configures it with the config's (top-level) bits
        self.config_bits = config_bits

    def configure(self, bits, perchannel=False, sym=True, mse=False, norm=2.4, grid=100, maxshrink=0.8, trits=False):
        if self.config_bits is not None and bits == self.config_bits:
            bits = self.fmt.bits
        self._check_bits(bits, trits, "AFPQQuantizer")
        if mse:  # AutoGPTQ's mse search: the same candidates as core's ScaleSearch.gptq_mse
            self._gptq_mse(grid, maxshrink, norm)
        super().configure(bits, perchannel=perchannel, sym=sym, mse=False)


class AFPQGPTQ(GPTQ):
    """AutoGPTQ's GPTQ (unchanged algorithm) with an :class:`AFPQQuantizer`.

    The adapter binds a config with :meth:`bind`; AutoGPTQ then builds it as
    ``GPTQ(layer)`` and calls ``.quantizer.configure(bits, perchannel=True, sym=...)``.
    A layer in the bound ``layers`` (``{module: QuantSpec}``) gets that spec's grid and bits,
    and ``fasterquant`` runs with its group size, whatever AutoGPTQ passes.
    """

    fmt = "nf4"
    mode = None
    scale_dtype = torch.float16
    search = None
    bits = None  # the config's bits (what AutoGPTQ configures every quantizer with)
    layers: Mapping = {}

    def __init__(self, layer):
        super().__init__(layer)
        self.own = self.layers.get(layer)  # this layer's own settings (a QuantSpec), or None
        fmt, mode = (self.fmt, self.mode) if self.own is None else (self.own.fmt, self.own.mode)
        self.quantizer = AFPQQuantizer(fmt=fmt, mode=mode, scale_dtype=self.scale_dtype, search=self.search,
                                       config_bits=None if self.own is None else self.bits)

    def fasterquant(self, *args, **kwargs):
        from ..core.output_search import ColumnCursorSearch, gptq_column_energies, is_output_search

        a = inspect.signature(GPTQ.fasterquant).bind(self, *args, **kwargs)
        a.apply_defaults()
        kw = dict(a.arguments)
        kw.pop("self")
        if self.own is not None:
            kw["group_size"] = self.own.group_size
        if is_output_search(self.search):  # the output search weighs columns by GPTQ's own diag(X^T X)
            # static groups take their parameters before act-order permutes the columns
            self.quantizer.search = ColumnCursorSearch(
                self.search, gptq_column_energies(self.H, kw["actorder"] and not kw["static_groups"]))
            self.quantizer._ready = False
        return super().fasterquant(**kw)

    @classmethod
    def bind(cls, fmt, mode, scale_dtype, search=None, bits: Optional[int] = None,
             layers: Optional[Mapping] = None) -> type:
        """A subclass with the settings baked in (AutoGPTQ builds ``GPTQ(layer)`` itself);
        ``layers``: ``{module: QuantSpec}`` of the layers with their own settings, ``bits`` the
        config's."""
        attrs = {"fmt": fmt, "mode": mode, "scale_dtype": scale_dtype, "search": resolve_search(search),
                 "bits": bits, "layers": dict(layers or {}),
                 "__module__": cls.__module__, "__qualname__": cls.__qualname__}
        return type(cls.__name__, (cls,), attrs)


def gptq_class(spec) -> type:
    """AutoGPTQ's ``GPTQ`` with ``spec``'s grid bound (what optimum on auto-gptq instantiates per layer)."""
    return AFPQGPTQ.bind(spec.fmt, spec.mode, spec.torch_scale_dtype, spec.scale_search)
