"""What an AFPQ checkpoint must contain: the ``quantization_config`` schema
(:class:`AFPQConfigDict`, types and values checked), each quantized layer's tensors
(:func:`validate_layer_tensors`: names, shapes, dtypes, finite non-negative scales,
zero-points on the grid, ``g_idx`` in range) and the refusal placeholders.

The format is described in ``docs/format.md`` section 4; the folder I/O is in
:mod:`afpq_plugins.core.checkpoint`, which re-exports every name here.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Dict, List, Mapping, Optional

import torch

from .version import VERSION, check_writer_version
from .constants import FORMAT_VERSION, PLACEHOLDER_SUFFIXES, QUANT_METHOD, SCALE_DTYPES
from .errors import CheckpointError
from .formats import MODES, get_format, register_format
from .packing import LAYOUTS
from .spec import LayerGeometry, QuantSpec

__all__ = [
    "AFPQConfigDict",
    "CheckpointError",
    "expected_layer_tensors",
    "second_param_name",
    "validate_layer_tensors",
    "PLACEHOLDER_NOTE",
    "refusal_placeholder",
    "is_refusal_placeholder",
    "placeholder_keys",
    "quantized_module_names",
    "with_refusal_placeholders",
]

_PLACEHOLDER_SHAPE = (1,)
_PLACEHOLDER_DTYPE = torch.uint8
PLACEHOLDER_NOTE = (
    "<layer>.weight and <layer>.qzeros (uint8 [1]) of each quantized layer are placeholders that make "
    "loaders without AFPQ support fail with a size mismatch; load with `import afpq_plugins`"
)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return (_is_int(v) or isinstance(v, float)) and math.isfinite(v)


def _is_str_list(v) -> bool:
    return isinstance(v, (list, tuple)) and all(isinstance(x, str) and x for x in v)


#: key -> (check, what it must be); the JSON types of ``quantization_config``.
_KEY_TYPES = {
    "quant_method": (lambda v: isinstance(v, str), "a string"),
    "version": (_is_int, "an integer"),
    "format": (lambda v: isinstance(v, str) and bool(v), "a non-empty string"),
    "bits": (_is_int, "an integer"),
    "group_size": (_is_int, "an integer"),
    "mode": (lambda v: isinstance(v, str), "a string"),
    "layout": (lambda v: isinstance(v, str), "a string"),
    "desc_act": (lambda v: isinstance(v, bool), "true or false"),
    "scale_dtype": (lambda v: isinstance(v, str), "a string"),
    "method": (lambda v: isinstance(v, str), "a string"),
    "modules_to_not_convert": (_is_str_list, "a list of module names"),
    "quantized_modules": (_is_str_list, "a list of module names"),
    "table": (lambda v: v is None or (isinstance(v, (list, tuple)) and all(_is_number(x) for x in v)),
              "a list of finite numbers"),
    "modules": (lambda v: isinstance(v, dict) and all(isinstance(k, str) and k and isinstance(o, dict)
                                                      for k, o in v.items()),
                "an object mapping module names to objects of settings"),
}

#: The settings a ``modules`` entry may override for one layer (the rest are the top-level keys').
MODULE_KEYS = ("format", "bits", "group_size", "mode")


def _check_types(qc) -> None:
    for key, (ok, what) in _KEY_TYPES.items():
        v = getattr(qc, key)
        if not ok(v):
            raise CheckpointError(f"quantization_config.{key} must be {what}, got {v!r:.200}")
    dup = sorted({n for n in qc.quantized_modules if qc.quantized_modules.count(n) > 1})
    if dup:
        raise CheckpointError(f"quantization_config.quantized_modules names {dup[0]!r} more than once")
    if not isinstance(qc.extra, dict):
        raise CheckpointError(f"quantization_config extra keys must be a mapping, got {type(qc.extra).__name__}")


@dataclass
class AFPQConfigDict:
    """The ``quantization_config`` entry of an AFPQ checkpoint."""

    format: str
    bits: int
    group_size: int
    mode: str
    layout: str = "gptq"
    desc_act: bool = False
    scale_dtype: str = "float16"
    method: str = "rtn"
    modules_to_not_convert: List[str] = field(default_factory=lambda: ["lm_head"])
    quantized_modules: List[str] = field(default_factory=list)
    table: Optional[List[float]] = None
    modules: Dict[str, Dict[str, object]] = field(default_factory=dict)  # per-module overrides (MODULE_KEYS)
    quant_method: str = QUANT_METHOD
    version: int = FORMAT_VERSION
    extra: Dict[str, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_types(self)
        if self.table is None:
            self.table = list(get_format(self.format).values)
        self.validate()

    # -- validation -----------------------------------------------------------------------
    def validate(self) -> None:
        _check_types(self)
        if self.quant_method != QUANT_METHOD:
            raise CheckpointError(
                f"quantization_config.quant_method is {self.quant_method!r}, not {QUANT_METHOD!r}: "
                "this is not an AFPQ checkpoint"
            )
        if self.version != FORMAT_VERSION:
            raise CheckpointError(f"quantization_config.version {self.version!r} is not supported (expected {FORMAT_VERSION})")
        fmt = self._resolve_format()  # raises on an unknown format
        if self.bits != fmt.bits:
            raise CheckpointError(f"quantization_config.bits is {self.bits} but format {self.format!r} has {fmt.bits} bits")
        if self.mode not in MODES:
            raise CheckpointError(f"quantization_config.mode {self.mode!r} is unknown; expected one of {', '.join(MODES)}")
        try:
            fmt.check_mode(self.mode)
        except ValueError as exc:
            raise CheckpointError(f"quantization_config.mode: {exc}") from None
        if self.layout not in LAYOUTS:
            raise CheckpointError(f"quantization_config.layout {self.layout!r} is unknown; expected one of {', '.join(LAYOUTS)}")
        if self.scale_dtype not in SCALE_DTYPES:
            raise CheckpointError(f"quantization_config.scale_dtype {self.scale_dtype!r} is unknown")
        if not isinstance(self.group_size, int) or (self.group_size != -1 and self.group_size <= 0):
            raise CheckpointError(f"quantization_config.group_size must be -1 or positive, got {self.group_size!r}")
        self._check_modules()

    def _check_modules(self) -> None:
        """Every ``modules`` entry names a quantized module (when they are listed) and gives
        valid settings for it (MODULE_KEYS only; ``bits`` equal to its format's)."""
        listed = set(self.quantized_modules)
        for name, o in self.modules.items():
            where = f"quantization_config.modules[{name!r}]"
            if listed and name not in listed:
                raise CheckpointError(f"{where}: {name!r} is not in quantized_modules")
            bad = sorted(set(o) - set(MODULE_KEYS))
            if bad:
                raise CheckpointError(f"{where}: unknown key {bad[0]!r} (a module may set {', '.join(MODULE_KEYS)})")
            for key in ("format", "mode"):
                if key in o and not (isinstance(o[key], str) and o[key]):
                    raise CheckpointError(f"{where}.{key} must be a non-empty string, got {o[key]!r:.200}")
            for key in ("bits", "group_size"):
                if key in o and not _is_int(o[key]):
                    raise CheckpointError(f"{where}.{key} must be an integer, got {o[key]!r:.200}")
            try:
                spec = self._module_spec(name)
            except ValueError as exc:
                raise CheckpointError(f"{where}: {exc}") from None
            if "bits" in o and o["bits"] != spec.bits:
                raise CheckpointError(f"{where}.bits is {o['bits']} but format {spec.fmt!r} has {spec.bits} bits")
    def _resolve_format(self):
        """The grid of ``format``; a name the registry does not know is registered from
        ``table`` here, while the config is validated (an import-time-free, listed side
        effect: a checkpoint of a custom grid makes that grid available by name)."""
        try:
            fmt = get_format(self.format)
        except ValueError:
            if not self.table:
                raise CheckpointError(
                    f"quantization_config.format {self.format!r} is not a registered format and no table is given"
                ) from None
            return register_format(self.format, self.table)
        if self.table is not None and [float(v) for v in self.table] != list(fmt.values):
            raise CheckpointError(
                f"quantization_config.table does not match the registered format {self.format!r}"
            )
        return fmt

    @property
    def fmt(self):
        """The grid of ``format`` (registered, or registered from ``table`` by :meth:`validate`)."""
        return self._resolve_format()

    @property
    def torch_scale_dtype(self) -> torch.dtype:
        return SCALE_DTYPES[self.scale_dtype]

    @property
    def spec(self) -> QuantSpec:
        """The settings these keys describe, as the one settings value (layout fixed,
        ``modules_to_not_convert`` as its skip list, the recorded scale search)."""
        try:
            return QuantSpec(self.fmt, self.group_size, self.mode, self.scale_dtype, self.layout,
                             tuple(self.modules_to_not_convert), self.extra.get("scale_search"))
        except ValueError as exc:  # e.g. a malformed scale_search: the checkpoint's fault, named as such
            raise CheckpointError(f"quantization_config: {exc}") from None

    def spec_for(self, name: str) -> QuantSpec:
        """The settings of quantized module ``name``: :attr:`spec` with the module's ``modules``
        entry (format, group size, mode) applied; the layout, the scale dtype and the scale
        search are the checkpoint's."""
        if name not in self.modules:
            return self.spec
        return self._module_spec(name)

    def _module_spec(self, name: str) -> QuantSpec:
        o, base = self.modules[name], self.spec
        return replace(base, fmt=o.get("format", base.fmt), group_size=o.get("group_size", base.group_size),
                       mode=o.get("mode", base.mode if "format" not in o else None))

    @classmethod
    def from_spec(cls, spec: QuantSpec, method: str, quantized_modules=(), desc_act: bool = False,
                  extra: Optional[Mapping] = None, layer_specs: Optional[Mapping[str, QuantSpec]] = None,
                  **keys) -> "AFPQConfigDict":
        """The checkpoint config a run with ``spec`` produces: the spec's keys
        (:meth:`QuantSpec.checkpoint_keys`, layout as ``method`` writes it), the method, the
        quantized modules, ``scale_search`` (the spec's search) and ``extra`` keys.
        ``layer_specs``: per-module settings; those that differ from ``spec`` in format,
        group size or mode are written to ``modules`` (their layout, scale dtype and search
        must be ``spec``'s)."""
        ext = {"scale_search": spec.search_dict()}
        ext.update(extra or {})
        modules = {}
        for name, ls in (layer_specs or {}).items():
            if (ls.layout_for(method), ls.scale_dtype) != (spec.layout_for(method), spec.scale_dtype):
                raise ValueError(f"{name}: per-module settings may change format, group size and mode only "
                                 "(layout and scale dtype are the checkpoint's)")
            if (ls.fmt, ls.group_size, ls.mode) != (spec.fmt, spec.group_size, spec.mode):
                modules[name] = {"format": ls.fmt, "bits": ls.bits, "group_size": ls.group_size, "mode": ls.mode}
        return cls(**spec.checkpoint_keys(method), method=method, quantized_modules=list(quantized_modules),
                   desc_act=desc_act, extra=ext, modules=modules, **keys)

    # -- (de)serialisation ----------------------------------------------------------------
    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(d.pop("extra"))
        if not d["modules"]:  # uniform checkpoints keep exactly the keys they always had
            del d["modules"]
        d["afpq_version"] = VERSION  # the release that writes it (checked on load: check_writer_version)
        return d

    @classmethod
    def from_dict(cls, d: Mapping, source: str = "quantization_config") -> "AFPQConfigDict":
        if not isinstance(d, Mapping):
            raise CheckpointError(f"{source} is not a JSON object")
        method = d.get("quant_method")
        if method != QUANT_METHOD:
            raise CheckpointError(
                f"{source}: quant_method is {method!r}, not {QUANT_METHOD!r}; load it with the tool that wrote it"
            )
        check_writer_version(d.get("afpq_version"), source)
        missing = [k for k in ("format", "bits", "group_size", "mode") if k not in d]
        if missing:
            raise CheckpointError(f"{source}: missing key(s) {', '.join(missing)}")
        known = set(cls.__dataclass_fields__) - {"extra"}
        kwargs = {k: v for k, v in d.items() if k in known}
        extra = {k: v for k, v in d.items() if k not in known}
        try:
            return cls(**kwargs, extra=extra)
        except CheckpointError as exc:
            raise CheckpointError(f"{source}: {exc}") from None
        except ValueError as exc:  # unknown format and the like
            raise CheckpointError(f"{source}: {exc}") from None


# -- per-layer tensor contract -------------------------------------------------------------
def second_param_name(mode: str) -> Optional[str]:
    """Tensor holding a layer's second group parameter: ``scales_neg`` (afpq), ``zeros`` (zp), none (sym)."""
    return {"afpq": "scales_neg", "zp": "zeros", "sym": None}[mode]


def expected_layer_tensors(
    qc: AFPQConfigDict, in_features: int, out_features: int, bias: bool,
    geometry: Optional[LayerGeometry] = None, name: Optional[str] = None, spec: Optional[QuantSpec] = None,
) -> Dict[str, tuple]:
    """``{suffix: (shape, dtype)}`` of one quantized layer's tensors (``name``: the module, for
    its per-module settings, or its ``spec`` directly; ``geometry``: the layer's already-checked
    :class:`LayerGeometry`, else it is checked here)."""
    if spec is None:
        spec = qc.spec_for(name) if name is not None else qc.spec
    if geometry is None:
        geometry = spec.layer(in_features, out_features)
    groups = geometry.groups
    sdt = qc.torch_scale_dtype
    exp = {
        "qweight": (geometry.qweight_shape, torch.int32),
        "scales": ((groups, out_features), sdt),
    }
    second = second_param_name(spec.mode)
    if second:
        exp[second] = ((groups, out_features), sdt)
    if qc.layout == "gptq":
        exp["g_idx"] = ((in_features,), torch.int32)
    if bias:
        exp["bias"] = ((out_features,), None)  # bias keeps the model's dtype
    return exp


def validate_layer_tensors(
    name: str, tensors: Mapping[str, torch.Tensor], qc: AFPQConfigDict,
    in_features: int, out_features: int, bias: bool, source: str = "checkpoint",
    geometry: Optional[LayerGeometry] = None,
) -> None:
    """Raise :class:`CheckpointError` naming the tensor if any is missing or misshapen.

    ``<name>.weight`` and ``<name>.qzeros``, if present, must be refusal placeholders
    (older checkpoints have none)."""
    _check_placeholders(name, tensors, source)
    for suffix, (shape, dtype) in expected_layer_tensors(qc, in_features, out_features, bias, geometry, name).items():
        key = f"{name}.{suffix}"
        t = tensors.get(key)
        if t is None:
            raise CheckpointError(f"{source}: tensor {key!r} is missing")
        if tuple(t.shape) != tuple(shape):
            raise CheckpointError(f"{source}: tensor {key!r} has shape {tuple(t.shape)}, expected {tuple(shape)}")
        if dtype is not None and t.dtype != dtype:
            raise CheckpointError(f"{source}: tensor {key!r} has dtype {t.dtype}, expected {dtype}")
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise CheckpointError(f"{source}: tensor {key!r} holds NaN or Inf")
        if suffix in ("scales", "scales_neg") and t.device.type != "meta":
            _check_scales(key, t, qc, source)
        if suffix == "zeros" and t.device.type != "meta":
            _check_zeros(key, t, qc.spec_for(name).format, source)
    g_idx = tensors.get(f"{name}.g_idx")
    if g_idx is not None and g_idx.numel():
        groups = tensors[f"{name}.scales"].shape[0]
        if int(g_idx.min()) < 0 or int(g_idx.max()) >= groups:
            raise CheckpointError(f"{source}: tensor '{name}.g_idx' indexes groups outside 0..{groups - 1}")


def _check_scales(key: str, t: torch.Tensor, qc: AFPQConfigDict, source: str) -> None:
    """Scales are finite (checked by the caller) and never negative. Zero is allowed: the
    writers produce it where nothing decodes through the scale (mode ``afpq``: a side of a
    group without weights; ``sym``: an all-zero group), and a scale that underflows the
    storage dtype decodes its group to zero in any mode."""
    bad = t < 0
    if bool(bad.any()):
        g, o = (int(i) for i in bad.nonzero()[0])
        raise CheckpointError(
            f"{source}: tensor {key!r} must not be negative; group {g}, column {o} holds {float(t[g, o])!r}"
        )


def _check_zeros(key: str, t: torch.Tensor, fmt, source: str) -> None:
    """Zero-points are whole numbers on the shifted grid: ``0 <= z <= max - min`` of the table."""
    top = fmt.range
    bad = (t != torch.round(t)) | (t < 0) | (t > top)
    if bool(bad.any()):
        g, o = (int(i) for i in bad.nonzero()[0])
        raise CheckpointError(
            f"{source}: tensor {key!r} must hold whole numbers in 0..{top:g} (the grid of {fmt.name!r}); "
            f"group {g}, column {o} holds {float(t[g, o])!r}"
        )


# -- the refusal placeholders -----------------------------------------------------------------
def refusal_placeholder() -> torch.Tensor:
    """A fresh ``uint8`` tensor of shape ``[1]`` holding 0 (its own storage: savers that
    drop tensors sharing memory keep every copy)."""
    return torch.zeros(_PLACEHOLDER_SHAPE, dtype=_PLACEHOLDER_DTYPE)


def is_refusal_placeholder(shape, dtype) -> bool:
    return tuple(int(d) for d in shape) == _PLACEHOLDER_SHAPE and dtype == _PLACEHOLDER_DTYPE


def placeholder_keys(names) -> List[str]:
    """``<name>.weight`` and ``<name>.qzeros`` for each quantized module name."""
    return [f"{n}.{suffix}" for n in names for suffix in PLACEHOLDER_SUFFIXES]


def quantized_module_names(qc: "AFPQConfigDict", keys) -> List[str]:
    """The quantized layers: ``quantized_modules``, else every ``<name>`` with a ``<name>.qweight``."""
    return list(qc.quantized_modules) or sorted(k[: -len(".qweight")] for k in keys if k.endswith(".qweight"))


def with_refusal_placeholders(tensors: Mapping[str, torch.Tensor], names) -> Dict[str, torch.Tensor]:
    """``tensors`` plus the placeholders of each quantized layer in ``names`` (one already
    there is kept; a real tensor under a placeholder key is an error)."""
    out = dict(tensors)
    for key in placeholder_keys(names):
        t = out.get(key)
        if t is None:
            out[key] = refusal_placeholder()
        elif not is_refusal_placeholder(t.shape, t.dtype):
            raise CheckpointError(
                f"tensor {key!r} ({t.dtype}, shape {tuple(t.shape)}) belongs to a quantized layer, where "
                "that key is reserved for the uint8 [1] refusal placeholder"
            )
    return out


def _check_placeholders(name: str, tensors: Mapping[str, torch.Tensor], source: str) -> None:
    shape_of, dtype_of = getattr(tensors, "shape", None), getattr(tensors, "dtype", None)
    lazy = callable(shape_of) and callable(dtype_of)  # hf.validate.CheckpointTensors: no read
    for key in placeholder_keys([name]):
        if key not in tensors:
            continue  # written before the placeholders existed
        shape, dtype = (shape_of(key), dtype_of(key)) if lazy else (tuple(tensors[key].shape), tensors[key].dtype)
        if not is_refusal_placeholder(shape, dtype):
            raise CheckpointError(
                f"{source}: unexpected tensor {key!r} ({dtype}, shape {tuple(shape)}) in quantized layer {name!r} "
                f"(an AFPQ layer has no float weight or INT zero-points; only the uint8 [1] refusal placeholder "
                f"may use that key)"
            )
