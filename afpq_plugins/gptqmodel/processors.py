"""GPTQModel 7.6's GPTQ and AWQ loop processors on an AFPQ grid.

gptqmodel runs its layer-by-layer loop with one processor per method; these subclasses
keep everything (calibration capture, Hessians, act-order, AWQ's scale search, MoE
handling, threading) and change only what the grid touches:

* GPTQ: the per-layer ``GPTQ`` object is :func:`~afpq_plugins.gptqmodel.quantizer.gptq_class`
  (core's quantizer, see :mod:`afpq_plugins.core.gptq`); ``submodule_finalize`` packs the
  result into :class:`~afpq_plugins.nn.AFPQLinear` (core's ``encode_gptq``, then the
  project's packer) instead of gptqmodel's ``QuantLinear``.
* AWQ: ``pseudo_quantize_tensor`` (which AWQ's scale and clip searches call) is core's
  :func:`~afpq_plugins.core.quantize.fake_quantize_rows`; the smoothing-scale search is
  :func:`~afpq_plugins.gptqmodel.awq_search.compute_best_scale` (gptqmodel's own corrupts
  float32 weights on the CPU, see that module; that module's ``rotary_for_layer`` also gives
  Gemma 3's per-layer-type rotary its layer type); the clip search is core's
  (:func:`~afpq_plugins.core.search.symmetric_clip`, or ``two_sided_clip``; ``clip="engine"``
  keeps gptqmodel's own loop); ``pack_module`` writes :class:`AFPQLinear` (4-bit: the
  ``awq`` layout, else ``gptq``).

Engine results are checked (:func:`~afpq_plugins.nn.convert.check_engine_result`; GPTQ's
when they are computed, before any module of their decoder layer is finalized); the first
bad one is recorded, nothing is swapped after it and the caller's thread raises it once
gptqmodel returns (an exception in gptqmodel's worker threads ends the interpreter).

The bound classes carry the settings (a :class:`~afpq_plugins.core.spec.QuantSpec`, layout
resolved for the method, plus AWQ's clip search) and collect the names of the
modules they packed (``quantized_modules``) and the count of weights that did not
re-encode exactly (``mismatches``, zero when GPTQ used the AFPQ quantizer).
"""

from __future__ import annotations

import contextlib
import copy
import threading
from typing import List, Mapping, Optional

import torch

from ..core.errors import EngineResultError
from ..core.quantize import fake_quantize_rows
from ..core.spec import QuantSpec
from ..core.search import apply_two_sided_clip, symmetric_clip, two_sided_clip
from ..nn.convert import check_engine_result, float_weight, linear_from_engine
from ..nn.skeleton import set_module
from .awq_search import compute_best_scale, rotary_for_layer

__all__ = ["CLIP_MODES", "gptq_processor_class", "awq_processor_class"]

CLIP_MODES = ("symmetric", "two-sided", "engine")
_AVOID_CLIPPING = ("q_", "k_", "query", "key", "Wqkv")  # as gptqmodel/AutoAWQ: q/k feed a bmm
_LOCK = threading.Lock()


def _record(cls, exc: EngineResultError) -> None:
    """Keep the first bad result: gptqmodel ends the whole interpreter (``os._exit(1)``) on an
    exception in its worker threads, so the error is raised in the caller's thread once
    gptqmodel returns (:func:`afpq_plugins.gptqmodel.api._run`), and nothing is swapped after it."""
    with _LOCK:
        if cls.error is None:
            cls.error = exc


def _pack(cls, root, module, p1, p2, g_idx) -> None:
    """AFPQLinear from the engine's result (weight = its fake-quantized weight) into ``root``;
    nothing once a bad result was seen (:func:`_record`)."""
    lin = getattr(module, "module", module)
    name = module.full_name
    if cls.error is not None:
        return
    try:
        layer, mismatches = linear_from_engine(_spec_for(cls, name), lin, p1, p2, g_idx, name)
    except EngineResultError as exc:
        _record(cls, exc)
        return
    set_module(root, name, layer)
    with _LOCK:
        cls.quantized_modules.append(name)
        cls.mismatches += mismatches


