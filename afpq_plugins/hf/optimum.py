"""``AFPQGPTQQuantizer``: optimum's ``GPTQQuantizer`` running GPTQ on an AFPQ grid.

optimum's calibration loop (block by block, true-sequential, act-order, the caching of
block outputs) runs unchanged; only the per-layer GPTQ object differs:

* optimum 2.3.0 (gptqmodel 7.6.0): the GPTQModel adapter's GPTQ class
  (:func:`afpq_plugins.gptqmodel.quantizer.gptq_class`, a subclass of gptqmodel's ``GPTQ``
  whose ``create_quantizer`` hook returns the AFPQ ``Quantizer``);
* optimum 2.0.0 (auto-gptq 0.7.1): the AutoGPTQ adapter's ``AFPQGPTQ`` (an auto-gptq
  ``GPTQ`` with the adapter's ``AFPQQuantizer``).

In both, the quantizer's ``.scale`` holds s_pos and ``.zero`` s_neg (mode ``afpq``; the
one scale for ``sym``; scale and zero-point for ``zp``), computed by core's
``find_params`` / ``round_params`` and applied column by column by core's
:class:`~afpq_plugins.core.quantize.ColumnQuantizer` (equal to ``decode(encode())``), so GPTQ's
error feedback sees exactly the weights the checkpoint decodes to. Packing builds
:class:`~afpq_plugins.nn.AFPQLinear` modules (core's packer) instead of optimum's
QuantLinear, and :meth:`AFPQGPTQQuantizer.save` writes the project's checkpoint format.

::

    quantizer = AFPQGPTQQuantizer(bits=3, fmt="nf3", group_size=64, dataset=texts)
    quantizer.quantize_model(model, tokenizer)
    quantizer.save(model, out)       # AutoModelForCausalLM.from_pretrained(out) after import afpq_plugins
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from typing import Any, Dict, Iterator, List, Optional, Sequence

from torch import nn

from optimum.gptq import GPTQQuantizer
from optimum.gptq import quantizer as _oq

from ..core.checkpoint import AFPQConfigDict
from ..core.constants import SCALE_DTYPES
from ..core.errors import MethodUnavailable
from ..core.formats import get_format, resolve_mode
from ..core.search_registry import search_dict
from ..core.spec import QuantSpec
from ..methods import gptq_layer_class
from ..nn import AFPQLinear
from ..nn.convert import linear_from_engine
from ..nn.skeleton import set_module
from . import compat

__all__ = ["AFPQGPTQQuantizer", "uses_gptqmodel"]

log = logging.getLogger(__name__)


def uses_gptqmodel() -> bool:
    """True when optimum runs GPTQ through gptqmodel (optimum >= 2.1), False for auto-gptq."""
    return bool(_oq.is_gptqmodel_available())


def _bound_gptq_class(spec: QuantSpec) -> type:
    """The per-layer GPTQ class for the installed backend, with ``spec``'s grid (and scale search)
    bound: the engine's own class, looked up in the method registry (no import of a sibling adapter)."""
    engine = "gptqmodel" if uses_gptqmodel() else "autogptq"
    try:
        return gptq_layer_class(engine, spec)
    except (ImportError, MethodUnavailable) as exc:
        raise ImportError(
            f"AFPQGPTQQuantizer on optimum without gptqmodel needs auto-gptq and afpq_plugins.autogptq "
            f"(the AutoGPTQ adapter): {exc}"
        ) from exc


