"""Quantization maths: group parameters, encode, decode, fake-quant.

Everything here is torch only, works on any device, takes fp32/fp16/bf16 input and
computes in float32. The element-wise primitives (:func:`find_params`,
:func:`encode`, :func:`decode`) broadcast over any leading dimensions, so the
adapters can call them on GPTQ's column slices or AWQ's 4-D clip-search tensors;
:func:`quantize_weight` / :func:`dequantize_weight` work on whole ``[out, in]``
weights split into groups of ``group_size`` input columns.

Parameters per group, as a pair ``(p1, p2)``:

=========  ==============================  ===============================
mode       p1                              p2
=========  ==============================  ===============================
``afpq``   s_pos = max(w, 0) / top_pos     s_neg = -min(w, 0) / top_neg
``sym``    s = max(s_pos, s_neg)           (same tensor as p1)
``zp``     s = (xmax - xmin) / range       z = round(-xmin / s)
=========  ==============================  ===============================

Decoding: ``afpq``: ``v * (s_pos if v > 0 else s_neg)``; ``sym``: ``v * s``;
``zp``: ``(v - z) * s`` with ``v`` from the grid shifted to start at 0.

Encoding rounds to the nearest grid value, exactly, by locating each value among the
midpoints between grid values (:class:`~afpq_plugins.core.formats.BinnedEncoder`,
O(1) per element; no distance matrix). Ties go to the grid value nearer zero in
``afpq``/``sym`` modes and to the lower value in ``zp`` mode; uniform INT grids use
``clamp(round(w / s) + z)`` exactly as AutoGPTQ does. A zero scale (a group with no
weight on that side) never divides: the weights it covers are all zero and encode to
the code of 0, so no NaN or Inf can come out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from .formats import Format, get_format, resolve_mode
from .search_registry import resolve_search
from .spec import effective_group_size, group_count

__all__ = [
    "QuantizedWeight",
    "check_finite",
    "find_params",
    "scan_scales",
    "round_params",
    "encode",
    "decode",
    "decode_table",
    "fake_quantize_groups",
    "fake_quantize",
    "fake_quantize_rows",
    "quantize_weight",
    "dequantize_weight",
    "default_g_idx",
]


def check_finite(x: torch.Tensor, name: str = "tensor") -> None:
    """Raise ``ValueError`` naming ``name`` if ``x`` holds NaN or Inf.

    A finite float32 sum proves every element finite (a NaN or an Inf makes the sum NaN or
    Inf), in one vectorised pass (~15x faster than ``isfinite(x).all()`` on a float32
    weight); only a sum that is not finite (a bad value, or finite values overflowing
    float32) takes the element-wise check."""
    if x.is_floating_point() and x.numel() and bool(torch.isfinite(x.sum(dtype=torch.float32))):
        return
    if not torch.isfinite(x).all():
        bad = (~torch.isfinite(x)).sum().item()
        raise ValueError(f"{name}: {bad} non-finite value(s) (NaN or Inf) in the input; cannot quantize")


def _safe(s: torch.Tensor) -> torch.Tensor:
    return torch.where(s == 0, torch.ones_like(s), s)


def _minmax(x: torch.Tensor, dim: int) -> Tuple[torch.Tensor, torch.Tensor]:
    return x.amax(dim=dim, keepdim=True).clamp(min=0), x.amin(dim=dim, keepdim=True).clamp(max=0)


def _params_from_range(f: Format, mode: str, xmax: torch.Tensor, xmin: torch.Tensor):
    if mode == "afpq":
        return xmax / f.top_pos, (0.0 - xmin) / f.top_neg  # 0.0 - x: never -0.0
    if mode == "sym":
        s = torch.maximum(xmax / f.top_pos, -xmin / f.top_neg)
        return s, s
    # zp: AutoGPTQ's convention, including its all-zero-group fallback to [-1, 1].
    empty = (xmin == 0) & (xmax == 0)
    xmin = torch.where(empty, -torch.ones_like(xmin), xmin)
    xmax = torch.where(empty, torch.ones_like(xmax), xmax)
    s = (xmax - xmin) / f.range
    z = torch.round(-xmin / s)
    return s, z


def find_params(
    x: torch.Tensor, fmt, mode: Optional[str] = None, dim: int = -1, search=None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-group parameters of ``x``, reducing over ``dim`` (kept, size 1).

    ``search`` (``None``, a name such as ``"mse"``, or a search object; see
    :mod:`afpq_plugins.core.search`) opts into a scale search; the default is the
    paper's min/max scales.
    """
    f = get_format(fmt)
    mode = resolve_mode(f, mode)
    x = x.float()
    search = resolve_search(search)
    if search is None:
        xmax, xmin = _minmax(x, dim)
        return _params_from_range(f, mode, xmax, xmin)
    return search.params(x, f, mode, dim)


