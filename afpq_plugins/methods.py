"""The registry of quantization methods: one signature, whichever engine runs it.

A method is a name (``rtn``, ``gptq``, ``awq``) run by an *engine* (``core``,
``autogptq``, ``autoawq``, ``gptqmodel``, ``llmcompressor``). Every registered
:class:`Method` has one function::

    run(model, tokenizer, spec: FormatSpec, calib: Calibration, **options) -> AFPQConfigDict

which quantizes the in-memory transformers ``model`` in place (its Linears become
:class:`~afpq_plugins.nn.AFPQLinear`) and returns the checkpoint's ``quantization_config``
(save with :func:`afpq_plugins.model.save_quantized`). ``afpq quantize``, ``afpq demo``
and the accuracy study (:mod:`afpq_plugins.study`) all go through :func:`quantize`.
Adding a stack's method is one :func:`register_method` call.

Engines are imported only when a method runs; :meth:`Method.missing` says (without
importing) whether the engine is installed, so :func:`get_method` can pick the default
engine of a venv (``backend=None``: the first installed in registration order) and
name the right venv when none is.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field, replace
from typing import Callable, Dict, List, Optional, Sequence, Tuple

__all__ = [
    "FormatSpec", "Calibration", "Method", "register_method", "get_method", "list_methods", "engines_for",
    "quantize", "MethodUnavailable",
]


class MethodUnavailable(ValueError):
    """The method or its engine cannot run here (engine not installed, model type unsupported)."""


@dataclass(frozen=True)
class FormatSpec:
    """What the checkpoint stores: grid, group size, mode, scale dtype, layout, float modules, scale search."""

    fmt: str = "nf4"
    group_size: int = 128
    mode: Optional[str] = None
    scale_dtype: str = "float16"
    layout: Optional[str] = None  # None: the method's default (gptq; AWQ: awq at 4 bits)
    skip: Tuple[str, ...] = ("lm_head",)
    scale_search: object = None  # None/"minmax", "mse", ... (afpq_plugins.core.search)

    def torch_scale_dtype(self):
        from .core.constants import scale_dtype

        return scale_dtype(self.scale_dtype)


@dataclass(frozen=True)
class Calibration:
    """Calibration windows (``nsamples`` x ``seqlen`` tokens of the Austen calibration novels,
    seeded); ``None`` = the engine's own default (:attr:`Method.default_calibration`)."""

    nsamples: Optional[int] = None
    seqlen: Optional[int] = None
    seed: int = 0

    def resolved(self, method: "Method") -> "Calibration":
        n, s = method.default_calibration
        return replace(self, nsamples=self.nsamples or n, seqlen=self.seqlen or s)

    def samples(self, tokenizer):
        """The windows (memoised per tokenizer: tokenizing the five novels takes tens of seconds)."""
        from .data import calibration_samples

        key = (tokenizer, self.nsamples, self.seqlen, self.seed)
        if key not in _SAMPLES:
            _SAMPLES.clear()  # keep one set
            _SAMPLES[key] = calibration_samples(tokenizer, self.nsamples, self.seqlen, seed=self.seed)
        return [s.clone() for s in _SAMPLES[key]]


_SAMPLES: Dict[tuple, list] = {}


@dataclass(frozen=True)
class Method:
    """One way to quantize: ``name`` run by ``engine`` (see the module docstring)."""

    name: str
    engine: str
    run: Callable
    requires: Tuple[str, ...] = ()  # importable modules the engine needs
    install_hint: str = ""  # where the engine lives ("use .venv-legacy", "pip install ...")
    default_calibration: Tuple[Optional[int], Optional[int]] = (None, None)
    options: Tuple[str, ...] = ()  # keyword options run() accepts besides progress
    description: str = ""
    supports_model: Optional[Callable] = field(default=None, compare=False)  # (model) -> reason or None

    @property
    def calibrated(self) -> bool:
        return self.default_calibration != (None, None)

    def missing(self) -> Optional[str]:
        """None when the engine is installed here, else a one-line reason."""
        for mod in self.requires:
            if importlib.util.find_spec(mod) is None:
                return f"{self.engine} is not installed in this environment ({mod} not importable){self.install_hint}"
        return None