# -- the optimum subclass ------------------------------------------------------------------------
class AFPQGPTQQuantizer(GPTQQuantizer):
    """optimum's ``GPTQQuantizer`` with an AFPQ grid; ``save`` writes the AFPQ checkpoint format.

    ``bits`` defaults to the format's bits (and must equal it). ``damp_percent`` defaults
    to 0.01 (AutoGPTQ's default, so both stacks run the same GPTQ). On optimum 2.3.0,
    gptqmodel's group-aware reordering (``act_group_aware``) is off unless asked for.
    ``layout="awq"`` packs 4-bit results in the AWQ GEMM layout (no act-order).
    ``scale_search`` (``None``/``"minmax"``, ``"mse"`` or a search object, see
    :mod:`afpq_plugins.core.search`) searches each group's scales inside GPTQ, as the
    AutoGPTQ adapter does.
    """

    def __init__(
        self,
        bits: Optional[int] = None,
        fmt: str = "nf4",
        group_size: int = 128,
        mode: Optional[str] = None,
        dataset: Any = None,
        damp_percent: Optional[float] = 0.01,
        desc_act: bool = False,
        scale_dtype: str = "float16",
        layout: str = "gptq",
        modules_to_not_convert: Sequence[str] = ("lm_head",),
        scale_search=None,
        **kwargs,
    ) -> None:
        f = get_format(fmt)
        try:
            self.scale_search = search_dict(scale_search)  # JSON form, stored in the checkpoint
        except (TypeError, ValueError) as exc:
            raise ValueError(f"AFPQGPTQQuantizer: scale_search: {exc}") from None
        if damp_percent is None:
            damp_percent = 0.01
        kwargs = {k: v for k, v in kwargs.items() if v is not None}  # None: optimum's default
        if bits is None:
            bits = f.bits
        if bits != f.bits:
            raise ValueError(f"AFPQGPTQQuantizer: format {f.name!r} has {f.bits} bits, but bits={bits}")
        if scale_dtype not in SCALE_DTYPES:
            raise ValueError(f"AFPQGPTQQuantizer: scale_dtype must be one of {', '.join(SCALE_DTYPES)}")
        if layout not in ("gptq", "awq"):
            raise ValueError(f"AFPQGPTQQuantizer: layout must be 'gptq' or 'awq', got {layout!r}")
        if layout == "awq" and desc_act:
            raise ValueError("AFPQGPTQQuantizer: the awq layout has no g_idx; use layout='gptq' with desc_act=True")
        self.fmt = f.name
        self.mode = resolve_mode(f, mode)
        self.scale_dtype = scale_dtype
        self.layout = layout
        self.modules_to_not_convert = list(modules_to_not_convert)
        try:  # the settings as one value (the packer and the GPTQ class take it whole)
            self.spec = QuantSpec(f, group_size, self.mode, scale_dtype, layout, tuple(modules_to_not_convert),
                                  self.scale_search)
        except ValueError as exc:
            raise ValueError(f"AFPQGPTQQuantizer: {exc}") from None
        self.quantized_modules: List[str] = []
        params = inspect.signature(GPTQQuantizer.__init__).parameters
        if "act_group_aware" in params or uses_gptqmodel():
            kwargs.setdefault("act_group_aware", False)
        kwargs.pop("sym", None)  # the grid decides; optimum's sym only reaches configure()
        super().__init__(bits=bits, dataset=dataset, group_size=group_size, damp_percent=damp_percent,
                         desc_act=desc_act, sym=True, **kwargs)
        self.quant_method = "afpq"

    @classmethod
    def from_afpq_config(cls, cfg) -> "AFPQGPTQQuantizer":
        """From an :class:`~afpq_plugins.hf.AFPQConfig` (quantize-on-load)."""
        qc = cfg.checkpoint_config()
        kw = {k: getattr(cfg, k) for k in (
            "dataset", "damp_percent", "true_sequential", "model_seqlen", "block_name_to_quantize",
            "module_name_preceding_first_block", "batch_size", "pad_token_id", "cache_block_outputs",
            "modules_in_block_to_quantize") if getattr(cfg, k, None) is not None}
        return cls(bits=qc.bits, fmt=qc.format, group_size=qc.group_size, mode=qc.mode, desc_act=qc.desc_act,
                   scale_dtype=qc.scale_dtype, layout=qc.layout, modules_to_not_convert=qc.modules_to_not_convert,
                   scale_search=qc.extra.get("scale_search"), **kw)

    # -- quantize ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def _hooks(self) -> Iterator[None]:
        gcls = _bound_gptq_class(self.spec)
        with contextlib.ExitStack() as stack:
            stack.enter_context(compat.gptq_class(gcls))
            if not uses_gptqmodel():
                stack.enter_context(compat.cpu_calibration_optimum_2_0())
                stack.enter_context(compat.no_cuda_synchronize())
            yield

    def quantize_model(self, model: nn.Module, tokenizer: Optional[Any] = None):
        """Run optimum's GPTQ with the AFPQ grid (in place); the Linears become AFPQLinear."""
        if isinstance(self.dataset, list) and self.dataset and isinstance(self.dataset[0], str) and tokenizer is None:
            raise ValueError("AFPQGPTQQuantizer.quantize_model: a list of texts needs a tokenizer")
        with self._hooks():
            model = super().quantize_model(model, tokenizer)
        model.quantization_method = "afpq"
        if hasattr(model, "config"):
            model.config.quantization_config = self.checkpoint_config.to_dict()
        return model

    def pack_model(self, model: nn.Module, quantizers: Dict[str, tuple]) -> None:
        """Replace each quantized Linear with an :class:`AFPQLinear` holding GPTQ's result."""
        names = []
        for name, (_, scale, zero, g_idx) in quantizers.items():
            if self.spec.skips(name):
                continue
            layer, _ = linear_from_engine(self.spec, model.get_submodule(name), scale, zero, g_idx, name)
            set_module(model, name, layer)
            names.append(name)
        order = [n for n, _ in model.named_modules()]
        self.quantized_modules = sorted(names, key=order.index)

    def post_init_model(self, model: nn.Module) -> nn.Module:
        return model  # AFPQLinear needs no kernel post-init

    def select_quant_linear(self, *args, **kwargs):
        self.quant_linear = AFPQLinear

    # -- config and save -----------------------------------------------------------------------
    @property
    def checkpoint_config(self) -> AFPQConfigDict:
        extra = {"damp_percent": self.damp_percent, "true_sequential": self.true_sequential,
                 "quantizer": "optimum"}
        if self.scale_search != {"method": "minmax"}:  # (min/max: not written, as before the option)
            extra["scale_search"] = self.scale_search
        return AFPQConfigDict(
            format=self.fmt, bits=self.bits, group_size=self.group_size, mode=self.mode, layout=self.layout,
            desc_act=bool(self.desc_act), scale_dtype=self.scale_dtype, method="gptq",
            modules_to_not_convert=list(self.modules_to_not_convert), quantized_modules=list(self.quantized_modules),
            extra=extra,
        )

    def to_dict(self) -> Dict[str, Any]:
        return self.checkpoint_config.to_dict()

    def save(self, model: nn.Module, save_dir: str, max_shard_size: str = "10GB", safe_serialization: bool = True,
             tokenizer=None, overwrite: bool = True) -> str:
        """Write ``model`` as an AFPQ checkpoint (one ``model.safetensors``; ``max_shard_size`` is ignored)."""
        if not safe_serialization:
            raise ValueError("AFPQ checkpoints are safetensors only")
        from ..model import save_quantized

        return save_quantized(model, save_dir, self.checkpoint_config, tokenizer=tokenizer, overwrite=overwrite)
