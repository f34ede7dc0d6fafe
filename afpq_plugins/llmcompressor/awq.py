"""llm-compressor 0.14's ``AWQModifier`` on an AFPQ grid.

llm-compressor 0.14's AWQ is a *transform* (``llmcompressor.modifiers.transform.awq``): it
searches and applies the smoothing scales, and a quantization modifier after it quantizes
(its ``Recipe`` refuses an AWQ modifier without a later ``QuantizationMixin`` one). The
drop-in follows that split, class for class, through subclasses (nothing edited):

* :class:`AFPQQuantizationModifier` (a ``QuantizationModifier``): ``fmt`` / ``group_size``
  build an INT proxy config group of the same bits and groups, which only attaches the
  ``quantization_scheme`` AWQ reads (which balance layers it quantizes, the per-group weight
  normalisation of ``duo_scaling`` in ``_compute_layer_means``); it tags each targeted Linear
  with its AFPQ grid (``afpq_grid``), and ``on_finalize`` quantizes each one's (smoothed)
  weight with core's ``quantize_weight`` (scales: ``find_params`` with ``scale_search``) and
  swaps in :class:`~afpq_plugins.nn.AFPQLinear` (layout ``awq`` at 4 bits, else ``gptq``).
* :class:`AFPQAWQTransformModifier` (an ``AWQModifier``): its grid search,
  ``AWQModifier._compute_best_scale``, pseudo-quantizes each candidate ``Q(W * s)`` with
  compressed-tensors' ``forward_quantize`` (an affine ``(q - zero) * scale``, one scale per
  group; not a registered ``ImplBackend`` entry point), a name it looks up in
  ``llmcompressor.modifiers.transform.awq.base``. The override of ``_compute_best_scale``
  rebinds that one name for the duration of the call only (:func:`afpq_plugins._patching.patched`,
  restored on exit or error) to core's :func:`~afpq_plugins.core.quantize.fake_quantize_rows`
  on the layer's AFPQ grid with min/max scales (llm-compressor also forces a min/max observer
  during the search); a layer without an AFPQ grid keeps compressed-tensors' function.
  Everything else is llm-compressor's: mappings, activation caching, ``duo_scaling``,
  ``n_grid``, the loss, applying the best scales, the pipelines.
* :func:`AFPQAWQModifier` (``fmt=..., group_size=..., ignore=[...], duo_scaling=...``): the
  one-call form, the two above as a list, as llm-compressor 0.14's own
  ``llmcompressor.modifiers.awq.AWQModifier`` returns ``[AWQ transform, QuantizationModifier]``
  (a recipe flattens nested lists).

llm-compressor 0.14's AWQ has no clip search (AutoAWQ's ``apply_clip`` is not in it): the
final ranges are the quantization modifier's (here core's min/max or ``scale_search``).
During calibration the weights stay float, as in the stock recipe (the sequential pipeline
runs with quantization disabled; later layers calibrate on the smoothed float outputs).
Save with :func:`afpq_plugins.llmcompressor.save`, not ``save_pretrained``.
"""

from __future__ import annotations

import contextlib
from typing import Any, Dict, List, Optional

import torch
from compressed_tensors.quantization import forward_quantize as _ct_forward_quantize
from llmcompressor.modifiers.quantization import QuantizationModifier
from llmcompressor.modifiers.transform.awq import AWQModifier
from llmcompressor.modifiers.transform.awq import base as _awq_base
from pydantic import PrivateAttr, model_validator

from .._patching import patched
from ..core.checkpoint import AFPQConfigDict
from ..core.formats import get_format
from ..core.quantize import fake_quantize_rows
from ..nn.skeleton import set_module
from ._common import afpq_fields, modifier_spec, module_spec, module_specs, record_config

__all__ = ["AFPQAWQModifier", "AFPQAWQTransformModifier", "AFPQQuantizationModifier", "cpu_pinning_shim"]

_LAYOUTS = (None, "gptq", "awq")
_GRID_ATTR = "afpq_grid"
_QUANT_KEYS = ("targets", "ignore", "fmt", "group_size", "mode", "scale_dtype", "scale_search", "layout", "layer_specs")


