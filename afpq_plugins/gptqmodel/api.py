"""GPTQ and AWQ on AFPQ grids through GPTQModel 7.6: the Python API and the methods' engine.

For GPTQModel users, two changed lines (the imports)::

    from afpq_plugins.gptqmodel import GPTQModel, QuantizeConfig   # was: from gptqmodel import ...
    cfg = QuantizeConfig(bits=3, group_size=64, fmt="nf3")           # fmt= selects an AFPQ grid
    model = GPTQModel.load(path, cfg)
    model.quantize(calibration, tokenizer=tok)
    model.save(out)                                                   # the project's checkpoint format
    model = GPTQModel.load(out)                                       # back through the project loader

``QuantizeConfig`` without ``fmt`` is gptqmodel's own (stock INT, untouched).
``method="awq"`` selects GPTQModel's AWQ. Nothing is patched globally: the AFPQ classes
are swapped in only while an AFPQ model's ``quantize()`` runs (:mod:`.compat`).
:func:`quantize_model` runs the same on an in-memory transformers model (the registry's
``gptq``/``awq`` methods with ``--backend gptqmodel``).
"""

from __future__ import annotations

from dataclasses import replace
import os
import re
from typing import List, Mapping, Optional

from ..core.checkpoint import AFPQConfigDict
from ..core.constants import SCALE_DTYPES
from ..core.errors import MethodUnavailable
from ..core.formats import get_format, resolve_mode
from ..core.spec import QuantSpec
from .processors import CLIP_MODES

__all__ = ["QuantizeConfig", "GPTQModel", "quantize_model", "run_gptq", "run_awq", "supported_model_type",
           "ENGINE"]

ENGINE = "gptqmodel 7.6"


def QuantizeConfig(*, fmt: Optional[str] = None, mode: Optional[str] = None, scale_dtype: str = "float16",
                   scale_search=None, layout: Optional[str] = None, clip: str = "symmetric",
                   layer_specs: Optional[Mapping[str, QuantSpec]] = None, **kwargs):
    """gptqmodel's ``QuantizeConfig(**kwargs)``; with ``fmt`` it carries an AFPQ grid.

    The AFPQ settings ride on the config as ``.afpq`` (a :class:`~afpq_plugins.core.spec.QuantSpec`
    with the config's group size) and ``.afpq_clip``. ``bits`` defaults to the format's (and
    must equal it); ``sym`` is decided by the grid. ``method="awq"`` for GPTQModel's AWQ
    (``clip``: ``symmetric``, ``two-sided`` or ``engine``).

    ``layer_specs``: ``{module name: QuantSpec}`` (full names in the transformers model, as
    ``model.named_modules()``), modules with their own format, group size and mode (a bits
    budget); the layout, scale dtype and scale search are the config's. They ride as
    ``.afpq_layer_specs``; for GPTQ each one's bits and group size also become a gptqmodel
    ``dynamic`` override (an exact-name pattern), which gives GPTQ its group size.
    """
    from gptqmodel import QuantizeConfig as Upstream

    if fmt is None:
        return Upstream(**kwargs)
    f = get_format(fmt)
    bits = kwargs.setdefault("bits", f.bits)
    if bits != f.bits:
        raise ValueError(f"QuantizeConfig: format {f.name!r} has {f.bits} bits, but bits={bits}")
    if scale_dtype not in SCALE_DTYPES:
        raise ValueError(f"QuantizeConfig: scale_dtype must be one of {', '.join(SCALE_DTYPES)}")
    if clip not in CLIP_MODES:
        raise ValueError(f"QuantizeConfig: clip must be one of {', '.join(CLIP_MODES)}, got {clip!r}")
    if str(kwargs.get("method", "gptq")).lower().endswith("gptq"):
        # gptqmodel's group-aware reordering is off unless asked for (as in the optimum adapter): the
        # same GPTQ as the other engines, and whole-row groups (-1) allowed
        kwargs.setdefault("act_group_aware", False)
    # off unless asked for: quantize_model runs on an in-memory model. With offload_to_disk=True the
    # save reads each tensor from GPTQModel's offload folder or the source (.offload_io)
    kwargs.setdefault("offload_to_disk", False)
    sym = bool(kwargs.pop("sym", False))
    layer_specs = dict(layer_specs or {})
    if layer_specs and str(kwargs.get("method", "gptq")).lower().endswith("gptq"):
        kwargs["dynamic"] = {**_dynamic_overrides(layer_specs, f.bits, kwargs.get("group_size", 128)),
                             **(kwargs.get("dynamic") or {})}
    cfg = Upstream(sym=True, **kwargs)
    cfg.afpq = QuantSpec(f, cfg.group_size, resolve_mode(f, mode, sym=sym), scale_dtype, layout, ("lm_head",),
                         scale_search)
    cfg.afpq_clip = clip
    cfg.afpq_layer_specs = layer_specs
    return cfg


