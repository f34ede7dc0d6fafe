"""``QuantSpec``: the one settings value carried whole from the CLI to the kernel.

A quantization run, a checkpoint and a quantized layer are described by the same few
settings: the grid (``fmt``), the group size, the mode, the packing layout, the storage
dtype of the group parameters, the scale search and the modules left in float. They are
validated once, when a :class:`QuantSpec` is built, and every rule that used to be
re-derived at each boundary is a member here:

* :meth:`QuantSpec.layer` -- the per-layer check (the group size divides the input width,
  the packing layout takes the shape) and the layer's geometry (:class:`LayerGeometry`);
  "group size -1 means whole rows" is written here and in :func:`effective_group_size`;
* :meth:`QuantSpec.layout_for` -- the layout a method writes (AWQ writes ``awq`` at 4 bits
  unless a layout was asked for; everything else ``gptq``);
* :attr:`QuantSpec.torch_scale_dtype`, :meth:`QuantSpec.search_dict`,
  :meth:`QuantSpec.checkpoint_keys` (the decoding keys of ``quantization_config``);
* :meth:`QuantSpec.skips` -- the ``modules_to_not_convert`` rule.

The checkpoint's :class:`~afpq_plugins.core.checkpoint.AFPQConfigDict` exposes its spec
(``qc.spec``) and is built from one (``AFPQConfigDict.from_spec``); ``AFPQLinear``, the
skeleton planner, the kernels' layer description and every adapter take it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Iterable, Optional, Tuple

import torch

from .constants import SCALE_DTYPES, scale_dtype, scale_dtype_name
from .formats import Format, get_format, resolve_mode
from .packing import LAYOUTS, packed_shape
from .search_registry import resolve_search, search_dict

__all__ = ["QuantSpec", "LayerGeometry", "effective_group_size", "group_count", "is_skipped", "DEFAULT_SKIP"]

#: Modules left in float by default (embeddings are not Linears and are never touched).
DEFAULT_SKIP: Tuple[str, ...] = ("lm_head",)


def effective_group_size(in_features: int, group_size: int) -> int:
    """The number of input columns per group: ``group_size``, or the whole row for -1."""
    return in_features if group_size == -1 else group_size


def group_count(in_features: int, group_size: int, name: str = "weight") -> int:
    """Groups per output column; ``ValueError`` naming ``name`` unless ``group_size`` is -1
    or a positive divisor of ``in_features``."""
    if group_size == -1:
        return 1
    if not isinstance(group_size, int) or group_size <= 0 or in_features % group_size:
        raise ValueError(
            f"{name}: group_size {group_size} must be -1 or a positive divisor of in_features {in_features}"
        )
    return in_features // group_size


def is_skipped(name: str, skip: Iterable[str]) -> bool:
    """The ``modules_to_not_convert`` rule: ``name`` is kept in float when an entry equals it,
    is a dotted prefix of it (a parent module) or its last dotted component(s)."""
    return any(name == s or name.startswith(s + ".") or name.endswith("." + s) for s in skip)


@dataclass(frozen=True)
class LayerGeometry:
    """One layer's shape under a spec, checked by :meth:`QuantSpec.layer` (the only place)."""

    name: str
    in_features: int
    out_features: int
    group_size: int  # effective: the whole row for -1
    groups: int
    qweight_shape: Tuple[int, int]
    layout: str