def AFPQAWQModifier(**kwargs) -> list:  # noqa: N802 -- named as llm-compressor's one-call AWQModifier
    """``[AFPQAWQTransformModifier(...), AFPQQuantizationModifier(...)]`` from one set of
    arguments: ``targets`` / ``ignore`` / ``fmt`` / ``group_size`` / ``mode`` / ``scale_dtype``
    / ``scale_search`` / ``layout`` go to the quantization step, the rest (``mappings``,
    ``duo_scaling``, ``n_grid``, ``offload_device``) to AWQ."""
    quant = {k: v for k, v in kwargs.items() if k in _QUANT_KEYS}
    return [AFPQAWQTransformModifier(**{k: v for k, v in kwargs.items() if k not in _QUANT_KEYS}),
            AFPQQuantizationModifier(**quant)]


class AFPQAWQTransformModifier(AWQModifier):
    """llm-compressor's ``AWQModifier`` whose grid search scores each candidate on the
    AFPQ grid of each balance layer (see the module docstring). Put an
    :class:`AFPQQuantizationModifier` after it."""

    def on_calibration_start(self, state, event, **kwargs):
        super().on_calibration_start(state, event, **kwargs)
        layers = [b for m in self._resolved_mappings for b in m.balance_layers]
        if layers and not any(getattr(b, _GRID_ATTR, None) is not None for b in layers):
            raise ValueError("AFPQAWQTransformModifier: no balance layer carries an AFPQ grid; put an "
                             "AFPQQuantizationModifier after it (with an INT scheme use llm-compressor's AWQModifier)")

    def _apply_smoothing(self, model) -> None:
        with cpu_pinning_shim():
            super()._apply_smoothing(model)

    def _compute_best_scale(self, mapping, fp16_outputs, orig_layer_weights):
        with patched(_awq_base, "forward_quantize", _pseudo_quantize):
            return super()._compute_best_scale(mapping, fp16_outputs, orig_layer_weights)


@contextlib.contextmanager
def cpu_pinning_shim():
    """llm-compressor 0.14's AWQ pins its cached activations (``IntermediatesCache.pin_memory``)
    before each mapping's search, and ``Tensor.pin_memory()`` raises without an accelerator
    ("Cannot access accelerator device"), so its AWQ cannot run on a CPU-only machine. With no
    accelerator, pinning (only a host-to-device speed-up) is skipped inside the block."""
    from llmcompressor.pipelines.cache import IntermediatesCache

    if torch.accelerator.is_available():
        yield
        return
    with patched(IntermediatesCache, "pin_memory", lambda self, batch_index, input_names=None: None):
        yield


def _pseudo_quantize(module, value, base_name, args):
    """compressed-tensors' ``forward_quantize(module, value, base_name, args)`` for AWQ's
    ``Q(W * s)``: on the module's AFPQ grid, else compressed-tensors' own."""
    grid = getattr(module, _GRID_ATTR, None)
    if grid is None:
        return _ct_forward_quantize(module, value, base_name, args)
    if base_name != "weight":
        raise RuntimeError(f"AFPQAWQTransformModifier: AWQ asked to quantize {base_name!r}, not a weight")
    spec, name = grid
    return search_fake_quantize(spec, name, value.detach())


def search_fake_quantize(spec, name: str, w: torch.Tensor) -> torch.Tensor:
    """AWQ's ``Q(W * s)`` for one candidate on layer ``name``'s grid: min/max group scales
    rounded to the spec's scale dtype, nearest grid value (core)."""
    return fake_quantize_rows(w, spec.format, spec.group_size, spec.mode, spec.torch_scale_dtype, None,
                              f"{name} (AWQ search)")[0]


