"""The one AFPQ checkpoint format, its writer and its validation.

A checkpoint is a folder::

    config.json          the model's config plus "quantization_config" (below)
    model.safetensors    every tensor: AFPQ layers as <name>.qweight / .scales /
                         .scales_neg (afpq) or .zeros (zp) / .g_idx (gptq layout) /
                         .bias, plus the refusal placeholders <name>.weight and
                         <name>.qzeros (uint8, shape [1]; below); all other
                         parameters as in the float model
    (tokenizer and generation files, copied through)

``quantization_config`` (see :class:`AFPQConfigDict`)::

    {"quant_method": "afpq", "version": 1, "format": "nf3", "bits": 3,
     "group_size": 64, "mode": "afpq", "layout": "gptq", "desc_act": false,
     "scale_dtype": "float16", "method": "rtn",
     "modules_to_not_convert": ["lm_head"], "quantized_modules": [...],
     "table": [...]}            # the grid's code table, so custom formats reload

``quant_method: "afpq"`` alone does not stop stock loaders: transformers without the
plugin only warns "Unknown quantization type, got afpq" and builds the float model with
random quantized layers, and AutoGPTQ 0.7.1 ignores ``quant_method`` when it reads a hub
repository's ``config.json`` and loads the codes into INT ``QuantLinear`` layers. So each
quantized layer also stores two *refusal placeholders*, one-byte ``uint8`` tensors of
shape ``[1]`` under keys those loaders fill: ``<name>.weight`` (a float model's
``[out, in]`` weight) and ``<name>.qzeros`` (the packed zero-points of GPTQ/AWQ INT
layers). A loader that does not know the format hits a size mismatch and stops
(transformers 4.53 and 5.x raise ``RuntimeError`` unless ``ignore_mismatched_sizes=True``,
which then re-initialises those layers: the caller asked for it; accelerate, under
AutoGPTQ and AutoAWQ, raises ``ValueError``). Every AFPQ loader checks that a placeholder
is exactly that (a real tensor under either key is an error) and drops it; checkpoints
written before the placeholders existed load unchanged.

Saving is atomic (a temporary sibling folder renamed into place; an existing folder
is replaced only once the new one is complete) and deterministic (same input, same
bytes).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Mapping, Optional

import torch

from .formats import MODES, get_format, register_format
from .packing import LAYOUTS, packed_shape
from .quantize import group_count
from .safetensors_io import load_file, save_file

__all__ = [
    "QUANT_METHOD",
    "FORMAT_VERSION",
    "WEIGHTS_NAME",
    "AFPQConfigDict",
    "CheckpointError",
    "write_checkpoint",
    "read_quant_config",
    "load_checkpoint_tensors",
    "expected_layer_tensors",
    "second_param_name",
    "validate_layer_tensors",
    "PLACEHOLDER_SUFFIXES",
    "refusal_placeholder",
    "is_refusal_placeholder",
    "placeholder_keys",
    "quantized_module_names",
    "with_refusal_placeholders",
    "safetensors_metadata",
]

QUANT_METHOD = "afpq"
FORMAT_VERSION = 1
WEIGHTS_NAME = "model.safetensors"
_DTYPE_NAMES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


#: Per quantized layer, ``<name>.<suffix>`` holds :func:`refusal_placeholder` (see the module docstring).
PLACEHOLDER_SUFFIXES = ("weight", "qzeros")
_PLACEHOLDER_SHAPE = (1,)
_PLACEHOLDER_DTYPE = torch.uint8
_PLACEHOLDER_NOTE = (
    "<layer>.weight and <layer>.qzeros (uint8 [1]) of each quantized layer are placeholders that make "
    "loaders without AFPQ support fail with a size mismatch; load with `import afpq_plugins`"
)


class CheckpointError(ValueError):
    """A checkpoint is invalid; the message names the file, key or tensor."""


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
    quant_method: str = QUANT_METHOD
    version: int = FORMAT_VERSION
    extra: Dict[str, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.table is None:
            self.table = list(get_format(self.format).values)
        self.validate()

    # -- validation -----------------------------------------------------------------------
    def validate(self) -> None:
        if self.quant_method != QUANT_METHOD:
            raise CheckpointError(
                f"quantization_config.quant_method is {self.quant_method!r}, not {QUANT_METHOD!r}: "
                "this is not an AFPQ checkpoint"
            )
        if self.version != FORMAT_VERSION:
            raise CheckpointError(f"quantization_config.version {self.version!r} is not supported (expected {FORMAT_VERSION})")
        fmt = self.fmt  # raises on an unknown format
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
        if self.scale_dtype not in _DTYPE_NAMES:
            raise CheckpointError(f"quantization_config.scale_dtype {self.scale_dtype!r} is unknown")
        if not isinstance(self.group_size, int) or (self.group_size != -1 and self.group_size <= 0):
            raise CheckpointError(f"quantization_config.group_size must be -1 or positive, got {self.group_size!r}")

    @property
    def fmt(self):
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
    def torch_scale_dtype(self) -> torch.dtype:
        return _DTYPE_NAMES[self.scale_dtype]

    # -- (de)serialisation ----------------------------------------------------------------
    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(d.pop("extra"))
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
    qc: AFPQConfigDict, in_features: int, out_features: int, bias: bool
) -> Dict[str, tuple]:
    """``{suffix: (shape, dtype)}`` of one quantized layer's tensors."""
    groups = group_count(in_features, qc.group_size)
    sdt = qc.torch_scale_dtype
    exp = {
        "qweight": (packed_shape(qc.layout, qc.bits, out_features, in_features), torch.int32),
        "scales": ((groups, out_features), sdt),
    }
    second = second_param_name(qc.mode)
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
) -> None:
    """Raise :class:`CheckpointError` naming the tensor if any is missing or misshapen.

    ``<name>.weight`` and ``<name>.qzeros``, if present, must be refusal placeholders
    (older checkpoints have none)."""
    _check_placeholders(name, tensors, source)
    for suffix, (shape, dtype) in expected_layer_tensors(qc, in_features, out_features, bias).items():
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
    g_idx = tensors.get(f"{name}.g_idx")
    if g_idx is not None and g_idx.numel():
        groups = tensors[f"{name}.scales"].shape[0]
        if int(g_idx.min()) < 0 or int(g_idx.max()) >= groups:
            raise CheckpointError(f"{source}: tensor '{name}.g_idx' indexes groups outside 0..{groups - 1}")


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


