"""What the AFPQ llm-compressor modifiers share: their AFPQ fields, the INT proxy config
group those fields stand for, and installing the packed layers and the checkpoint config."""

from __future__ import annotations

from typing import Optional

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
    core's, on the AFPQ grid."""
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
    return data


def modifier_spec(modifier, layout: Optional[str] = None) -> QuantSpec:
    """A modifier's AFPQ fields (validated by :func:`afpq_fields`) as the one settings value;
    ``ignore`` is its skip list."""
    return QuantSpec(modifier.fmt, modifier.group_size, modifier.mode, modifier.scale_dtype, layout,
                     tuple(modifier.ignore or ()), modifier.scale_search)


def record_config(model: torch.nn.Module, qc: AFPQConfigDict) -> None:
    """Put the checkpoint config where :func:`afpq_plugins.llmcompressor.save` finds it."""
    if hasattr(model, "config"):
        model.config.quantization_config = qc.to_dict()
    model._afpq_config = qc
