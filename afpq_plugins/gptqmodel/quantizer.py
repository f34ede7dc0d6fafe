"""GPTQModel 7.6's GPTQ ``Quantizer`` on an AFPQ grid (used by GPTQModel's own loop and by optimum 2.3).

gptqmodel's ``GPTQ`` builds its per-layer quantizer through the ``create_quantizer`` hook;
:func:`quantizer_class` returns a ``gptqmodel.quantization.quantizer.Quantizer`` subclass
whose maths is core's :class:`~afpq_plugins.core.gptq.GridQuantizerMixin` (the same code
as the AutoGPTQ adapter), bound to one grid. gptqmodel's ``mse`` option (a norm > 0)
becomes GPTQ's shrink search (:meth:`ScaleSearch.gptq_mse`) unless a scale search is set.
"""

from __future__ import annotations

import functools
from typing import Dict, Mapping, Optional

import torch

from ..core.gptq import GridQuantizerMixin
from ..core.spec import QuantSpec

__all__ = ["quantizer_class", "gptq_class"]


@functools.lru_cache(maxsize=None)
def _base_classes():
    from gptqmodel.quantization.gptq import GPTQ
    from gptqmodel.quantization.quantizer import Quantizer

    class AFPQGptqModelQuantizer(GridQuantizerMixin, Quantizer):
        """gptqmodel's ``Quantizer`` contract on an AFPQ grid (``.scale`` = s_pos, ``.zero`` = s_neg)."""

        fmt = "nf4"
        mode = None
        scale_dtype = torch.float16
        search = None

        def __init__(self, qcfg, shape=1, name=None):
            super().__init__(qcfg, shape=shape, name=name)
            cls = type(self)
            self._grid_init(cls.fmt, cls.mode, cls.scale_dtype, cls.search)
            norm = float(getattr(qcfg, "mse", 0.0) or 0.0)
            if norm > 0:
                self._gptq_mse(norm=norm)

        def configure(self, perchannel=False, grid=100, maxshrink=0.8, trits=False, bits=None, sym=None):
            bits = self._check_bits(bits, trits)
            self.maxq = torch.tensor(2 ** bits - 1)
            self.perchannel, self.grid, self.maxshrink = perchannel, grid, maxshrink

    class AFPQGptqModelGPTQ(GPTQ):
        """gptqmodel's GPTQ (unchanged algorithm) whose ``create_quantizer`` hook gives the AFPQ grid.

        With the output search, each group's scales minimise the output error weighted by GPTQ's
        own ``diag(X^T X)`` (the Hessian it accumulated), walked in GPTQ's column order (as the
        AutoGPTQ adapter does)."""

        quantizer_cls = AFPQGptqModelQuantizer
        layer_quantizers = {}  # full module name -> its own quantizer class (a bits budget's per-module grid)

        def create_quantizer(self, name):
            full = getattr(getattr(self, "_named_module", None), "full_name", None)
            return self.layer_quantizers.get(full, self.quantizer_cls)(qcfg=self.qcfg, name=name)

        def quantize(self, *args, **kwargs):
            from ..core.output_search import ColumnCursorSearch, gptq_column_energies, is_output_search

            search = type(self.quantizer).search
            if is_output_search(search) and not isinstance(self.module, torch.nn.Embedding):
                H = self.finalize_hessian(target_device=getattr(self.module, "target_device", None))
                order = bool(self.qcfg.desc_act) and not bool(getattr(self.qcfg, "static_groups", False))
                self.quantizer.search = ColumnCursorSearch(search, gptq_column_energies(H, order), name=self.name)
                self.quantizer._ready = False
            return super().quantize(*args, **kwargs)

    return AFPQGptqModelQuantizer, AFPQGptqModelGPTQ


def quantizer_class(spec: QuantSpec) -> type:
    """The gptqmodel ``Quantizer`` subclass with ``spec``'s grid (and scale search) bound."""
    qcls, _ = _base_classes()
    return type(qcls.__name__, (qcls,), {"fmt": spec.fmt, "mode": spec.mode, "scale_dtype": spec.torch_scale_dtype,
                                         "search": spec.scale_search, "__module__": __name__})


def gptq_class(spec: QuantSpec, layer_specs: Optional[Mapping[str, QuantSpec]] = None) -> type:
    """gptqmodel's ``GPTQ`` with the bound quantizer (what optimum 2.3 instantiates per layer).

    ``layer_specs``: ``{full module name: spec}`` (names as gptqmodel's ``NamedModule.full_name``,
    i.e. the transformers model's own); those modules get a quantizer bound to their own grid
    (their group size comes from the per-module qcfg, gptqmodel's ``dynamic`` overrides)."""
    _, gcls = _base_classes()
    bound: Dict[QuantSpec, type] = {}
    for s in (spec, *(layer_specs or {}).values()):
        if s not in bound:
            bound[s] = quantizer_class(s)
    per_module = {n: bound[s] for n, s in (layer_specs or {}).items()}
    return type(gcls.__name__, (gcls,), {"quantizer_cls": bound[spec], "layer_quantizers": per_module,
                                         "__module__": __name__})