# -- files ------------------------------------------------------------------------------------
def _json_bytes(obj) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8")


def write_checkpoint(
    out_dir: str,
    tensors: Mapping[str, torch.Tensor],
    model_config: Mapping,
    qc: AFPQConfigDict,
    extra_writer: Optional[Callable[[str], None]] = None,
    overwrite: bool = False,
) -> str:
    """Write a checkpoint folder atomically; returns its absolute path.

    ``extra_writer(tmp_dir)`` may add files (tokenizer, generation config) before the
    folder is moved into place. The refusal placeholders of each quantized layer are
    added to ``tensors``. An existing ``out_dir`` is an error unless
    ``overwrite``; it is replaced only after the new folder is complete.
    """
    out_dir = os.path.abspath(out_dir)
    tensors = with_refusal_placeholders(tensors, quantized_module_names(qc, tensors))
    if os.path.exists(out_dir) and not overwrite:
        if not os.path.isdir(out_dir) or os.listdir(out_dir):
            raise FileExistsError(f"{out_dir} already exists and is not empty; pass overwrite=True (CLI: --overwrite)")
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.tmp-", dir=parent)
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; a checkpoint is an ordinary folder
    try:
        config = dict(model_config)
        config["quantization_config"] = qc.to_dict()
        with open(os.path.join(tmp, "config.json"), "wb") as fh:
            fh.write(_json_bytes(config))
        save_file(tensors, os.path.join(tmp, WEIGHTS_NAME), metadata=safetensors_metadata())
        if extra_writer is not None:
            extra_writer(tmp)
        _move_into_place(tmp, out_dir, parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def safetensors_metadata() -> Dict[str, str]:
    """The ``__metadata__`` of an AFPQ ``model.safetensors``."""
    return {"format": "pt", "quant_method": QUANT_METHOD, "afpq_placeholder": _PLACEHOLDER_NOTE}


def _move_into_place(tmp: str, out_dir: str, parent: str) -> None:
    """Rename ``tmp`` to ``out_dir``; an existing ``out_dir`` is set aside first and
    restored if the final rename fails, then deleted."""
    if not os.path.lexists(out_dir):
        os.replace(tmp, out_dir)
        return
    old = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.old-", dir=parent)
    os.rmdir(old)
    os.replace(out_dir, old)
    try:
        os.replace(tmp, out_dir)
    except BaseException:
        os.replace(old, out_dir)
        raise
    if os.path.isdir(old) and not os.path.islink(old):
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.remove(old)


def read_quant_config(path: str) -> tuple:
    """(model config dict, :class:`AFPQConfigDict`) of a checkpoint folder."""
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise CheckpointError(f"{path}: no config.json")
    try:
        with open(cfg_path, encoding="utf-8") as fh:
            config = json.load(fh)
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{cfg_path}: not valid JSON ({exc})") from None
    qd = config.get("quantization_config")
    if qd is None:
        raise CheckpointError(f"{cfg_path}: no quantization_config: this is not a quantized checkpoint")
    return config, AFPQConfigDict.from_dict(qd, source=f"{cfg_path} quantization_config")


def load_checkpoint_tensors(path: str, device="cpu") -> Dict[str, torch.Tensor]:
    weights = os.path.join(path, WEIGHTS_NAME)
    if not os.path.isfile(weights):
        raise CheckpointError(f"{path}: no {WEIGHTS_NAME}")
    return load_file(weights, device=device)
