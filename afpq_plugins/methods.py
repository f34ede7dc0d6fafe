"""The registry of quantization methods: one signature, whichever engine runs it.

A method is a name (``rtn``, ``gptq``, ``awq``) run by an *engine* (``core``,
``autogptq``, ``autoawq``, ``gptqmodel``, ``llmcompressor``). Every registered
:class:`Method` has one function::

    run(model, tokenizer, spec: QuantSpec, calib: Calibration, **options) -> AFPQConfigDict

which quantizes the in-memory transformers ``model`` in place (its Linears become
:class:`~afpq_plugins.nn.AFPQLinear`) and returns the checkpoint's ``quantization_config``
(save with :func:`afpq_plugins.model.save_quantized`). ``spec`` is the one settings value
(:class:`~afpq_plugins.core.spec.QuantSpec`), handed to the engine with its layout fixed for
the method (:meth:`QuantSpec.resolved`). ``afpq quantize``, ``afpq demo`` and the accuracy
study (:mod:`afpq_plugins.study`) all go through :func:`quantize`.

The engines' ``run`` functions live in their adapters (``afpq_plugins.rtn.run``,
``afpq_plugins.autogptq.api.run``, ...). A registration names them by a lazy
``"module:function"`` path, so registering costs nothing and an engine is imported only
when its method runs; :meth:`Method.missing` says (without importing) whether the engine
is installed, so :func:`get_method` can pick the default engine of a venv
(``backend=None``: the first installed in registration order) and name the right venv
when none is. Adding a stack's method is one :func:`register_method` call.

A bits budget (``bits_budget``, ``candidates``, ``budget_objective``: per-layer formats) runs
with ``rtn`` itself, and with an engine whose options list ``layer_specs``: :func:`quantize`
chooses every Linear's settings on the float model first
(:func:`afpq_plugins.rtn.allocate_budget`), then calls the engine with
``layer_specs={module name: QuantSpec}`` (names as in ``model.named_modules()``; format,
group size and mode differ, layout, scale dtype and scale search are ``spec``'s). The engine
quantizes each of those Linears with its own settings and returns the config built with
``AFPQConfigDict.from_spec(..., layer_specs=layer_specs)``; :func:`quantize` checks that the
config says what was chosen and records the allocation.

The same lazy mechanism answers :func:`gptq_layer_class`: the per-layer GPTQ class of an
engine (optimum runs GPTQ through gptqmodel or AutoGPTQ and asks for theirs here instead
of importing a sibling adapter).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from dataclasses import dataclass, field, replace
from typing import Callable, Dict, List, Optional, Tuple, Union

from .core.errors import MethodUnavailable
from .core.spec import QuantSpec

__all__ = [
    "QuantSpec", "FormatSpec", "Calibration", "Method", "register_method", "get_method", "list_methods",
    "engines_for", "quantize", "MethodUnavailable", "gptq_layer_class",
]

#: The name the registry used for its settings before :class:`QuantSpec` (same positional order).
FormatSpec = QuantSpec


def _resolve(ref: Union[str, Callable, None]) -> Optional[Callable]:
    """A callable, or a ``"package.module:function"`` path imported on first use."""
    if ref is None or callable(ref):
        return ref
    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr)


@dataclass(frozen=True)
class Calibration:
    """Calibration windows: ``nsamples`` x ``seqlen`` tokens, seeded; ``None`` = the engine's own
    default (:attr:`Method.default_calibration`).

    The text is the embedded Austen calibration novels, or ``dataset``: a plain-text file, a
    JSONL file (field ``text_field``) or a ``datasets`` folder saved with ``save_to_disk``
    (``split``; :func:`afpq_plugins.data.load_dataset_texts`), which must hold at least
    ``nsamples * seqlen`` tokens."""

    nsamples: Optional[int] = None
    seqlen: Optional[int] = None
    seed: int = 0
    dataset: Optional[str] = None
    split: Optional[str] = None
    text_field: str = "text"

    def resolved(self, method: "Method") -> "Calibration":
        n, s = method.default_calibration
        return replace(self, nsamples=self.nsamples or n, seqlen=self.seqlen or s)

    def describe(self) -> str:
        """One line for logs and model cards: what the windows are cut from, and how many."""
        if self.dataset is None:
            src = "the embedded Austen novels (Emma, Mansfield Park, Northanger Abbey, Persuasion, Sense and Sensibility)"
        else:
            src = f"{os.path.basename(os.path.normpath(self.dataset))}" + (f" split {self.split}" if self.split else "")
            if not os.path.isfile(self.dataset) or self.dataset.lower().endswith((".jsonl", ".json")):
                src += f" (field {self.text_field!r})"
        size = f"{self.nsamples} x {self.seqlen} tokens" if self.nsamples and self.seqlen else "engine default size"
        return f"{size} from {src}, seed {self.seed}"

    def samples(self, tokenizer):
        """The windows (memoised per tokenizer: tokenizing the five novels takes tens of seconds)."""
        from .data import calibration_samples, load_dataset_texts

        key = (tokenizer, self.nsamples, self.seqlen, self.seed, self.dataset, self.split, self.text_field)
        if key not in _SAMPLES:
            _SAMPLES.clear()  # keep one set
            texts = None if self.dataset is None else load_dataset_texts(self.dataset, self.split, self.text_field)
            _SAMPLES[key] = calibration_samples(tokenizer, self.nsamples, self.seqlen, seed=self.seed, texts=texts,
                                                source=f"--dataset {self.dataset!r}")
        return [s.clone() for s in _SAMPLES[key]]


_SAMPLES: Dict[tuple, list] = {}


@dataclass(frozen=True)
class Method:
    """One way to quantize: ``name`` run by ``engine`` (see the module docstring).

    ``run`` and ``supports_model`` are callables or lazy ``"module:function"`` paths."""

    name: str
    engine: str
    run: Union[Callable, str]
    requires: Tuple[str, ...] = ()  # importable modules the engine needs
    install_hint: str = ""  # where the engine lives ("use .venv-legacy", "pip install ...")
    default_calibration: Tuple[Optional[int], Optional[int]] = (None, None)
    options: Tuple[str, ...] = ()  # keyword options run() accepts besides progress
    description: str = ""
    supports_model: Union[Callable, str, None] = field(default=None, compare=False)  # (model) -> reason or None

    @property
    def calibrated(self) -> bool:
        return self.default_calibration != (None, None)

    def missing(self) -> Optional[str]:
        """None when the engine is installed here, else a one-line reason."""
        for mod in self.requires:
            if importlib.util.find_spec(mod) is None:
                return f"{self.engine} is not installed in this environment ({mod} not importable){self.install_hint}"
        return None

    def unsupported(self, model) -> Optional[str]:
        """None when the engine takes ``model``'s architecture, else a one-line reason."""
        check = _resolve(self.supports_model)
        return check(model) if check is not None else None

    def __call__(self, model, tokenizer, spec: QuantSpec, calib: "Calibration", **options):
        return _resolve(self.run)(model, tokenizer, spec, calib, **options)


