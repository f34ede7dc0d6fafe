"""``AFPQQuantizeConfig``: AutoGPTQ's ``BaseQuantizeConfig`` with an AFPQ grid."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, fields, replace
from typing import Dict, Optional

from auto_gptq.modeling._base import BaseQuantizeConfig

from ..core.checkpoint import AFPQConfigDict, CheckpointError, QUANT_METHOD
from ..core.constants import SCALE_DTYPE_NAMES
from ..core.formats import get_format, resolve_mode
from ..core.search_registry import search_dict
from ..core.spec import QuantSpec

__all__ = ["AFPQQuantizeConfig", "GPTQ_EXTRA_KEYS"]

#: AutoGPTQ settings kept in the checkpoint's ``quantization_config`` next to the AFPQ
#: keys (they do not change how the tensors decode; they record how they were made).
GPTQ_EXTRA_KEYS = ("damp_percent", "static_groups", "true_sequential", "sym", "scale_search")


@dataclass
class AFPQQuantizeConfig(BaseQuantizeConfig):
    """GPTQ settings (every ``BaseQuantizeConfig`` field) plus the AFPQ grid.

    ``fmt``: a registered format (``fp4 fp3 nf4 nf3``, ``int3``/``int4`` or a custom
    one); its bit width must equal ``bits``. ``sym=True`` gives one absmax scale, the
    default two scales (AFPQ); ``mode`` (``afpq``/``sym``/``zp``) overrides both.
    ``scale_dtype`` is the storage dtype of the scales (GPTQ quantizes with the
    stored values, so the saved checkpoint decodes to exactly GPTQ's weights).
    ``scale_search``: ``None``/``"minmax"`` (the paper's scales), ``"mse"`` or a
    :class:`~afpq_plugins.core.quantize.ScaleSearch`: each group's scales are searched
    (per side for two scales) against the weights GPTQ has updated so far.
    ``layer_specs``: per-module settings, ``{module name as in model.named_modules():
    QuantSpec}`` (a bits budget's choice): each of those layers is quantized on its own
    format, group size and mode (its own bits); the layout, the scale dtype and the scale
    search stay this config's. ``bits``/``fmt``/``group_size`` are the checkpoint's
    top-level settings, used by every other layer.
    """

    sym: bool = field(default=False)
    fmt: str = field(default="nf4")
    mode: Optional[str] = field(default=None)
    scale_dtype: str = field(default="float16")
    scale_search: Optional[object] = field(default=None)
    layer_specs: Optional[Dict[str, QuantSpec]] = field(default=None)

    def __post_init__(self) -> None:
        super().__post_init__()
        f = get_format(self.fmt)
        self.fmt = f.name
        if f.bits != self.bits:
            raise ValueError(f"AFPQQuantizeConfig: format {f.name!r} has {f.bits} bits but bits={self.bits}")
        self.mode = resolve_mode(f, self.mode, sym=self.sym)
        if self.scale_dtype not in SCALE_DTYPE_NAMES:
            raise ValueError(f"AFPQQuantizeConfig: scale_dtype must be one of {', '.join(SCALE_DTYPE_NAMES)}")
        try:
            self.scale_search = search_dict(self.scale_search)  # JSON form, stored in the checkpoint
        except (TypeError, ValueError) as exc:
            raise ValueError(f"AFPQQuantizeConfig: scale_search: {exc}") from None
        self.layer_specs = self._own_specs(self.layer_specs)

    def _own_specs(self, layer_specs) -> Optional[Dict[str, QuantSpec]]:
        """``layer_specs`` as this config's spec with each module's format, group size and mode
        (anything else that differs is a ``ValueError`` naming the module)."""
        if not layer_specs:
            return None
        base, out = self.spec, {}
        for name, ls in layer_specs.items():
            if not isinstance(ls, QuantSpec):
                raise TypeError(f"AFPQQuantizeConfig: layer_specs[{name!r}] must be a QuantSpec, got {type(ls).__name__}")
            if (ls.layout_for("gptq"), ls.scale_dtype, ls.search_dict()) != ("gptq", base.scale_dtype, base.search_dict()):
                raise ValueError(f"AFPQQuantizeConfig: layer_specs[{name!r}] may change format, group size and mode "
                                 f"only (layout gptq, scale dtype {base.scale_dtype} and the scale search are the "
                                 "config's)")
            out[name] = replace(base, fmt=ls.fmt, group_size=ls.group_size, mode=ls.mode)
        return out

    @property
    def format(self):
        return get_format(self.fmt)

    @property
    def spec(self) -> QuantSpec:
        """These settings as the one settings value (AutoGPTQ writes the gptq layout)."""
        return QuantSpec(self.fmt, self.group_size, self.mode, self.scale_dtype, "gptq", ("lm_head",),
                         self.scale_search)

    @property
    def torch_scale_dtype(self):
        return self.spec.torch_scale_dtype

    # -- the checkpoint's quantization_config ------------------------------------------------
    def to_afpq(self, quantized_modules=(), modules_to_not_convert=("lm_head",)) -> AFPQConfigDict:
        """The checkpoint config (``layer_specs`` that differ from the top level go to ``modules``)."""
        return AFPQConfigDict.from_spec(
            replace(self.spec, skip=tuple(modules_to_not_convert)), "gptq", quantized_modules=list(quantized_modules),
            desc_act=bool(self.desc_act), extra={k: getattr(self, k) for k in GPTQ_EXTRA_KEYS},
            layer_specs=self.layer_specs,
        )

    @classmethod
    def from_afpq(cls, qc: AFPQConfigDict) -> "AFPQQuantizeConfig":
        names = {f.name for f in fields(cls)}
        kw = {k: v for k, v in qc.extra.items() if k in names}
        kw.setdefault("sym", qc.mode == "sym")
        kw["layer_specs"] = {n: qc.spec_for(n) for n in qc.modules} or None
        return cls(bits=qc.bits, group_size=qc.group_size, desc_act=qc.desc_act, fmt=qc.format,
                   mode=qc.mode, scale_dtype=qc.scale_dtype, **kw)

    def to_dict(self) -> dict:
        d = self.to_afpq().to_dict()
        d.pop("quantized_modules", None)
        d["model_name_or_path"] = self.model_name_or_path
        d["model_file_base_name"] = self.model_file_base_name
        return d

    # -- BaseQuantizeConfig's file contract ---------------------------------------------------
    def save_pretrained(self, save_dir: str, **kwargs) -> None:
        with open(os.path.join(save_dir, "quantize_config.json"), "w", encoding="utf-8") as fh:
            json.dump(self.to_dict(), fh, indent=2, sort_keys=True)

    @classmethod
    def from_pretrained(cls, save_dir: str, **kwargs) -> "AFPQQuantizeConfig":
        """Read ``quantize_config.json`` or ``config.json``'s ``quantization_config``
        (local folders only); anything but ``quant_method: "afpq"`` is an error."""
        for name, key in (("quantize_config.json", None), ("config.json", "quantization_config")):
            path = os.path.join(save_dir, name)
            if os.path.isfile(path):
                with open(path, encoding="utf-8") as fh:
                    d = json.load(fh)
                if key is not None:
                    d = d.get(key)
                    if d is None:
                        raise CheckpointError(f"{path}: no quantization_config")
                if d.get("quant_method") != QUANT_METHOD:
                    raise CheckpointError(
                        f"{path}: quant_method is {d.get('quant_method')!r}, not {QUANT_METHOD!r}; "
                        "use auto_gptq.BaseQuantizeConfig for stock GPTQ checkpoints"
                    )
                d = {k: v for k, v in d.items() if k not in ("model_name_or_path", "model_file_base_name")}
                cfg = cls.from_afpq(AFPQConfigDict.from_dict(d, source=path))
                cfg.model_name_or_path = save_dir
                return cfg
        raise CheckpointError(f"{save_dir}: no quantize_config.json or config.json")