_METHODS: Dict[Tuple[str, str], Method] = {}


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


def quantize(model, tokenizer, method: str, spec: FormatSpec, calib: Optional[Calibration] = None,
             backend: Optional[str] = None, **options):
    """Quantize ``model`` in place with ``method`` (see the module docstring); returns the config."""
    m = get_method(method, backend)
    bad = [k for k in options if k not in m.options and k != "progress"]
    if bad:
        raise ValueError(f"method {method!r} ({m.engine}) has no option {bad[0]!r}"
                         + (f"; it takes {', '.join(m.options)}" if m.options else ""))
    if m.supports_model is not None:
        why = m.supports_model(model)
        if why:
            raise MethodUnavailable(why + _alternatives(m, model))
    calib = (calib or Calibration()).resolved(m)
    return m.run(model, tokenizer, spec, calib, **options)


def _alternatives(m: Method, model) -> str:
    """'; supported by X (--backend X)' / 'not installed here' for the method's other engines."""
    out = []
    for e in engines_for(m.name):
        other = _METHODS[m.name, e]
        if other is m:
            continue
        if other.missing():
            out.append(f"{e} is not installed here{other.install_hint.replace(';', ':', 1)}")
        elif other.supports_model is None or other.supports_model(model) is None:
            out.append(f"{e} supports it (--backend {e})")
    return ("; " + "; ".join(out)) if out else ""


# -- core: round to nearest ---------------------------------------------------------------------
def _rtn(model, tokenizer, spec: FormatSpec, calib: Calibration, progress: bool = True, fake: bool = False):
    """RTN; ``fake=True`` keeps ``nn.Linear`` modules holding the decoded weights (what the
    packed modules decode to, bit for bit; faster to evaluate on CPU)."""
    from .model import quantize_model_rtn

    layer_searches = _rtn_output_searches(model, tokenizer, spec, calib, progress)
    if not fake:
        return quantize_model_rtn(model, spec.fmt, spec.group_size, spec.mode, spec.layout or "gptq",
                                  skip=list(spec.skip), scale_dtype=spec.torch_scale_dtype(), progress=progress,
                                  scale_search=spec.scale_search, layer_searches=layer_searches)
    import torch

    from .core.checkpoint import AFPQConfigDict
    from .core.formats import get_format, resolve_mode
    from .core.quantize import fake_quantize, search_dict
    from .model import find_linears

    f = get_format(spec.fmt)
    mode = resolve_mode(f, spec.mode)
    linears = find_linears(model, spec.skip)
    with torch.no_grad():
        for name, lin in linears.items():
            lin.weight.copy_(fake_quantize(lin.weight, f, spec.group_size, mode, scale_dtype=spec.torch_scale_dtype(),
                                           name=name, search=(layer_searches or {}).get(name, spec.scale_search)))
    return AFPQConfigDict(format=f.name, bits=f.bits, group_size=spec.group_size, mode=mode,
                          layout=spec.layout or "gptq", scale_dtype=spec.scale_dtype, method="rtn",
                          modules_to_not_convert=list(spec.skip), quantized_modules=list(linears),
                          extra={"scale_search": search_dict(spec.scale_search), "fake": True})


#: RTN's calibration for the output search when none is given (nsamples x seqlen tokens).
RTN_OUTPUT_CALIBRATION = (32, 512)


def _rtn_output_searches(model, tokenizer, spec: FormatSpec, calib: Calibration, progress: bool):
    """For ``scale_search="output"``: the search bound to each Linear's input energies
    ``diag(X^T X)`` over the calibration samples (forward hooks); None for other searches."""
    from .core.output_search import bind_layers, input_energies, is_output_search
    from .core.search import resolve_search
    from .model import find_linears

    search = resolve_search(spec.scale_search)
    if not is_output_search(search):
        return None
    if tokenizer is None:
        raise ValueError("RTN with scale search 'output' needs calibration activations: pass the tokenizer")
    calib = replace(calib, nsamples=calib.nsamples or RTN_OUTPUT_CALIBRATION[0],
                    seqlen=calib.seqlen or RTN_OUTPUT_CALIBRATION[1])
    linears = find_linears(model, spec.skip)
    energies = input_energies(model, linears, calib.samples(tokenizer), progress=progress)
    return bind_layers(search, energies, spec.group_size)