_METHODS: Dict[Tuple[str, str], Method] = {}
_BUDGET_OPTIONS = ("bits_budget", "candidates", "budget_objective")


def register_method(method: Method) -> Method:
    """Add (or replace) ``method`` under ``(method.name, method.engine)``."""
    _METHODS[method.name, method.engine] = method
    return method


def list_methods() -> List[str]:
    return list(dict.fromkeys(name for name, _ in _METHODS))


def engines_for(name: str) -> List[str]:
    return [e for (n, e) in _METHODS if n == name]


def get_method(name: str, backend: Optional[str] = None) -> Method:
    """The method ``name`` run by ``backend`` (None: the first installed engine, in registration order)."""
    engines = engines_for(name)
    if not engines:
        raise ValueError(f"unknown method {name!r}: expected one of {', '.join(list_methods())}")
    if backend is not None:
        if backend not in engines:
            raise ValueError(f"method {name!r} has no backend {backend!r}: expected one of {', '.join(engines)}")
        m = _METHODS[name, backend]
        why = m.missing()
        if why:
            raise MethodUnavailable(why)
        return m
    reasons = []
    for e in engines:
        m = _METHODS[name, e]
        why = m.missing()
        if why is None:
            return m
        reasons.append(why)
    raise MethodUnavailable(f"no engine for method {name!r} is installed here: " + "; ".join(reasons))


