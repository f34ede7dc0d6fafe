"""What the AFPQ llm-compressor modifiers share: their AFPQ fields, the INT proxy config
group those fields stand for, and installing the packed layers and the checkpoint config."""

from __future__ import annotations

from dataclasses import replace
from typing import Dict, Optional

import torch

from ..core.checkpoint import AFPQConfigDict
from ..core.constants import SCALE_DTYPES
from ..core.formats import get_format, resolve_mode
from ..core.search_registry import search_dict
from ..core.spec import QuantSpec


def afpq_fields(data, owner: str):
    """Check a modifier's ``fmt`` / ``group_size`` / ``mode`` / ``scale_dtype`` / ``scale_search``
    (``mode`` resolved, ``scale_search`` as its dict) and replace ``targets`` with the one config
    group they stand for: an INT proxy of the same bits and groups. The proxy only drives
    llm-compressor's bookkeeping (which modules are targeted, their groups); every rounding is
    core's, on the AFPQ grid.

    ``layer_specs`` (``{module name: QuantSpec or {"fmt", "group_size", "mode"}}``, a bits
    budget's per-module settings) is checked and kept as plain dicts; each of those modules gets a
    config group of its own proxy, targeted by its exact name (compressed-tensors prefers an exact
    name to a class name, so it overrides the ``targets`` group for that module)."""
    if not isinstance(data, dict):
        return data
    data = dict(data)
    try:
        f = get_format(data.get("fmt", "nf4"))
    except (KeyError, ValueError) as e:
        raise ValueError(f"{owner}: fmt: {e}") from None
    gs = int(data.get("group_size", 128))
    if gs == 0 or gs < -1:
        raise ValueError(f"{owner}: group_size must be positive or -1 (whole rows), got {gs}")
    if data.get("scale_dtype", "float16") not in SCALE_DTYPES:
        raise ValueError(f"{owner}: scale_dtype must be one of {', '.join(SCALE_DTYPES)}, "
                         f"got {data.get('scale_dtype')!r}")
    try:
        data["mode"] = resolve_mode(f, data.get("mode"))
    except (KeyError, ValueError) as e:
        raise ValueError(f"{owner}: mode: {e}") from None
    data["scale_search"] = search_dict(data.get("scale_search"))
    if data.get("config_groups") or data.get("scheme"):
        raise ValueError(f"{owner} builds its own config group from fmt and group_size; "
                         "pass targets/ignore, not config_groups or scheme")
    weights = {"num_bits": f.bits, "type": "int", "symmetric": False, "strategy": "group" if gs > 0 else "channel"}
    if gs > 0:
        weights["group_size"] = gs
    data["config_groups"] = {"afpq": {"targets": data.pop("targets", ["Linear"]), "weights": weights}}
    own = {}
    for name, o in (data.get("layer_specs") or {}).items():
        if isinstance(o, QuantSpec):
            o = {"fmt": o.fmt, "group_size": o.group_size, "mode": o.mode}
        try:
            lf = get_format(o["fmt"])
            own[name] = {"fmt": lf.name, "group_size": int(o["group_size"]), "mode": resolve_mode(lf, o.get("mode"))}
        except (KeyError, ValueError, TypeError) as e:
            raise ValueError(f"{owner}: layer_specs[{name!r}]: {e}") from None
        if own[name]["group_size"] == 0 or own[name]["group_size"] < -1:
            raise ValueError(f"{owner}: layer_specs[{name!r}]: group_size must be positive or -1")
    data["layer_specs"] = own or None
    proxies = {}
    for name, o in own.items():
        proxies.setdefault((get_format(o["fmt"]).bits, o["group_size"]), []).append(name)
    for i, ((bits, g), names) in enumerate(sorted(proxies.items())):
        w = {**weights, "num_bits": bits, "strategy": "group" if g > 0 else "channel"}
        w.pop("group_size", None)
        if g > 0:
            w["group_size"] = g
        data["config_groups"][f"afpq_modules_{i}"] = {"targets": names, "weights": w}
    return data


def modifier_spec(modifier, layout: Optional[str] = None) -> QuantSpec:
    """A modifier's AFPQ fields (validated by :func:`afpq_fields`) as the one settings value;
    ``ignore`` is its skip list."""
    return QuantSpec(modifier.fmt, modifier.group_size, modifier.mode, modifier.scale_dtype, layout,
                     tuple(modifier.ignore or ()), modifier.scale_search)


def module_spec(modifier, name: str, layout: Optional[str] = None) -> QuantSpec:
    """Module ``name``'s settings: its ``layer_specs`` entry (format, group size, mode) applied to
    :func:`modifier_spec` (the layout, scale dtype and scale search are the modifier's)."""
    base = modifier_spec(modifier, layout)
    o = (modifier.layer_specs or {}).get(name)
    return base if o is None else replace(base, fmt=o["fmt"], group_size=o["group_size"], mode=o["mode"])


def module_specs(modifier, names, layout: Optional[str] = None) -> Dict[str, QuantSpec]:
    """``{name: module_spec}`` of the ``names`` that have settings of their own (the config's ``modules``)."""
    return {n: module_spec(modifier, n, layout) for n in names if n in (modifier.layer_specs or {})}


def record_config(model: torch.nn.Module, qc: AFPQConfigDict) -> None:
    """Put the checkpoint config where :func:`afpq_plugins.llmcompressor.save` finds it."""
    if hasattr(model, "config"):
        model.config.quantization_config = qc.to_dict()
    model._afpq_config = qc