# -- AutoGPTQ 0.7.1 / AutoAWQ 0.2.9 (legacy venv) ------------------------------------------------
_LEGACY = "; use .venv-legacy"


def _autogptq(model, tokenizer, spec: FormatSpec, calib: Calibration, progress: bool = True,
              desc_act: bool = False, static_groups: bool = False, true_sequential: bool = True,
              damp_percent: float = 0.01):
    if (spec.layout or "gptq") != "gptq" or tuple(spec.skip) != ("lm_head",):
        raise ValueError("--method gptq writes layout gptq and keeps only lm_head in float (AutoGPTQ's layer lists)")
    from .autogptq.api import gptq_quantize

    return gptq_quantize(model, tokenizer, spec.fmt, spec.group_size, spec.mode, scale_dtype=spec.scale_dtype,
                         desc_act=desc_act, static_groups=static_groups, true_sequential=true_sequential,
                         damp_percent=damp_percent, nsamples=calib.nsamples, seqlen=calib.seqlen, seed=calib.seed,
                         scale_search=spec.scale_search)


def _autoawq(model, tokenizer, spec: FormatSpec, calib: Calibration, progress: bool = True,
             clip: str = "symmetric"):
    from .autoawq.io import awq_quantize

    return awq_quantize(model, tokenizer, spec.fmt, spec.group_size, spec.mode, clip=clip,
                        layout=None if spec.layout == "gptq" else spec.layout, skip=list(spec.skip),
                        scale_dtype=spec.torch_scale_dtype(), calib_data=[s.tolist() for s in calib.samples(tokenizer)],
                        n_samples=calib.nsamples, seqlen=calib.seqlen, progress=progress,
                        scale_search=spec.scale_search)


def _type_in(model, module: str, attr: str, engine: str, flag: str) -> Optional[str]:
    import importlib

    mt = getattr(model.config, "model_type", None)
    if mt in getattr(importlib.import_module(module), attr):
        return None
    return f"model type {mt!r} is not supported by {engine} (--backend {flag})"


def _autogptq_supports(model) -> Optional[str]:
    return _type_in(model, "auto_gptq.modeling.auto", "GPTQ_CAUSAL_LM_MODEL_MAP", "AutoGPTQ 0.7.1", "autogptq")


def _autoawq_supports(model) -> Optional[str]:
    import warnings

    with warnings.catch_warnings():  # AutoAWQ 0.2.9 warns at import that it is deprecated
        warnings.simplefilter("ignore")
        return _type_in(model, "awq.models.auto", "AWQ_CAUSAL_LM_MODEL_MAP", "AutoAWQ 0.2.9", "autoawq")


register_method(Method("rtn", "core", _rtn, options=("fake",),
                       description="round to nearest (core maths, any venv)"))
register_method(Method("gptq", "autogptq", _autogptq, requires=("auto_gptq",), install_hint=_LEGACY,
                       default_calibration=(128, 2048),
                       options=("desc_act", "static_groups", "true_sequential", "damp_percent"),
                       description="GPTQ through AutoGPTQ 0.7.1", supports_model=_autogptq_supports))
register_method(Method("awq", "autoawq", _autoawq, requires=("awq",), install_hint=_LEGACY,
                       default_calibration=(128, 512), options=("clip",),
                       description="AWQ through AutoAWQ 0.2.9", supports_model=_autoawq_supports))


# -- the plan printed before a long run, and the time estimate after the first layer ---------------
def decoder_layers(model):
    """The model's repeated decoder blocks (the largest ``nn.ModuleList``), or None."""
    import torch

    best = None
    for _, mod in model.named_modules():
        if isinstance(mod, torch.nn.ModuleList) and len(mod) and (best is None or len(mod) > len(best)):
            best = mod
    return best