def _dynamic_overrides(layer_specs: Mapping[str, QuantSpec], bits: int, group_size: int) -> dict:
    """gptqmodel ``dynamic`` entries (exact full names) for the modules whose bits or group size differ."""
    return {f"+:^{re.escape(n)}$": {"bits": s.bits, "group_size": s.group_size}
            for n, s in layer_specs.items() if (s.bits, s.group_size) != (bits, group_size)}


def _checked_layer_specs(model, spec: QuantSpec, layer_specs: Mapping[str, QuantSpec], method: str) -> dict:
    """``layer_specs`` with their layout fixed for ``method``, each checked against its Linear in
    ``model`` (errors name the module)."""
    from torch import nn

    modules = dict(model.named_modules())
    out = {}
    for name, s in layer_specs.items():
        lin = modules.get(name)
        if not isinstance(lin, nn.Linear):
            raise ValueError(f"per-module settings for {name!r}: the model has no Linear of that name")
        s = s.resolved(method)
        if (s.layout, s.scale_dtype, s.scale_search) != (spec.layout, spec.scale_dtype, spec.scale_search):
            raise ValueError(f"{name}: per-module settings may change format, group size and mode only (layout "
                             f"{s.layout}, scale dtype {s.scale_dtype} and scale search are the run's: {spec.layout}, "
                             f"{spec.scale_dtype})")
        s.layer(lin.in_features, lin.out_features, name, layout=s.layout)  # group size, packing: named errors
        out[name] = s
    return out


def supported_model_type(model) -> Optional[str]:
    """None when GPTQModel 7.6 knows ``model``'s type, else a one-line reason."""
    from gptqmodel.models.auto import MODEL_MAP

    mt = getattr(model.config, "model_type", None)
    if mt in MODEL_MAP:
        return None
    return (f"model type {mt!r} is not supported by GPTQModel 7.6 (--backend gptqmodel); "
            "its list is gptqmodel.models.auto.SUPPORTED_MODELS")


def _method_name(cfg) -> str:
    return str(getattr(cfg.method, "value", cfg.method)).lower()


def _run(qmodel, spec: QuantSpec, cfg, quantize, *args, **kwargs):
    """``quantize(*args, **kwargs)`` (gptqmodel's, on ``qmodel``) with the AFPQ classes swapped in;
    returns the checkpoint config."""
    from .._engine_env import check
    from .compat import afpq_processors
    from .processors import awq_processor_class, gptq_processor_class
    from .quantizer import gptq_class

    check()  # a GPTQMODEL_CPU_WORKERS gptqmodel cannot run with: named here, not as a pool error
    method = _method_name(cfg)
    if method not in ("gptq", "awq"):
        raise ValueError(f"AFPQ through GPTQModel supports method gptq or awq, got {method!r}")
    if spec.group_size != cfg.group_size:
        spec = replace(spec, group_size=cfg.group_size)
    spec = spec.resolved(method)
    clip = getattr(cfg, "afpq_clip", "symmetric")
    layer_specs = _checked_layer_specs(qmodel.model, spec, getattr(cfg, "afpq_layer_specs", None) or {}, method)
    if method == "gptq":
        proc = gptq_processor_class(spec, layer_specs)
        ctx = afpq_processors(gptq_processor=proc, gptq_cls=gptq_class(spec, layer_specs))
    else:
        from .awq_search import fix_mlp_input_norm

        fix_mlp_input_norm(qmodel)
        proc = awq_processor_class(spec, clip, layer_specs)
        ctx = afpq_processors(awq_processor=proc)
    with ctx:
        quantize(*args, **kwargs)
    if proc.error is not None:  # recorded in gptqmodel's worker threads (processors._record)
        raise proc.error
    order = [n for n, _ in qmodel.model.named_modules()]
    names = sorted(set(proc.quantized_modules), key=order.index)
    if not names:
        raise RuntimeError("GPTQModel quantized no layer with the AFPQ grid (were the AFPQ processors used?)")
    left = [n for n in layer_specs if n not in names]
    if left:
        raise RuntimeError(f"GPTQModel did not quantize {', '.join(left[:3])}" + (f" (+{len(left) - 3} more)" if
                           len(left) > 3 else "") + ", which per-module settings were given for (GPTQModel "
                           "quantizes the Linears of its decoder-layer lists)")
    extra = {"quantizer": ENGINE, "true_sequential": bool(cfg.true_sequential)}
    if method == "gptq":
        extra["damp_percent"] = cfg.damp_percent
        extra["static_groups"] = bool(getattr(cfg, "static_groups", False))
    else:
        extra["awq"] = {"clip": clip, "upstream": ENGINE}
    qc = AFPQConfigDict.from_spec(spec, method, quantized_modules=names, desc_act=bool(cfg.desc_act), extra=extra,
                                  layer_specs=layer_specs)
    qmodel.model.config.quantization_config = qc.to_dict()
    qmodel._afpq_config = qc
    qmodel._afpq_mismatches = proc.mismatches
    return qc