def _check_staged(proc, module) -> None:
    """The GPTQ result gptqmodel just staged for ``module``, checked when it is computed: all of
    a decoder layer's modules are processed before the first is finalized (swapped), so a bad
    result stops the run before any module of its layer changes."""
    module.stream_sync()
    with proc.lock:
        p1, p2, g_idx = (module.state.get(k) for k in ("q_scales", "q_zeros", "q_g_idx"))
    try:
        check_engine_result(_spec_for(type(proc), module.full_name), float_weight(getattr(module, "module", module)),
                            p1, p2, g_idx, module.full_name)
    except EngineResultError as exc:
        _record(type(proc), exc)


def _spec_for(cls, name: str) -> QuantSpec:
    """The settings of module ``name`` (a full module name): its own (a bits budget's
    ``layer_specs``), else the processor's."""
    return cls.layer_specs.get(name, cls.afpq)


def _take_state(proc, module, keys):
    """The engine's staged tensors of ``module`` (cloned: they may be pinned, other threads), state cleared."""
    module.stream_sync()
    with proc.lock:
        for k in ("w", "w_wq_diff", "wq"):
            module.state.pop(k, None)
        return tuple(module.state.pop(k).clone() for k in keys)


def gptq_processor_class(spec: QuantSpec, layer_specs: Optional[Mapping[str, QuantSpec]] = None) -> type:
    """gptqmodel's ``GPTQProcessor`` packing into AFPQLinear, bound to ``spec`` (layout resolved);
    ``layer_specs``: ``{full module name: spec}`` for modules with their own settings (a bits budget:
    the per-layer GPTQ class quantizes them on their grid, :func:`.quantizer.gptq_class`, and their
    group size comes from gptqmodel's ``dynamic`` overrides)."""
    from gptqmodel.looper.gptq_processor import GPTQProcessor

    own_specs = dict(layer_specs or {})

    class AFPQGPTQProcessor(GPTQProcessor):
        afpq = spec
        layer_specs = own_specs
        quantized_modules: List[str] = []
        mismatches = 0
        error = None  # the first bad result (_record)

        def process(self, module, *args, **kwargs):
            out = super().process(module, *args, **kwargs)
            _check_staged(self, module)
            return out

        def submodule_finalize(self, module, model, **kwargs):
            q_scales, q_zeros, q_g_idx = _take_state(self, module, ("q_scales", "q_zeros", "q_g_idx"))
            _pack(type(self), model.model, module, q_scales, q_zeros, q_g_idx)

    AFPQGPTQProcessor.quantized_modules = []
    AFPQGPTQProcessor.error = None
    return AFPQGPTQProcessor