def scan_scales(
    x: torch.Tensor, f: Format, mode: str, factors, side_errors, dim: int = -1,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The separable per-side scan every scale search runs: ``(p1, p2)`` of float32 ``x``.

    Each factor ``a`` shrinks the min/max range to ``a * [xmin, xmax]``; ``side_errors(e)``
    scores the candidate's error ``e = x - fake_quant(x)`` as ``(e1, e2)`` (reduced over
    ``dim``, kept). In mode ``afpq`` the two sides are independent (a positive weight is
    decoded with s_pos only, a negative one with s_neg only), so each side keeps its own
    best factor: ``2 * len(factors)`` evaluations instead of ``len(factors) ** 2``. In
    modes ``sym`` and ``zp`` the pair moves together, chosen by ``e1``. The first factor
    wins ties (strictly smaller errors replace it).
    """
    xmax, xmin = _minmax(x, dim)
    best1 = best2 = err1 = err2 = None
    for a in factors:
        p1, p2 = _params_from_range(f, mode, xmax * a, xmin * a)
        e1, e2 = side_errors(x - fake_quantize_groups(x, f, mode, p1, p2, torch.float32))
        if best1 is None:
            best1, best2, err1, err2 = p1, p2, e1, e2
            continue
        take1 = e1 < err1
        best1, err1 = torch.where(take1, p1, best1), torch.where(take1, e1, err1)
        if mode == "afpq":
            take2 = e2 < err2
            best2, err2 = torch.where(take2, p2, best2), torch.where(take2, e2, err2)
        else:  # sym / zp: the pair moves together
            best2 = torch.where(take1, p2, best2)
    return best1, best2


def round_params(
    p1: torch.Tensor, p2: torch.Tensor, mode: str, dtype: torch.dtype = torch.float16, name: str = "tensor"
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Round parameters to their storage dtype (and back to float32).

    Quantizing with the stored values makes the fake-quantized weight equal to what
    a saved checkpoint decodes to. An overflow of the storage dtype is an error.
    """
    out = []
    for p in (p1, p2):
        q = p.to(dtype)
        if not torch.isfinite(q).all():
            raise ValueError(
                f"{name}: a quantization scale overflows {dtype} (max |scale| {p.abs().max().item():.3g}); "
                "store scales in float32 or bfloat16"
            )
        out.append(q.float())
    if mode == "sym":
        out[1] = out[0]
    return out[0], out[1]


def _scaled(x: torch.Tensor, mode: str, p1: torch.Tensor, p2: torch.Tensor) -> torch.Tensor:
    """``x`` divided by its scale (and shifted by the zero-point in zp mode), float32."""
    x = x.float()
    if mode == "afpq":
        # Two scales: w >= 0 uses s_pos, w < 0 uses s_neg (true divisions, so w / s is
        # correctly rounded; one of the two terms is always exactly zero).
        y = x.clamp(min=0) / _safe(p1)
        return y.addcdiv_(x.clamp(max=0), _safe(p2))
    y = x / _safe(p1)
    return y.add_(p2) if mode == "zp" else y


def encode(x: torch.Tensor, fmt, mode: Optional[str], p1: torch.Tensor, p2: torch.Tensor) -> torch.Tensor:
    """Codes (``uint8``) of ``x`` given broadcastable group parameters."""
    f = get_format(fmt)
    mode = resolve_mode(f, mode)
    if mode == "zp" and f.uniform_int:
        q = torch.round(x.float() / _safe(p1)) + p2  # AutoGPTQ's order of operations
        return q.clamp_(0, (1 << f.bits) - 1).to(torch.uint8)
    y = _scaled(x, mode, p1, p2)
    enc = f.encoder(mode, y.device)
    if enc is not None:
        return enc(y)
    idx = torch.bucketize(y, f.thresholds(mode, y.device))  # number of thresholds t < y
    return f.code_of_sorted(y.device)[idx]