def _save(qmodel, save_dir: str, tokenizer=None, overwrite: bool = True, **_ignored) -> str:
    from ..model import save_quantized

    qc = getattr(qmodel, "_afpq_config", None)
    if qc is None:
        raise ValueError("save: quantize() this AFPQ model first")
    if any(t.device.type == "meta" for t in qmodel.model.state_dict().values()):  # GPTQModel's layer offload
        from .offload_io import write_offloaded

        src = getattr(qmodel, "model_local_path", None)
        if not src or not os.path.isdir(src):
            raise ValueError("save: the model was quantized with offload_to_disk and its source folder "
                             f"({src!r}) is needed to write it")
        return write_offloaded(qmodel.model, save_dir, qc, src, tokenizer=tokenizer or qmodel.tokenizer,
                               overwrite=overwrite)[0]
    return save_quantized(qmodel.model, save_dir, qc, tokenizer=tokenizer or qmodel.tokenizer, overwrite=overwrite)


class GPTQModel:
    """``gptqmodel.GPTQModel`` for AFPQ configs and checkpoints; anything else goes to gptqmodel unchanged."""

    @staticmethod
    def load(model_id_or_path, quantize_config=None, **kwargs):
        from gptqmodel import GPTQModel as Upstream

        from ..model import is_afpq_checkpoint, load_quantized

        if isinstance(model_id_or_path, str) and is_afpq_checkpoint(model_id_or_path):
            return load_quantized(model_id_or_path, device=kwargs.get("device") or "cpu")
        spec = getattr(quantize_config, "afpq", None)
        qmodel = Upstream.load(model_id_or_path, quantize_config, **kwargs)
        if spec is not None:
            upstream_quantize = qmodel.quantize
            # instance attributes: this model object only
            qmodel.quantize = lambda *a, **k: _run(qmodel, spec, quantize_config, upstream_quantize, *a, **k)
            qmodel.save = lambda save_dir, **k: _save(qmodel, save_dir, **k)
        return qmodel

    from_pretrained = load


def quantize_model(model, tokenizer, spec, calib, method: str = "gptq", progress: bool = True,
                   desc_act: bool = False, static_groups: bool = False, true_sequential: bool = True,
                   damp_percent: Optional[float] = None, clip: str = "symmetric",
                   layer_specs: Optional[Mapping[str, QuantSpec]] = None) -> AFPQConfigDict:
    """GPTQModel's GPTQ or AWQ with ``spec``'s grid on the in-memory ``model`` (in place).

    ``spec``: a :class:`~afpq_plugins.core.spec.QuantSpec`; ``calib``: a resolved
    :class:`~afpq_plugins.methods.Calibration` (Austen windows). ``damp_percent=None``
    is gptqmodel's own default. ``layer_specs``: per-module settings (:func:`QuantizeConfig`;
    the registry's bits budget), written to the config's ``modules``.
    """
    from gptqmodel.models._const import normalize_device
    from gptqmodel.models.auto import MODEL_MAP

    why = supported_model_type(model)
    if why:
        raise MethodUnavailable(why)
    if tuple(spec.skip) != ("lm_head",):
        raise ValueError("--backend gptqmodel quantizes the decoder layers and keeps lm_head in float "
                         "(GPTQModel's layer lists); --skip is not supported")
    kw = dict(bits=spec.bits, group_size=spec.group_size, desc_act=desc_act,
              true_sequential=true_sequential, method=method)
    if method == "gptq":
        kw["static_groups"] = static_groups
        if damp_percent is not None:
            kw["damp_percent"] = damp_percent
    cfg = QuantizeConfig(fmt=spec.fmt, mode=spec.mode, scale_dtype=spec.scale_dtype, scale_search=spec.scale_search,
                         layout=spec.layout_for(method), clip=clip, layer_specs=layer_specs, **kw)
    cfg.device = normalize_device(str(next(model.parameters()).device.type))
    cfg.offload_to_disk = False
    qmodel = MODEL_MAP[model.config.model_type](model, quantized=False, quantize_config=cfg, tokenizer=tokenizer)
    rows: List[dict] = [{"input_ids": s.tolist(), "attention_mask": [1] * s.numel()} for s in calib.samples(tokenizer)]
    return _run(qmodel, cfg.afpq, cfg, qmodel.quantize, rows, tokenizer=tokenizer, batch_size=1)


def run_gptq(model, tokenizer, spec: QuantSpec, calib, progress: bool = True, **options) -> AFPQConfigDict:
    """The registry's ``gptq`` method with ``--backend gptqmodel`` (:func:`quantize_model`)."""
    return quantize_model(model, tokenizer, spec, calib, method="gptq", progress=progress, **options)


def run_awq(model, tokenizer, spec: QuantSpec, calib, progress: bool = True, **options) -> AFPQConfigDict:
    """The registry's ``awq`` method with ``--backend gptqmodel`` (:func:`quantize_model`)."""
    return quantize_model(model, tokenizer, spec, calib, method="awq", progress=progress, **options)