def awq_processor_class(spec: QuantSpec, clip: str = "symmetric",
                        layer_specs: Optional[Mapping[str, QuantSpec]] = None) -> type:
    """gptqmodel's ``AWQProcessor`` on the AFPQ grid, packing into AFPQLinear, bound to ``spec``
    (layout resolved) and the clip search ``clip``.

    ``layer_specs``: ``{full module name: spec}`` for modules with their own settings (a bits
    budget). gptqmodel's AWQ reads one ``qcfg.group_size`` everywhere (no ``dynamic``), so while
    it searches a scaling group's smoothing scale, a module's clip or quantizes a module, this
    thread sees that module's settings (``qcfg`` with its group size, its grid); the Linears of a
    scaling group share one input and one scale and must share their settings (the budget gives
    q/k/v and gate/up one choice)."""
    from gptqmodel.looper.awq_processor import AWQProcessor

    own_specs = dict(layer_specs or {})

    if clip not in CLIP_MODES:
        raise ValueError(f"clip must be one of {', '.join(CLIP_MODES)}, got {clip!r}")

    class AFPQAWQProcessor(AWQProcessor):
        afpq = spec
        afpq_clip = clip
        layer_specs = own_specs
        quantized_modules: List[str] = []
        mismatches = 0
        error = None  # the first bad result (_record)
        _settings = threading.local()  # this thread's module settings (spec, qcfg), see settings_of

        @property
        def qcfg(self):
            own = getattr(self._settings, "qcfg", None)
            return self.__dict__["qcfg"] if own is None else own

        @qcfg.setter
        def qcfg(self, value):
            self.__dict__["qcfg"] = value

        @contextlib.contextmanager
        def settings_of(self, modules: List[torch.nn.Module]):
            """This thread works on ``modules`` (Linears of the model) with their settings."""
            if not self.layer_specs:
                yield
                return
            root = self.gptq_model.model
            ids = {id(m) for m in modules}
            names = [n for n, m in root.named_modules() if id(m) in ids]
            if len(names) != len(ids):  # its settings would be unknown: stop the run, not guess
                _record(type(self), EngineResultError(
                    f"AWQ: {len(ids) - len(names)} module(s) gptqmodel is working on are not in the model "
                    f"(found: {', '.join(names) or 'none'}), so their per-module settings cannot be looked up"))
            specs = {n: _spec_for(type(self), n) for n in names}
            s = specs[names[0]] if names else self.afpq
            if len(set(specs.values())) > 1:
                _record(type(self), EngineResultError(
                    "AWQ shares one smoothing scale among " + ", ".join(names) + ", but their per-module "
                    "settings differ (" + "; ".join(f"{n}: {v.fmt}/{v.mode}/g{v.group_size}" for n, v in specs.items())
                    + "): give them one setting"))
            qcfg = copy.copy(self.__dict__["qcfg"])
            qcfg.group_size = s.group_size
            saved = getattr(self._settings, "spec", None), getattr(self._settings, "qcfg", None)
            self._settings.spec, self._settings.qcfg = s, qcfg
            try:
                yield
            finally:
                self._settings.spec, self._settings.qcfg = saved

        def current_spec(self) -> QuantSpec:
            """The settings this thread quantizes with (:meth:`settings_of`)."""
            own = getattr(self._settings, "spec", None)
            return self.afpq if own is None else own

        def pseudo_quantize_tensor(self, w: torch.Tensor):
            s = self.current_spec()
            return fake_quantize_rows(w, s.format, self.qcfg.group_size, s.mode, s.torch_scale_dtype, s.scale_search,
                                      "AWQ weight")

        def _search_best_scale(self, module, prev_op, layers, *args, **kwargs):
            with self.settings_of(list(layers)):
                return super()._search_best_scale(module, prev_op, layers, *args, **kwargs)

        def apply_quant(self, named_linears, scales_list):
            for name, named in named_linears.items():
                with self.settings_of([self.resolve_quant_source_module(named)]):
                    super().apply_quant({name: named}, scales_list)

        def _pseudo_quantize_tensor_into(self, src: torch.Tensor, dst: torch.Tensor) -> None:
            dst.copy_(self.pseudo_quantize_tensor(src)[0])

        _compute_best_scale = compute_best_scale

        _running = threading.local()  # the module gptqmodel is running, for its rotary call

        def _iter_module_forward_outputs(self, x, module, module_kwargs):
            self._running.layer_type = getattr(module, "layer_type", None)
            yield from super()._iter_module_forward_outputs(x, module, module_kwargs)

        def _get_rotary_for_device(self, target_device):
            return rotary_for_layer(super()._get_rotary_for_device(target_device),
                                    getattr(self._running, "layer_type", None))

        def _fq(self, t: torch.Tensor) -> torch.Tensor:
            return self.pseudo_quantize_tensor(t)[0]

        @torch.inference_mode()
        def _compute_best_clip(self, w, input_feat, n_grid=20, max_shrink=0.5, n_sample_token=512):
            if self.afpq_clip == "engine":
                return super()._compute_best_clip(w, input_feat, n_grid, max_shrink, n_sample_token)
            return symmetric_clip(w, input_feat, self._fq, self.qcfg.group_size, n_grid=n_grid,
                                  max_shrink=max_shrink, n_sample_token=n_sample_token)

        def _search_best_clip(self, layer, named_linears, input_feat):
            if self.afpq_clip != "two-sided":
                out = []
                for name, lin in named_linears.items():  # one at a time: each with its own settings
                    with self.settings_of([lin]):
                        out += super()._search_best_clip(layer, {name: lin}, input_feat)
                return out
            with torch.inference_mode():
                for name, lin in named_linears.items():
                    if any(k in name for k in _AVOID_CLIPPING):
                        continue
                    w = lin.weight.data
                    with self.settings_of([lin]):
                        lo, hi = two_sided_clip(w, input_feat[name].to(w.device), self._fq, self.qcfg.group_size,
                                                separable=self.current_spec().mode == "afpq")
                    lin.weight.data = apply_two_sided_clip(w, lo, hi)
            return []  # applied here; gptqmodel's apply_clip only knows [-max, max]

        def pack_module(self, module):
            q_scales, q_zeros = _take_state(self, module, ("q_scales", "q_zeros"))
            _pack(type(self), self.gptq_model.model, module, q_scales, q_zeros, None)

    AFPQAWQProcessor.quantized_modules = []
    AFPQAWQProcessor.error = None
    return AFPQAWQProcessor