def decode(
    codes: torch.Tensor, fmt, mode: Optional[str], p1: torch.Tensor, p2: torch.Tensor,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Values of ``codes`` given broadcastable group parameters."""
    f = get_format(fmt)
    mode = resolve_mode(f, mode)
    lut = f.lut(mode, codes.device)
    v = torch.index_select(lut, 0, codes.reshape(-1).to(torch.int32)).reshape(codes.shape)
    return _apply_params(v, mode, p1, p2, dtype)


def fake_quantize_groups(
    x: torch.Tensor, fmt, mode: Optional[str], p1: torch.Tensor, p2: torch.Tensor,
    dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """``decode(encode(x, ...), ...)`` in fewer passes (no codes materialised).

    The hot call of AWQ's scale/clip search and of the scale search: the binned
    encoder returns each value's grid value directly. Same result bit for bit.
    """
    f = get_format(fmt)
    mode = resolve_mode(f, mode)
    dtype = x.dtype if dtype is None else dtype
    if not (mode == "zp" and f.uniform_int):
        enc = f.encoder(mode, x.device)
        if enc is not None:
            return _apply_params(enc.values(_scaled(x, mode, p1, p2)), mode, p1, p2, dtype)
    return decode(encode(x, f, mode, p1, p2), f, mode, p1, p2, dtype)


def _apply_params(v: torch.Tensor, mode: str, p1: torch.Tensor, p2: torch.Tensor, dtype: torch.dtype):
    """Grid values ``v`` (the mode's decode table) times their group parameters."""
    p1 = p1.float()
    # Out-of-place first ops: the parameters may broadcast to a larger shape.
    if mode == "sym":
        out = v * p1
    elif mode == "afpq":
        # v > 0 -> v * s_pos, v < 0 -> v * s_neg, v == 0 -> 0.
        out = (v.clamp(min=0) * p1).addcmul_(v.clamp_(max=0), p2.float())
    else:
        out = (v - p2.float()).mul_(p1)
    return out.to(dtype)


def decode_table(fmt, mode: Optional[str], p1: torch.Tensor, p2: torch.Tensor,
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Decoded value of every code for each parameter pair: ``p1.shape + (2**bits,)``.

    Lets hot loops decode with one lookup per weight (GPTQ's column loop, the torch kernel).
    """
    f = get_format(fmt)
    codes = torch.arange(1 << f.bits, dtype=torch.int32, device=p1.device)
    return decode(codes, f, mode, p1.unsqueeze(-1), p2.unsqueeze(-1), dtype)


def default_g_idx(in_features: int, group_size: int, device=None) -> torch.Tensor:
    gs = effective_group_size(in_features, group_size)
    return torch.arange(in_features, device=device, dtype=torch.int32) // gs


@dataclass
class QuantizedWeight:
    """A quantized ``[out, in]`` weight: codes plus per-group parameters.

    ``scales`` and ``scales2`` are ``[groups, out]`` in the storage dtype;
    ``scales2`` holds s_neg (``afpq``), the zero-points (``zp``) or is ``None``
    (``sym``). ``g_idx[i]`` is the group of input column ``i``.
    """

    codes: torch.Tensor
    scales: torch.Tensor
    scales2: Optional[torch.Tensor]
    g_idx: torch.Tensor
    fmt: Format
    mode: str
    group_size: int

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_weight(self.codes, self.scales, self.scales2, self.g_idx, self.fmt, self.mode, dtype)


_CHUNK = 1 << 18


def _grouped(w: torch.Tensor, group_size: int) -> torch.Tensor:
    out_f, in_f = w.shape
    gs = effective_group_size(in_f, group_size)
    return w.reshape(out_f, in_f // gs, gs)


def _check_weight(w: torch.Tensor, group_size: int, name: str, groups: Optional[int] = None) -> int:
    """Check ``w`` and return its group count (``groups``: already checked by the caller)."""
    if w.dim() != 2:
        raise ValueError(f"{name}: expected a 2-D [out, in] weight, got shape {tuple(w.shape)}")
    if not w.is_floating_point():
        raise ValueError(f"{name}: expected a floating-point weight, got {w.dtype}")
    check_finite(w, name)
    return groups if groups is not None else group_count(w.shape[1], group_size, name)


def _rtn_chunks(w: torch.Tensor, f: Format, group_size: int, mode: str, scale_dtype: torch.dtype, name: str,
                search=None):
    """Yield ``(row slice, grouped float32 weights, p1, p2)`` over row chunks of ``w``.

    Chunks of about a quarter million weights keep every element-wise pass in cache.
    """
    out_f, in_f = w.shape
    step = max(1, _CHUNK // in_f)
    for r in range(0, out_f, step):
        rows = slice(r, min(r + step, out_f))
        wg = _grouped(w[rows].float(), group_size)
        p1, p2 = round_params(*find_params(wg, f, mode, search=search), mode=mode, dtype=scale_dtype, name=name)
        yield rows, wg, p1, p2


def quantize_weight(
    w: torch.Tensor,
    fmt,
    group_size: int = -1,
    mode: Optional[str] = None,
    scale_dtype: torch.dtype = torch.float16,
    name: str = "weight",
    search=None,
    groups: Optional[int] = None,
) -> QuantizedWeight:
    """Round-to-nearest quantization of a 2-D ``[out, in]`` weight, group by group.

    ``search`` opts into the scale search (:class:`~afpq_plugins.core.search.ScaleSearch`);
    default min/max. ``groups``: the group count when the caller checked the layer already
    (:meth:`QuantSpec.layer <afpq_plugins.core.spec.QuantSpec.layer>`).
    """
    f = get_format(fmt)
    mode = resolve_mode(f, mode)
    groups = _check_weight(w, group_size, name, groups)
    out_f, in_f = w.shape
    codes = torch.empty(out_f, in_f, dtype=torch.uint8, device=w.device)
    p1s = torch.empty(out_f, groups, dtype=torch.float32, device=w.device)
    p2s = torch.empty_like(p1s)
    for rows, wg, p1, p2 in _rtn_chunks(w, f, group_size, mode, scale_dtype, name, search):
        codes[rows] = encode(wg, f, mode, p1, p2).reshape(-1, in_f)
        p1s[rows] = p1.squeeze(-1)
        p2s[rows] = p2.squeeze(-1)
    scales = p1s.t().contiguous().to(scale_dtype)
    scales2 = None if mode == "sym" else p2s.t().contiguous().to(scale_dtype)
    return QuantizedWeight(codes, scales, scales2, default_g_idx(in_f, group_size, w.device), f, mode, group_size)


def fake_quantize(
    w: torch.Tensor,
    fmt,
    group_size: int = -1,
    mode: Optional[str] = None,
    scale_dtype: torch.dtype = torch.float16,
    name: str = "weight",
    search=None,
) -> torch.Tensor:
    """Quantize-dequantize ``w`` (same shape and dtype as the input).

    Equal to ``quantize_weight(...).dequantize(w.dtype)``, computed chunk by chunk.
    """
    f = get_format(fmt)
    mode = resolve_mode(f, mode)
    _check_weight(w, group_size, name)
    out = torch.empty_like(w)
    for rows, wg, p1, p2 in _rtn_chunks(w, f, group_size, mode, scale_dtype, name, search):
        out[rows] = fake_quantize_groups(wg, f, mode, p1, p2, w.dtype).reshape(-1, w.shape[1])
    return out


def fake_quantize_rows(w: torch.Tensor, fmt, group_size: int = -1, mode: Optional[str] = None,
                       scale_dtype: torch.dtype = torch.float16, search=None, name: str = "weight"):
    """AWQ's ``pseudo_quantize_tensor`` contract on a grid: ``(w_hat, p1, p2)``.

    ``w`` has any leading dims; its last dim is split into groups of ``group_size``
    (``<= 0``: the whole last dim). ``w_hat`` has ``w``'s shape and dtype; ``p1`` / ``p2``
    are ``[w.shape[0], groups per leading row]``, float32 holding storage-dtype values:
    s_pos / s_neg (``afpq``), s / s (``sym``), s / zero (``zp``).
    """
    f = get_format(fmt)
    mode = resolve_mode(f, mode)
    shape = w.shape
    gs = group_size if group_size > 0 else shape[-1]
    if shape[-1] % gs:
        raise ValueError(f"{name}: last dim {shape[-1]} is not a multiple of group_size {gs}")
    wg = w.reshape(-1, gs)
    check_finite(wg, name)
    p1, p2 = round_params(*find_params(wg, f, mode, search=search), mode=mode, dtype=scale_dtype, name=name)
    w_hat = fake_quantize_groups(wg, f, mode, p1, p2, dtype=w.dtype)
    return w_hat.reshape(shape), p1.view(shape[0], -1), p2.view(shape[0], -1)


def _is_default_g_idx(g_idx: torch.Tensor, groups: int) -> bool:
    in_f = g_idx.numel()
    if in_f % groups:
        return False
    return bool(torch.equal(g_idx.to(torch.int64), torch.arange(in_f, device=g_idx.device) // (in_f // groups)))


def dequantize_weight(
    codes: torch.Tensor,
    scales: torch.Tensor,
    scales2: Optional[torch.Tensor],
    g_idx: Optional[torch.Tensor],
    fmt,
    mode: str,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Decode ``[out, in]`` codes with ``[groups, out]`` parameters and ``g_idx``."""
    f = get_format(fmt)
    out_f, in_f = codes.shape
    groups = scales.shape[0]
    p2 = scales if scales2 is None else scales2
    if g_idx is None or _is_default_g_idx(g_idx, groups):
        gs = in_f // groups
        c = codes.reshape(out_f, groups, gs)
        w = decode(c, f, mode, scales.t().unsqueeze(-1), p2.t().unsqueeze(-1), dtype)
        return w.reshape(out_f, in_f)
    gi = g_idx.long()
    return decode(codes, f, mode, scales[gi].t(), p2[gi].t(), dtype)