def describe_plan(method: Method, model, calib: Calibration) -> str:
    """One line: engine, layers, samples x tokens, device (printed by the CLI before a long run)."""
    from .model import find_linears

    layers = decoder_layers(model)
    dev = next(model.parameters()).device
    nl = len(layers) if layers is not None else "?"
    return (f"afpq quantize: {method.name} through {method.engine}; {nl} decoder layers, "
            f"{len(find_linears(model))} Linear layers; calibration {calib.nsamples} x {calib.seqlen} tokens "
            f"(--nsamples/--calib-seqlen); device {dev}")


class FirstLayerTimer:
    """Prints, once, an estimate of the whole run from the time the first decoder layer took.

    Calibrated engines quantize layer by layer: the first forward of decoder layer 1 marks
    the end of layer 0 (its calibration forwards, its quantization, its output pass).
    Forward pre-hooks only; removed on exit.
    """

    def __init__(self, model, log: Callable[[str], None]):
        self.layers = decoder_layers(model)
        self.log = log
        self.handles = []
        self.t0 = None
        self.done = False

    def __enter__(self):
        import time

        if self.layers is None or len(self.layers) < 2:
            return self

        def first(mod, inp):
            if self.t0 is None:
                self.t0 = time.perf_counter()

        def second(mod, inp):
            if self.t0 is not None and not self.done:
                self.done = True
                dt = time.perf_counter() - self.t0
                n = len(self.layers)
                self.log(f"afpq quantize: the first of {n} layers took {dt:.0f}s; the whole run should take about "
                         f"{dt * n / 60:.1f} min on this machine (fewer --nsamples / --calib-seqlen is faster)")

        self.handles = [self.layers[0].register_forward_pre_hook(first),
                        self.layers[1].register_forward_pre_hook(second)]
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        return False


# -- GPTQModel 7.6 (modern venv) --------------------------------------------------------------------
_MODERN = "; use .venv-modern (pip install gptqmodel==7.6.0)"


def _gptqmodel(method: str):
    def run(model, tokenizer, spec: FormatSpec, calib: Calibration, progress: bool = True, **options):
        from .gptqmodel import quantize_model

        return quantize_model(model, tokenizer, spec, calib, method=method, progress=progress, **options)

    run.__name__ = f"_gptqmodel_{method}"
    return run


def _gptqmodel_supports(model) -> Optional[str]:
    from .gptqmodel import supported_model_type

    return supported_model_type(model)


register_method(Method("gptq", "gptqmodel", _gptqmodel("gptq"), requires=("gptqmodel",), install_hint=_MODERN,
                       default_calibration=(128, 2048),
                       options=("desc_act", "static_groups", "true_sequential", "damp_percent"),
                       description="GPTQ through GPTQModel 7.6", supports_model=_gptqmodel_supports))
register_method(Method("awq", "gptqmodel", _gptqmodel("awq"), requires=("gptqmodel",), install_hint=_MODERN,
                       default_calibration=(128, 512), options=("clip", "true_sequential"),
                       description="AWQ through GPTQModel 7.6", supports_model=_gptqmodel_supports))


# -- llm-compressor 0.14 (modern venv) ---------------------------------------------------------------
def _llmcompressor(method: str):
    def run(model, tokenizer, spec: FormatSpec, calib: Calibration, progress: bool = True, **options):
        from .llmcompressor import quantize_model

        return quantize_model(model, tokenizer, spec, calib, method=method, progress=progress, **options)

    run.__name__ = f"_llmcompressor_{method}"
    return run


_LLMC = "; use .venv-modern (pip install llmcompressor==0.14.0.1)"
register_method(Method("gptq", "llmcompressor", _llmcompressor("gptq"), requires=("llmcompressor",), install_hint=_LLMC,
                       default_calibration=(512, 2048), options=("damp_percent",),
                       description="GPTQ through llm-compressor 0.14 oneshot (AFPQGPTQModifier)"))
# calibration: llm-compressor's AWQ examples (256 samples x 512 tokens)
register_method(Method("awq", "llmcompressor", _llmcompressor("awq"), requires=("llmcompressor",), install_hint=_LLMC,
                       default_calibration=(256, 512), options=("duo_scaling", "n_grid"),
                       description="AWQ through llm-compressor 0.14 oneshot (AFPQAWQModifier)"))