class AFPQQuantizationModifier(QuantizationModifier):
    """``QuantizationModifier`` on an AFPQ grid: round to nearest of the (AWQ-smoothed)
    weights with core, packed into AFPQLinear at ``on_finalize``.

    ``fmt``: a registered format (``nf3``, ``fp4``, ...); ``group_size``: input columns per
    group (-1: whole rows); ``mode``: ``afpq`` (two scales, the default), ``sym`` or ``zp``;
    ``scale_dtype``: storage dtype of the scales; ``scale_search``: the scales' search
    (:mod:`afpq_plugins.core.search`); ``layout``: ``None`` (``awq`` at 4 bits, else
    ``gptq``), ``gptq`` or ``awq``; ``targets`` / ``ignore`` as in llm-compressor.
    ``layer_specs``: ``{module name: QuantSpec or {"fmt", "group_size", "mode"}}``, modules with
    settings of their own (a bits budget; :func:`._common.afpq_fields`): AWQ's search scores each
    balance layer on its own grid, and the config's ``modules`` records them.
    """

    fmt: str = "nf4"
    group_size: int = 128
    mode: Optional[str] = None
    scale_dtype: str = "float16"
    scale_search: Optional[Any] = None
    layout: Optional[str] = None
    layer_specs: Optional[Dict[str, Any]] = None

    _afpq_names: List[str] = PrivateAttr(default_factory=list)
    _afpq_config: Optional[AFPQConfigDict] = PrivateAttr(default=None)

    @model_validator(mode="before")
    @classmethod
    def _afpq_scheme(cls, data):
        if isinstance(data, dict):
            layout = data.get("layout")
            if layout not in _LAYOUTS:
                raise ValueError(f"AFPQQuantizationModifier: layout must be gptq, awq or None, got {layout!r}")
            data = afpq_fields(data, "AFPQQuantizationModifier")
            if layout is None and get_format(data.get("fmt", "nf4")).bits == 4:
                layout = "awq"  # the layout None resolves to for AWQ (QuantSpec.layout_for)
            named = [(n, o["fmt"]) for n, o in (data.get("layer_specs") or {}).items()]
            for name, f in named + [("fmt", data.get("fmt", "nf4"))]:  # a module named first
                if layout == "awq" and get_format(f).bits != 4:
                    raise ValueError(f"AFPQQuantizationModifier: {name}: layout 'awq' packs 4-bit formats only, "
                                     f"not {f!r}" + (" (set layout='gptq' for 3-bit modules)" if name != "fmt" else ""))
            return data
        return afpq_fields(data, "AFPQQuantizationModifier")

    def on_initialize(self, state, **kwargs) -> bool:
        from compressed_tensors.utils import match_named_modules
        mods = _recipe()
        stock = [type(m).__name__ for m in mods if isinstance(m, AWQModifier)
                 and not isinstance(m, AFPQAWQTransformModifier)]
        if stock:
            raise ValueError(f"AFPQQuantizationModifier: the recipe's {stock[0]} would search AWQ's scales on the "
                             "INT proxy grid; use AFPQAWQTransformModifier (or AFPQAWQModifier(...))")
        out = super().on_initialize(state, **kwargs)
        for name, m in match_named_modules(state.model, self.resolved_targets, self.ignore):
            if isinstance(m, torch.nn.Linear) and getattr(m, "quantization_scheme", None) is not None:
                setattr(m, _GRID_ATTR, (module_spec(self, name, self.layout), f"{name}.weight"))
                self._afpq_names.append(name)
        if not self._afpq_names:
            raise ValueError(f"AFPQQuantizationModifier: no Linear layer matches targets "
                             f"{sorted(self.resolved_targets)} (ignore {self.ignore})")
        return out

    def on_finalize(self, state, **kwargs) -> bool:
        out = super().on_finalize(state, **kwargs)
        self._swap_in_afpq(state.model)
        return out

    # -- the final weights ------------------------------------------------------------------------
    def _swap_in_afpq(self, model) -> None:
        from tqdm import tqdm

        from ..nn import AFPQLinear

        awq = [m for m in _recipe() if isinstance(m, AFPQAWQTransformModifier)]
        method = "awq" if awq else "rtn"
        spec = self.spec.resolved("awq")  # layout None: awq at 4 bits, else gptq (also without the transform)
        for name in tqdm(self._afpq_names, desc="AFPQ: quantizing the weights", leave=False):
            lin = model.get_submodule(name)
            set_module(model, name, AFPQLinear.from_linear(lin, name=name, spec=module_spec(self, name, spec.layout))
                       .to(lin.weight.device))
        extra = {"quantizer": "llmcompressor 0.14"}
        if awq:
            extra.update(duo_scaling=awq[0].duo_scaling, n_grid=awq[0].n_grid,
                         clip="none (llm-compressor's AWQ has none)")
        self._afpq_config = AFPQConfigDict.from_spec(spec, method, quantized_modules=self._afpq_names, extra=extra,
                                                     layer_specs=module_specs(self, self._afpq_names, spec.layout))
        record_config(model, self._afpq_config)

    @property
    def spec(self):
        """The modifier's settings as a :class:`~afpq_plugins.core.spec.QuantSpec`."""
        return modifier_spec(self, self.layout)

    @property
    def checkpoint_config(self) -> Optional[AFPQConfigDict]:
        return self._afpq_config


def _recipe() -> list:
    from llmcompressor.core import active_session

    return list(active_session().lifecycle.recipe.modifiers)
