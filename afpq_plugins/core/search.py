"""Searches beyond the paper's min/max choice: group scales (weight error) and AWQ-style clipping.

* **Scale searches** pick each group's parameters. ``None``/``"minmax"`` is the paper's
  choice; ``"mse"`` (:class:`ScaleSearch`) shrinks the min/max scales and keeps, per
  group, the factor with the smallest weight error. Names map to implementations in one
  place, :mod:`afpq_plugins.core.search_registry` (``register_search`` adds one;
  ``resolve_search`` turns a name, a dict or an object into a search).
  A search object has ``params(x, fmt, mode, dim) -> (p1, p2)`` (unrounded parameters,
  reducing over ``dim``) and ``to_dict()``; :func:`~afpq_plugins.core.quantize.find_params`
  calls it, so every quantize path (RTN, GPTQ's column quantizer, AWQ) gets it.
* **Clip searches** (used by the AWQ adapters): given a layer's weight and calibration
  inputs, choose per group how far to clip before quantizing, scoring each candidate by
  the squared error of the group's partial output over the calibration tokens (AutoAWQ's
  score). :func:`symmetric_clip` is AutoAWQ 0.2.9's ``[-max, max]`` search computed with
  matmuls; :func:`two_sided_clip` shrinks the positive and negative extremes
  independently. Both take the fake-quantizer to score with (default:
  :func:`group_fake_quantizer`), so an adapter can pass its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import torch

from .quantize import fake_quantize_rows, scan_scales
from .search_registry import register_search

__all__ = [
    "ScaleSearch", "group_fake_quantizer", "clip_score", "symmetric_clip", "two_sided_clip", "apply_two_sided_clip",
]


# -- scale searches -------------------------------------------------------------------------------
@dataclass(frozen=True)
class ScaleSearch:
    """Opt-in search of the group scales, beyond the paper's min/max choice.

    Each candidate shrinks the min/max scale by a factor from 1 down to
    ``min_shrink`` (``grid`` steps); per group, the factor with the smallest
    ``sum |w - w_hat| ** norm`` wins. In mode ``afpq`` the two sides are searched
    independently: a positive weight is quantized with s_pos only and a negative one
    with s_neg only, so the group's error is the sum of two one-scale errors and the
    best pair costs ``2 * grid`` evaluations, not ``grid ** 2``. Mode ``sym`` shrinks
    its one scale, mode ``zp`` shrinks both ends of the range (GPTQ's ``mse`` search).
    """

    grid: int = 20
    min_shrink: float = 0.5
    norm: float = 2.0

    def __post_init__(self) -> None:
        if self.grid < 1 or not 0.0 < self.min_shrink <= 1.0 or self.norm <= 0:
            raise ValueError(f"invalid ScaleSearch({self.grid}, {self.min_shrink}, {self.norm})")

    @classmethod
    def gptq_mse(cls, grid: int = 100, maxshrink: float = 0.8, norm: float = 2.4) -> "ScaleSearch":
        """GPTQ's own ``mse`` candidates (shrink ``1 - i / grid`` for ``i < maxshrink * grid``)."""
        steps = max(1, int(maxshrink * grid))
        return cls(grid=steps, min_shrink=1.0 - (steps - 1) / grid, norm=norm)

    def factors(self) -> list:
        if self.grid == 1:
            return [1.0]
        step = (1.0 - self.min_shrink) / (self.grid - 1)
        return [1.0 - i * step for i in range(self.grid)]

    def to_dict(self) -> dict:
        return {"method": "mse", "grid": self.grid, "min_shrink": self.min_shrink, "norm": self.norm}

    def params(self, x: torch.Tensor, f, mode: str, dim: int = -1) -> Tuple[torch.Tensor, torch.Tensor]:
        """Searched ``(p1, p2)`` of float32 ``x`` reducing over ``dim`` (unrounded)."""
        pos = (x > 0).float() if mode == "afpq" else None

        def side_errors(e: torch.Tensor):
            err = e.abs_().pow_(self.norm)
            if pos is None:
                s = err.sum(dim=dim, keepdim=True)
                return s, s
            # separable: each side depends on its own scale only
            return (err * pos).sum(dim=dim, keepdim=True), (err * (1.0 - pos)).sum(dim=dim, keepdim=True)

        return scan_scales(x, f, mode, self.factors(), side_errors, dim)


register_search("mse", lambda kw: ScaleSearch(**kw))


# -- clip searches ----------------------------------------------------------------------------------
def group_fake_quantizer(fmt, mode: Optional[str] = None, scale_dtype: torch.dtype = torch.float16,
                         search=None, name: str = "weight") -> Callable[[torch.Tensor], torch.Tensor]:
    """``fq(t)``: fake-quantize ``t`` with one group per last-dim row (parameters rounded to
    ``scale_dtype``), the quantizer AWQ's searches score candidates with."""
    def fq(t: torch.Tensor) -> torch.Tensor:
        return fake_quantize_rows(t, fmt, t.shape[-1], mode, scale_dtype, search, name)[0]

    return fq


def clip_score(w: torch.Tensor, input_feat: torch.Tensor, group_size: int, n_sample_token: int = 512):
    """``(gs, ng, embed, inner)``: AutoAWQ's clip score as bilinear forms.

    The score of ``d = Q(w') - w`` (``[rows, ng, gs]``) is the mean over the subsampled
    calibration tokens (every ``tokens // n_sample_token``-th, as AutoAWQ) of the squared
    error of each group's partial output, ``inner(embed(d), embed(d))`` ``[rows, ng]``.
    Exact, with matmuls instead of AutoAWQ's broadcast products: ``a^T H b`` with
    ``H = X_g^T X_g / n`` when ``gs <= n`` (cheaper), else ``mean((X_g a)(X_g b))``.
    """
    out_f, in_f = w.shape
    gs = group_size if group_size > 0 else in_f
    ng = in_f // gs
    x = input_feat.reshape(-1, in_f)
    x = x[:: max(1, x.shape[0] // n_sample_token)].to(w.device, torch.float32)
    n = x.shape[0]
    xg = x.view(n, ng, gs).transpose(0, 1)  # [ng, n, gs]
    if gs <= n:
        H = xg.transpose(1, 2) @ xg / n  # [ng, gs, gs]

        def embed(d):
            return d, (d.transpose(0, 1) @ H).transpose(0, 1)

        def inner(ea, eb):
            return (ea[0] * eb[1]).sum(-1)
    else:
        def embed(d):
            return xg @ d.permute(1, 2, 0)  # [ng, n, rows]

        def inner(ea, eb):
            return (ea * eb).mean(1).t()
    return gs, ng, embed, inner


@torch.no_grad()
def symmetric_clip(
    w: torch.Tensor, input_feat: torch.Tensor, quantize: Callable[[torch.Tensor], torch.Tensor], group_size: int,
    n_grid: int = 20, max_shrink: float = 0.5, n_sample_token: int = 512, row_batch: int = 512,
) -> torch.Tensor:
    """AutoAWQ 0.2.9's clip search (``_compute_best_clip``), computed with matmuls.

    Candidates ``max_val = absmax * (1 - i / n_grid)``, ``i < max_shrink * n_grid``;
    ``w' = clamp(w, -max_val, max_val)`` fake-quantized by ``quantize`` (on
    ``[rows, groups, group_size]``); the first minimum of :func:`clip_score` wins.
    Returns ``max_val`` ``[out, groups, 1]`` (AutoAWQ's ``apply_clip`` input).
    """
    out_f, in_f = w.shape
    gs, ng, embed, inner = clip_score(w, input_feat, group_size, n_sample_token)
    res = []
    for r0 in range(0, out_f, row_batch):
        wg = w[r0 : r0 + row_batch].reshape(-1, ng, gs)
        org = wg.abs().amax(-1, keepdim=True)
        best, best_err = org.clone(), None
        for i in range(int(max_shrink * n_grid)):
            mv = org * (1 - i / n_grid)
            e = embed((quantize(torch.clamp(wg, -mv, mv)) - wg).float())
            err = inner(e, e).unsqueeze(-1)
            if best_err is None:
                best_err = err
                continue
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best = torch.where(better, mv, best)
        res.append(best)
    return torch.cat(res)


@torch.no_grad()
def two_sided_clip(
    w: torch.Tensor, input_feat: torch.Tensor, quantize: Callable[[torch.Tensor], torch.Tensor], group_size: int,
    separable: bool, n_grid: int = 20, max_shrink: float = 0.5, n_sample_token: int = 512, row_batch: int = 512,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-group clip bounds ``(lo, hi)``, each ``[out, groups, 1]``.

    Candidates: ``hi = max(w, 0) * (1 - i / n_grid)``, ``lo = min(w, 0) * (1 - j / n_grid)``
    for ``i, j < max_shrink * n_grid`` (AutoAWQ's grid, on each side independently),
    scored by :func:`clip_score`. ``separable=True`` is valid for two-scale (``afpq``)
    quantizers only: there the positive weights depend only on ``hi`` and the negative
    only on ``lo``, so ``d = d_pos(i) + d_neg(j)`` and
    ``err(i, j) = P(i) + N(j) + 2 d_pos(i)^T H d_neg(j)``: the whole grid costs 2n
    quantizations. Otherwise every pair is quantized. Ties keep the least clipping.
    """
    out_f, in_f = w.shape
    gs, ng, embed, inner = clip_score(w, input_feat, group_size, n_sample_token)
    shrink = [1 - i / n_grid for i in range(int(max_shrink * n_grid))]
    k = len(shrink)
    los, his = [], []
    for r0 in range(0, out_f, row_batch):
        wg = w[r0 : r0 + row_batch].float().reshape(-1, ng, gs)
        pos = wg.amax(-1, keepdim=True).clamp(min=0)
        neg = wg.amin(-1, keepdim=True).clamp(max=0)
        if separable:
            e_pos = [embed((quantize(torch.minimum(wg, pos * r)) - wg) * (wg > 0)) for r in shrink]
            e_neg = [embed((quantize(torch.maximum(wg, neg * r)) - wg) * (wg < 0)) for r in shrink]
            p_err = [inner(e, e) for e in e_pos]
            n_err = [inner(e, e) for e in e_neg]
            err = torch.stack([
                torch.stack([p_err[i] + n_err[j] + 2 * inner(e_pos[i], e_neg[j]) for j in range(k)])
                for i in range(k)
            ])  # [i, j, rows, ng]
        else:
            def err_of(d):
                e = embed(d)
                return inner(e, e)

            err = torch.stack([
                torch.stack([err_of(quantize(wg.clamp(neg * rj, pos * ri)) - wg) for rj in shrink])
                for ri in shrink
            ])
        best = err.reshape(k * k, *err.shape[2:]).argmin(0)  # first minimum: least clipping
        sv = torch.tensor(shrink, device=w.device)
        his.append(pos * sv[best // k].unsqueeze(-1))
        los.append(neg * sv[best % k].unsqueeze(-1))
    return torch.cat(los), torch.cat(his)


def apply_two_sided_clip(w: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """``w`` clamped group by group to ``[lo, hi]`` (``[out, groups, 1]`` each), ``w``'s dtype."""
    wg = w.reshape(w.shape[0], lo.shape[1], -1)
    return torch.maximum(torch.minimum(wg, hi.to(w.dtype)), lo.to(w.dtype)).reshape(w.shape)