@dataclass(frozen=True)
class QuantSpec:
    """What a quantized model stores: grid, group size, mode, scale dtype, layout, float modules, scale search.

    Arguments are normalised once: ``fmt`` (a name or a :class:`Format`) becomes the
    registered name, ``mode=None`` the format's default, ``scale_dtype`` (a name or a
    torch dtype) its checkpoint name, ``scale_search`` (None, a name, a dict, a search
    object) the resolved search object (None for the paper's min/max scales). ``layout``
    ``None`` leaves the choice to the method (:meth:`layout_for`). Anything invalid is a
    ``ValueError`` naming the argument.
    """

    fmt: str = "nf4"
    group_size: int = 128
    mode: Optional[str] = None
    scale_dtype: str = "float16"
    layout: Optional[str] = None
    skip: Tuple[str, ...] = DEFAULT_SKIP
    scale_search: object = None
    _format: Format = field(default=None, init=False, repr=False, compare=False)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        f = get_format(self.fmt)
        set_ = object.__setattr__
        set_(self, "_format", f)
        set_(self, "fmt", f.name)
        set_(self, "mode", resolve_mode(f, self.mode))
        gs = self.group_size
        if isinstance(gs, bool) or not isinstance(gs, int) or (gs != -1 and gs <= 0):
            raise ValueError(f"group_size must be -1 (whole rows) or a positive integer, got {gs!r}")
        set_(self, "scale_dtype", scale_dtype_name(scale_dtype(self.scale_dtype)))
        if self.layout is not None and self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {', '.join(LAYOUTS)} (or None: the method's default), "
                             f"got {self.layout!r}")
        skip = (self.skip,) if isinstance(self.skip, str) else tuple(self.skip or ())
        if not all(isinstance(s, str) and s for s in skip):
            raise ValueError(f"skip must be module names, got {self.skip!r}")
        set_(self, "skip", skip)
        set_(self, "scale_search", resolve_search(self.scale_search))

    # -- derived values -------------------------------------------------------------------
    @property
    def format(self) -> Format:
        """The grid (resolved once)."""
        return self._format

    @property
    def bits(self) -> int:
        return self._format.bits

    @property
    def torch_scale_dtype(self) -> torch.dtype:
        return SCALE_DTYPES[self.scale_dtype]

    def layout_for(self, method: Optional[str] = None) -> str:
        """The layout ``method`` writes: the asked-for one, else ``awq`` for AWQ at 4 bits
        (AutoAWQ's GEMM layout), else ``gptq``."""
        if self.layout is not None:
            return self.layout
        return "awq" if method == "awq" and self.bits == 4 else "gptq"

    def resolved(self, method: Optional[str] = None) -> "QuantSpec":
        """This spec with its layout fixed for ``method`` (see :meth:`layout_for`)."""
        layout = self.layout_for(method)
        return self if layout == self.layout else replace(self, layout=layout)

    def effective_group_size(self, in_features: int) -> int:
        return effective_group_size(in_features, self.group_size)

    def groups(self, in_features: int, name: str = "weight") -> int:
        return group_count(in_features, self.group_size, name)

    def layer(self, in_features: int, out_features: int, name: str = "weight",
              layout: Optional[str] = None) -> LayerGeometry:
        """Check one layer against this spec (the one per-layer validation) and return its geometry.

        ``ValueError`` naming ``name`` when the group size does not divide ``in_features``
        or the packing layout cannot hold the shape."""
        layout = layout or self.layout_for()
        groups = group_count(in_features, self.group_size, name)
        try:
            qshape = packed_shape(layout, self.bits, out_features, in_features)
        except ValueError as exc:
            raise ValueError(f"{name}: {exc}") from None
        return LayerGeometry(name, in_features, out_features, effective_group_size(in_features, self.group_size),
                             groups, qshape, layout)

    def skips(self, name: str) -> bool:
        """True when module ``name`` stays in float (:func:`is_skipped` with :attr:`skip`)."""
        return is_skipped(name, self.skip)

    def search_dict(self) -> dict:
        """The scale search's JSON form (``{"method": "minmax"}`` for none)."""
        return search_dict(self.scale_search)

    def checkpoint_keys(self, method: Optional[str] = None) -> dict:
        """The ``quantization_config`` keys this spec decides (format, bits, group size, mode,
        layout, scale dtype, float modules); the checkpoint adds the rest
        (:meth:`AFPQConfigDict.from_spec <afpq_plugins.core.checkpoint.AFPQConfigDict.from_spec>`)."""
        return {"format": self.fmt, "bits": self.bits, "group_size": self.group_size, "mode": self.mode,
                "layout": self.layout_for(method), "scale_dtype": self.scale_dtype,
                "modules_to_not_convert": list(self.skip)}

    def describe(self) -> str:
        """``nf4/afpq g128`` (plan lines, progress bars)."""
        return f"{self.fmt}/{self.mode} g{self.group_size}"