def quantize(model, tokenizer, method: str, spec: QuantSpec, calib: Optional[Calibration] = None,
             backend: Optional[str] = None, **options):
    """Quantize ``model`` in place with ``method`` (see the module docstring); returns the config."""
    m = get_method(method, backend)
    budget = m.name != "rtn" and any(options.get(k) is not None for k in _BUDGET_OPTIONS)
    bad = [k for k in options if k not in m.options and k != "progress"
           and not (budget and k in _BUDGET_OPTIONS and "layer_specs" in m.options)]
    if bad:
        raise ValueError(f"method {method!r} ({m.engine}) has no option {bad[0]!r}"
                         + (f"; it takes {', '.join(m.options)}" if m.options else "")
                         + ("; a bits budget (per-layer formats) needs an engine that takes per-module settings ("
                            + (f"for {m.name!r}: backend {', '.join(budget_engines(m.name))}; or method 'rtn')"
                               if budget_engines(m.name) else f"none for {m.name!r} yet; use method 'rtn')")
                            if bad[0] in _BUDGET_OPTIONS and m.name != "rtn" else ""))
    why = m.unsupported(model)
    if why:
        raise MethodUnavailable(why + _alternatives(m, model))
    calib = (calib or Calibration()).resolved(m)
    if budget and spec.layout is None:
        spec = replace(spec, layout=budget_layout(m.name, spec, options.get("candidates")))
    spec = spec.resolved(m.name)
    if not budget:
        return m(model, tokenizer, spec, calib, **options)
    return _budgeted_engine_run(m, model, tokenizer, spec, calib, options)


def budget_engines(name: str) -> List[str]:
    """The engines of method ``name`` that take a bits budget (per-module settings)."""
    return [e for e in engines_for(name) if "layer_specs" in _METHODS[name, e].options]


def budget_layout(method: str, spec: QuantSpec, candidates=None) -> str:
    """The layout of a budgeted run when none was asked for: the method's default, except that
    AWQ's 4-bit ``awq`` layout cannot hold the 3-bit layers a mixture may choose, so AWQ with
    candidates of other widths writes ``gptq`` (which every loader and kernel reads)."""
    from .core.budget import DEFAULT_CANDIDATES
    from .core.formats import get_format

    default = spec.layout_for(method)
    widths = {get_format(c.fmt).bits for c in (candidates or DEFAULT_CANDIDATES)}
    return "gptq" if default == "awq" and widths != {4} else default


def __getattr__(name: str):
    # BUDGET_SCORING_CALIBRATION: the bits budget's scoring windows for a calibrated method (the
    # engine's calibration data, at most this many samples x tokens; the engine itself uses all of its
    # windows): RTN's own default, read from there (not a second copy of the numbers)
    if name == "BUDGET_SCORING_CALIBRATION":
        from .rtn import RTN_OUTPUT_CALIBRATION

        return RTN_OUTPUT_CALIBRATION
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _budgeted_engine_run(m: Method, model, tokenizer, spec: QuantSpec, calib: Calibration, options: dict):
    """A bits budget through a calibrated engine: choose every Linear's settings on the float model
    (:func:`afpq_plugins.rtn.allocate_budget`, the candidates scored with ``spec``'s scale search),
    then run the engine with that choice (``layer_specs``) and record the allocation."""
    from .rtn import RTN_OUTPUT_CALIBRATION, allocate_budget, most_common_spec
    from .model import find_linears

    opts = dict(options)
    bits_budget = opts.pop("bits_budget", None)
    candidates = opts.pop("candidates", None)
    objective = opts.pop("budget_objective", None)
    if bits_budget is None:
        raise ValueError("--candidates / --budget-objective need --bits-budget")
    n, s = RTN_OUTPUT_CALIBRATION
    scoring = replace(calib, nsamples=min(calib.nsamples or n, n), seqlen=min(calib.seqlen or s, s))
    linears = find_linears(model, spec.skip)
    kw = {"objective": objective} if objective else {}
    layer_specs, extra, _ = allocate_budget(model, tokenizer, spec, scoring, bits_budget, candidates,
                                            progress=opts.get("progress", True), linears=linears, **kw)
    base = most_common_spec(layer_specs, linears)
    qc = m(model, tokenizer, base, calib, layer_specs=layer_specs, **opts)
    def label(q: QuantSpec) -> str:
        return f"{q.fmt}/{q.mode}/g{q.group_size}"

    wrong = [f"{k} ({label(qc.spec_for(k)) if k in qc.quantized_modules else 'not quantized'}, "
             f"chosen {label(v)})" for k, v in layer_specs.items()
             if k not in qc.quantized_modules or
             (qc.spec_for(k).fmt, qc.spec_for(k).group_size, qc.spec_for(k).mode) != (v.fmt, v.group_size, v.mode)]
    if wrong:
        raise RuntimeError(f"{m.engine} did not apply the bits budget's per-module settings: "
                           + "; ".join(wrong[:3]) + (f" (+{len(wrong) - 3} more)" if len(wrong) > 3 else ""))
    extra["allocation"]["scoring_calibration"] = scoring.describe()
    qc.extra.update(extra)
    return qc


