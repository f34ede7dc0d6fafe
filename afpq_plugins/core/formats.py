"""One registry of quantization grids.

A :class:`Format` is a code table: ``values[c]`` is the grid value that code ``c``
decodes to, for ``c`` in ``0 .. 2**bits - 1``. Everything else (rounding
boundaries, the positive and negative extremes, the grid shifted for the
scale-plus-zero-point mode) is derived from it once, at registration.

Code conventions (shared with the packers and the kernels):

* ``fp4`` (E2M1) uses the standard nibble ``sign << 3 | magnitude index`` over the
  magnitudes {0, .5, 1, 1.5, 2, 3, 4, 6}: the same bits as NVFP4/MXFP4. Code 8 is
  -0; the encoder never emits it.
* ``fp3`` (E2M0) uses ``sign << 2 | magnitude index`` over {0, 1, 2, 4}.
* ``nf4``/``nf3`` and custom tables index their sorted values.
* ``int{2,3,4,8}`` are unsigned grids ``0 .. 2**bits - 1`` used with a scale and a
  zero-point (the AutoGPTQ convention).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch

__all__ = [
    "Format",
    "MODES",
    "register_format",
    "get_format",
    "list_formats",
    "resolve_mode",
]

#: The three ways to map a group onto a grid.
#: ``afpq``: two scales (s_pos for w >= 0, s_neg for w < 0), the paper's method.
#: ``sym``: one absmax scale.
#: ``zp``: one scale plus an integer zero-point on the grid shifted to be
#: non-negative (INT's native mode; for FP/NF it is the paper's Figure 5 baseline).
MODES = ("afpq", "sym", "zp")

_FP4_MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
_FP3_MAGNITUDES = (0.0, 1.0, 2.0, 4.0)

# The AFPQ paper's normal-float tables (sorted; index = code).
_NF4 = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)
_NF3 = (
    -1.0, -0.5350227355957031, -0.2469314038753510, 0.0,
    0.1833375245332718, 0.3819939494132996, 0.6229856610298157, 1.0,
)


def _sign_magnitude(magnitudes: Sequence[float]) -> Tuple[float, ...]:
    """Values of a sign-magnitude code: positives first, then the negated copy."""
    return tuple(magnitudes) + tuple(-m for m in magnitudes)


@dataclass(frozen=True)
class Format:
    """A quantization grid (code table) and the facts derived from it."""

    name: str
    bits: int
    kind: str  # "fp", "nf", "int" or "custom"
    values: Tuple[float, ...]
    default_mode: str
    # Derived at construction (see __post_init__).
    top_pos: float = field(init=False)
    top_neg: float = field(init=False)
    sorted_values: Tuple[float, ...] = field(init=False)
    sorted_codes: Tuple[int, ...] = field(init=False)
    uniform_int: bool = field(init=False)

    def __post_init__(self) -> None:
        n = 1 << self.bits
        if len(self.values) != n:
            raise ValueError(
                f"format {self.name!r}: a {self.bits}-bit table needs {n} values, got {len(self.values)}"
            )
        if any(not math.isfinite(v) for v in self.values):
            raise ValueError(f"format {self.name!r}: table values must be finite")
        if self.default_mode not in MODES:
            raise ValueError(f"format {self.name!r}: unknown default mode {self.default_mode!r}")
        # Distinct grid points, ascending; for duplicates (+0/-0) keep the lowest code.
        best: Dict[float, int] = {}
        for code, v in enumerate(self.values):
            v = float(v) + 0.0  # folds -0.0 into 0.0
            if v not in best:
                best[v] = code
        ordered = sorted(best)
        object.__setattr__(self, "sorted_values", tuple(ordered))
        object.__setattr__(self, "sorted_codes", tuple(best[v] for v in ordered))
        object.__setattr__(self, "top_pos", max(max(ordered), 0.0))
        object.__setattr__(self, "top_neg", max(-min(ordered), 0.0))
        object.__setattr__(
            self,
            "uniform_int",
            self.kind == "int" and list(self.values) == list(range(n)),
        )

    # -- facts the quantizer needs ---------------------------------------------------
    @property
    def range(self) -> float:
        """Width of the grid, max - min (the zp-mode scale divides by it)."""
        return self.sorted_values[-1] - self.sorted_values[0]

    def supports(self, mode: str) -> bool:
        if mode == "zp":
            return self.range > 0
        if self.kind == "int":
            return False  # the unsigned INT grid has no negative side
        both_sides = self.top_pos > 0 and self.top_neg > 0
        if mode == "afpq":
            return both_sides and 0.0 in self.sorted_values
        return both_sides  # sym

    def check_mode(self, mode: str) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
        if not self.supports(mode):
            hint = " (INT grids use mode 'zp')" if self.kind == "int" else ""
            if self.kind != "int":
                hint = " (needs a table with values of both signs, and 0 for 'afpq')"
            raise ValueError(f"format {self.name!r} does not support mode {mode!r}{hint}")

    # -- tensors (cached per device and dtype) -------------------------------------------
    def lut(self, mode: str, device=None, dtype=torch.float32) -> torch.Tensor:
        """Decode table: value of each code (zp mode: the grid shifted to start at 0)."""
        vals = self.values
        if mode == "zp":
            lo = self.sorted_values[0]
            vals = tuple(v - lo for v in vals)
        return _cached_tensor(vals, device, dtype)

    def thresholds(self, mode: str, device=None) -> torch.Tensor:
        """Rounding thresholds between consecutive grid values, float32, ascending.

        ``y`` rounds above threshold ``t`` exactly when ``y > t``. Each ``t`` is the
        exact (float64) midpoint ``m`` moved to the float32 that decides every float32
        input correctly: the largest float32 <= ``m`` where ties round down (positive
        midpoints, and all of mode ``zp``), the largest float32 < ``m`` where ties
        round up (negative midpoints in modes ``afpq``/``sym``: toward zero).
        """
        key = (self.values, mode, "thresholds")
        vals = _THRESHOLDS.get(key)
        if vals is None:
            s = self._sorted(mode)
            vals = []
            down = torch.tensor(float("-inf"))
            for a, b in zip(s[:-1], s[1:]):
                m = (a + b) / 2.0
                t = torch.tensor(m, dtype=torch.float32)
                if float(t) > m or (float(t) == m and m < 0 and mode != "zp"):
                    t = torch.nextafter(t, down)
                vals.append(float(t))
            vals = _THRESHOLDS[key] = tuple(vals)
        return _cached_tensor(vals, device, torch.float32)

    def sorted_grid(self, mode: str, device=None) -> torch.Tensor:
        return _cached_tensor(self._sorted(mode), device, torch.float32)

    def code_of_sorted(self, device=None) -> torch.Tensor:
        return _cached_tensor(self.sorted_codes, device, torch.uint8)

    def _sorted(self, mode: str) -> Tuple[float, ...]:
        if mode == "zp":
            lo = self.sorted_values[0]
            return tuple(v - lo for v in self.sorted_values)
        return self.sorted_values

    def encoder(self, mode: str, device=None) -> Optional["BinnedEncoder"]:
        """Tables for the fast nearest-value encoder (None: use bucketize)."""
        key = (self.values, self.bits, mode, str(torch.device(device) if device is not None else "cpu"))
        if key not in _ENCODER_CACHE:
            _ENCODER_CACHE[key] = BinnedEncoder.build(self, mode, device)
        return _ENCODER_CACHE[key]

    def to_dict(self) -> dict:
        return {"name": self.name, "bits": self.bits, "kind": self.kind, "values": list(self.values)}


_TENSOR_CACHE: Dict[tuple, torch.Tensor] = {}
_ENCODER_CACHE: Dict[tuple, Optional["BinnedEncoder"]] = {}
_THRESHOLDS: Dict[tuple, Tuple[float, ...]] = {}


@dataclass(frozen=True)
class BinnedEncoder:
    """Nearest-grid-value lookup in O(1) per element, exact.

    The grid's span is cut into ``nb`` equal bins with the same float32 arithmetic
    used at run time (``k = int(clamp((y - lo) * rate, 0, nb - 1))``), which is
    monotone in ``y``, so each rounding threshold ``t`` (:meth:`Format.thresholds`)
    lands in a known bin ``k_t``: values in bins below ``k_t`` are ``<= t``, values in
    bins above are ``> t``, and only bin ``k_t`` needs the comparison ``y > t``.
    ``nb`` grows until no bin holds two thresholds. The code is
    ``codes2[2 * k + (y > thresh[k])]``: the same answer as
    ``torch.bucketize(y, thresholds)``, in O(1) per element.
    """

    lo: float
    rate: float
    nb: int
    codes2: torch.Tensor  # uint8 [2 * nb]: (code below, code above) the bin's midpoint
    thresh: torch.Tensor  # float32 [nb]: the bin's midpoint threshold (+inf if none)
    values2: torch.Tensor  # float32 [2 * nb]: the grid values of codes2 (the mode's decode table)

    MAX_BINS = 1 << 16

    @staticmethod
    def bin_of(y: torch.Tensor, lo: float, rate: float, nb: int) -> torch.Tensor:
        return (y - lo).mul_(rate).clamp_(0, nb - 1).to(torch.int32)

    @classmethod
    def build(cls, fmt: "Format", mode: str, device=None) -> Optional["BinnedEncoder"]:
        grid = fmt._sorted(mode)
        codes = fmt.sorted_codes
        mids = fmt.thresholds(mode).clone()
        lo = float(grid[0])
        nb = 16
        while nb <= cls.MAX_BINS:
            rate = float(torch.tensor(nb / (grid[-1] - grid[0]), dtype=torch.float32))
            k_m = cls.bin_of(mids.clone(), lo, rate, nb).tolist()
            if len(set(k_m)) == len(k_m):
                break
            nb *= 2
        else:
            return None
        codes2 = [0] * (2 * nb)
        thresh = [float("inf")] * nb
        below = 0  # thresholds in earlier bins = sorted index of the bin's lower value
        j = 0
        for k in range(nb):
            codes2[2 * k] = codes2[2 * k + 1] = codes[below]
            if j < len(k_m) and k_m[j] == k:
                thresh[k] = float(mids[j])
                codes2[2 * k + 1] = codes[below + 1]
                below += 1
                j += 1
        dev = torch.device(device) if device is not None else None
        lut = fmt.lut(mode)
        return cls(
            lo=lo,
            rate=rate,
            nb=nb,
            codes2=torch.tensor(codes2, dtype=torch.uint8, device=dev),
            thresh=torch.tensor(thresh, dtype=torch.float32, device=dev),
            values2=torch.tensor([float(lut[c]) for c in codes2], dtype=torch.float32, device=dev),
        )

    def _slot(self, y: torch.Tensor) -> torch.Tensor:
        """Flat index ``2k + (y > thresh[k])`` into ``codes2`` / ``values2``."""
        k = self.bin_of(y, self.lo, self.rate, self.nb).reshape(-1)
        above = y.reshape(-1) > torch.index_select(self.thresh, 0, k)
        return k.mul_(2).add_(above)

    def __call__(self, y: torch.Tensor) -> torch.Tensor:
        """Codes (uint8, same shape) of float32 ``y``, already divided by its scale."""
        # codes2[2k] is the code below bin k's midpoint, codes2[2k + 1] the code above.
        return torch.index_select(self.codes2, 0, self._slot(y)).reshape(y.shape)

    def values(self, y: torch.Tensor) -> torch.Tensor:
        """The grid values (float32, the mode's decode table) of ``y``'s codes, without the codes."""
        return torch.index_select(self.values2, 0, self._slot(y)).reshape(y.shape)


def _cached_tensor(vals: Tuple, device, dtype) -> torch.Tensor:
    device = torch.device(device) if device is not None else torch.device("cpu")
    key = (vals, str(device), dtype)
    t = _TENSOR_CACHE.get(key)
    if t is None:
        t = torch.tensor(vals, dtype=dtype, device=device)
        _TENSOR_CACHE[key] = t
    return t


_REGISTRY: Dict[str, Format] = {}


def register_format(
    name: str,
    values: Iterable[float],
    *,
    bits: int | None = None,
    kind: str = "custom",
    default_mode: str | None = None,
    overwrite: bool = False,
) -> Format:
    """Register a grid under ``name``.

    ``values`` is the code table (``2**bits`` values). A custom table must be
    sorted ascending (code = index). Registering the same table twice is a no-op;
    a different table under a taken name needs ``overwrite=True``.
    """
    if not isinstance(name, str) or not name:
        raise ValueError("format name must be a non-empty string")
    name = name.lower()  # names are case-insensitive, as in get_format
    vals = tuple(float(v) for v in values)
    if bits is None:
        bits = max(len(vals).bit_length() - 1, 0)
        if len(vals) != 1 << bits:
            raise ValueError(
                f"format {name!r}: table length {len(vals)} is not a power of two"
            )
    if not 1 <= bits <= 8:
        raise ValueError(f"format {name!r}: bits must be in 1..8, got {bits}")
    if kind == "custom" and list(vals) != sorted(vals):
        raise ValueError(f"format {name!r}: a custom table must be sorted ascending")
    if default_mode is None:
        default_mode = "zp" if kind == "int" else "afpq"
    fmt = Format(name=name, bits=bits, kind=kind, values=vals, default_mode=default_mode)
    old = _REGISTRY.get(name)
    if old is not None and old != fmt and not overwrite:
        raise ValueError(f"format {name!r} is already registered with a different table")
    _REGISTRY[name] = fmt
    return fmt


def get_format(fmt) -> Format:
    """Look a format up by name (a :class:`Format` passes through)."""
    if isinstance(fmt, Format):
        return fmt
    try:
        return _REGISTRY[str(fmt).lower()]
    except KeyError:
        raise ValueError(
            f"unknown format {fmt!r}; registered: {', '.join(list_formats())}"
        ) from None


def list_formats() -> List[str]:
    return sorted(_REGISTRY)


def resolve_mode(fmt, mode: str | None = None, sym: bool = False) -> str:
    """The mode to use: explicit ``mode``, else ``sym``, else the format's default."""
    f = get_format(fmt)
    if mode is None:
        mode = "sym" if sym else f.default_mode
    f.check_mode(mode)
    return mode


register_format("fp4", _sign_magnitude(_FP4_MAGNITUDES), bits=4, kind="fp")
register_format("fp3", _sign_magnitude(_FP3_MAGNITUDES), bits=3, kind="fp")
register_format("nf4", _NF4, bits=4, kind="nf")
register_format("nf3", _NF3, bits=3, kind="nf")
for _b in (2, 3, 4, 8):
    register_format(f"int{_b}", range(1 << _b), bits=_b, kind="int")