def _alternatives(m: Method, model) -> str:
    """'; supported by X (--backend X)' / 'not installed here' for the method's other engines."""
    out = []
    for e in engines_for(m.name):
        other = _METHODS[m.name, e]
        if other is m:
            continue
        if other.missing():
            out.append(f"{e} is not installed here{other.install_hint.replace(';', ':', 1)}")
        elif other.unsupported(model) is None:
            out.append(f"{e} supports it (--backend {e})")
    return ("; " + "; ".join(out)) if out else ""


# -- engines' per-layer GPTQ classes (optimum's backends) ------------------------------------------
_GPTQ_LAYER_CLASSES: Dict[str, str] = {
    "gptqmodel": "afpq_plugins.gptqmodel.quantizer:gptq_class",
    "autogptq": "afpq_plugins.autogptq.quantizer:gptq_class",
}


def gptq_layer_class(engine: str, spec: QuantSpec) -> type:
    """``engine``'s per-layer GPTQ class with ``spec``'s grid bound (imports that adapter on first use)."""
    ref = _GPTQ_LAYER_CLASSES.get(engine)
    if ref is None:
        raise MethodUnavailable(f"no per-layer GPTQ class for engine {engine!r} "
                                f"(known: {', '.join(_GPTQ_LAYER_CLASSES)})")
    return _resolve(ref)(spec)


# -- the built-in engines (each run function lives in its adapter) ----------------------------------
_LEGACY = "; use .venv-legacy"
_MODERN = "; use .venv-modern (pip install gptqmodel==7.6.0)"
_LLMC = "; use .venv-modern (pip install llmcompressor==0.14.0.1)"
_GPTQ_OPTIONS = ("desc_act", "static_groups", "true_sequential", "damp_percent")

register_method(Method("rtn", "core", "afpq_plugins.rtn:run", options=("fake", "bits_budget", "candidates", "budget_objective"),
                       description="round to nearest (core maths, any venv)"))
register_method(Method("gptq", "autogptq", "afpq_plugins.autogptq.api:run", requires=("auto_gptq",),
                       install_hint=_LEGACY, default_calibration=(128, 2048),
                       options=_GPTQ_OPTIONS + ("layer_specs",), description="GPTQ through AutoGPTQ 0.7.1",
                       supports_model="afpq_plugins.autogptq.api:supports_model"))
register_method(Method("awq", "autoawq", "afpq_plugins.autoawq.io:run", requires=("awq",), install_hint=_LEGACY,
                       default_calibration=(128, 512), options=("clip", "layer_specs"),
                       description="AWQ through AutoAWQ 0.2.9",
                       supports_model="afpq_plugins.autoawq.io:supports_model"))
register_method(Method("gptq", "gptqmodel", "afpq_plugins.gptqmodel.api:run_gptq", requires=("gptqmodel",),
                       install_hint=_MODERN, default_calibration=(128, 2048),
                       options=_GPTQ_OPTIONS + ("layer_specs",),
                       description="GPTQ through GPTQModel 7.6",
                       supports_model="afpq_plugins.gptqmodel.api:supported_model_type"))
register_method(Method("awq", "gptqmodel", "afpq_plugins.gptqmodel.api:run_awq", requires=("gptqmodel",),
                       install_hint=_MODERN, default_calibration=(128, 512),
                       options=("clip", "true_sequential", "layer_specs"),
                       description="AWQ through GPTQModel 7.6",
                       supports_model="afpq_plugins.gptqmodel.api:supported_model_type"))
register_method(Method("gptq", "llmcompressor", "afpq_plugins.llmcompressor:run_gptq", requires=("llmcompressor",),
                       install_hint=_LLMC, default_calibration=(512, 2048), options=("damp_percent", "layer_specs"),
                       description="GPTQ through llm-compressor 0.14 oneshot (AFPQGPTQModifier)"))
# calibration: llm-compressor's AWQ examples (256 samples x 512 tokens)
register_method(Method("awq", "llmcompressor", "afpq_plugins.llmcompressor:run_awq", requires=("llmcompressor",),
                       install_hint=_LLMC, default_calibration=(256, 512),
                       options=("duo_scaling", "n_grid", "layer_specs"),
                       description="AWQ through llm-compressor 0.14 oneshot (AFPQAWQModifier)"))
