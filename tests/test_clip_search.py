"""Core's clip searches (``afpq_plugins.core.search``), without AutoAWQ, against a float64
brute force: every candidate (or candidate pair) clipped, quantized and scored directly as
the mean squared error of each group's partial output over the calibration tokens."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from afpq_plugins.core.search import (
    ScaleSearch, apply_two_sided_clip, group_fake_quantizer, symmetric_clip, two_sided_clip,
)
from afpq_plugins.core.search_registry import SEARCHES, register_search, resolve_search

N_GRID, MAX_SHRINK = 20, 0.5
K = int(N_GRID * MAX_SHRINK)


def _data(seed=0, rows=12, in_f=64, tokens=96):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, in_f, generator=g) * 0.02
    w[:, ::9] *= 6  # outliers worth clipping
    w[::4] += 0.01  # skewed rows
    x = torch.randn(tokens, in_f, generator=g)
    return w, x


def _score64(x, wg_q, wg, gs, grp):
    """float64: mean over tokens of (x_g @ (q - w)_g)^2 for each row of one group."""
    xg = x[:, grp * gs:(grp + 1) * gs].double().numpy()
    d = (wg_q - wg).double().numpy()  # [rows, gs]
    return ((xg @ d.T) ** 2).mean(0)  # [rows]


@pytest.mark.parametrize("fmt,mode,gs", [("nf3", "afpq", 32), ("int3", "zp", 32), ("fp4", "afpq", -1)])
def test_symmetric_clip_is_the_brute_force_argmin(fmt, mode, gs):
    w, x = _data()
    fq = group_fake_quantizer(fmt, mode)
    got = symmetric_clip(w, x, fq, gs)  # [rows, groups, 1]
    g = w.shape[1] if gs == -1 else gs
    ng = w.shape[1] // g
    assert got.shape == (w.shape[0], ng, 1)
    wg = w.reshape(w.shape[0], ng, g)
    org = wg.abs().amax(-1, keepdim=True)
    agree = total = 0
    for grp in range(ng):
        errs, cands = [], []
        for i in range(K):
            mv = org[:, grp] * (1 - i / N_GRID)  # [rows, 1]
            q = fq(torch.clamp(wg[:, grp], -mv, mv))
            errs.append(_score64(x, q, wg[:, grp], g, grp))
            cands.append(mv[:, 0])
        errs = np.stack(errs)  # [K, rows]
        best = errs.argmin(0)  # first minimum: least clipping
        for r in range(w.shape[0]):
            chosen = int(np.argmin([abs(float(c[r]) - float(got[r, grp, 0])) for c in cands]))
            assert float(cands[chosen][r]) == float(got[r, grp, 0])
            # the choice is the brute-force minimum (float32 vs float64: a near-tie may flip)
            assert errs[chosen, r] <= errs[best[r], r] * (1 + 1e-4) + 1e-12
            agree += chosen == best[r]
            total += 1
    assert agree / total > 0.9
    assert (got < org).any()  # it does clip somewhere


@pytest.mark.parametrize("fmt,mode,separable", [("nf3", "afpq", True), ("fp3", "afpq", True), ("int3", "zp", False)])
def test_two_sided_clip_is_the_brute_force_argmin(fmt, mode, separable):
    w, x = _data(seed=1, rows=8)
    gs = 32
    fq = group_fake_quantizer(fmt, mode)
    lo, hi = two_sided_clip(w, x, fq, gs, separable)
    ng = w.shape[1] // gs
    wg = w.reshape(w.shape[0], ng, gs)
    pos, neg = wg.amax(-1, keepdim=True).clamp(min=0), wg.amin(-1, keepdim=True).clamp(max=0)
    shrink = [1 - i / N_GRID for i in range(K)]
    for grp in range(ng):
        errs = np.stack([np.stack([_score64(x, fq(wg[:, grp].clamp(neg[:, grp] * rj, pos[:, grp] * ri)), wg[:, grp], gs, grp)
                                   for rj in shrink]) for ri in shrink])  # [i, j, rows]
        flat = errs.reshape(K * K, -1)
        for r in range(w.shape[0]):
            i = shrink.index(min(shrink, key=lambda s: abs(s * float(pos[r, grp]) - float(hi[r, grp, 0]))))
            j = shrink.index(min(shrink, key=lambda s: abs(s * float(neg[r, grp]) - float(lo[r, grp, 0]))))
            if float(pos[r, grp]) == 0 or float(neg[r, grp]) == 0:
                continue  # the side's candidates coincide
            assert errs[i, j, r] <= flat[:, r].min() * (1 + 1e-4) + 1e-12, (grp, r, i, j)
    assert ((hi < wg.amax(-1, keepdim=True)) | (lo > wg.amin(-1, keepdim=True))).any()
    clipped = apply_two_sided_clip(w, lo, hi)
    assert clipped.shape == w.shape and (clipped <= w.abs().amax()).all()
    assert torch.equal(clipped.reshape(wg.shape), torch.maximum(torch.minimum(wg, hi), lo))


def test_two_sided_separable_equals_every_pair():
    """In mode afpq the separable path (2n quantizations) picks what the n^2 path picks."""
    w, x = _data(seed=2, rows=16, tokens=200)
    fq = group_fake_quantizer("nf3", "afpq")
    lo1, hi1 = two_sided_clip(w, x, fq, 32, separable=True)
    lo2, hi2 = two_sided_clip(w, x, fq, 32, separable=False)
    assert ((lo1 == lo2) & (hi1 == hi2)).float().mean() > 0.95


def test_group_fake_quantizer_is_core_fake_quantize():
    from afpq_plugins.core.quantize import fake_quantize

    w, _ = _data()
    for fmt, mode, search in (("nf3", "afpq", None), ("int4", "zp", None), ("fp4", "afpq", "mse")):
        fq = group_fake_quantizer(fmt, mode, search=search)
        assert torch.equal(fq(w.reshape(12, 2, 32)).reshape(w.shape), fake_quantize(w, fmt, 32, mode, search=search))


def test_search_registry_is_one_place():
    assert set(SEARCHES) >= {"minmax", "mse"}
    assert resolve_search("mse") == ScaleSearch() and resolve_search({"method": "minmax"}) is None

    class Half:
        """A toy search: half the min/max scales (checks that find_params uses the registry)."""

        def params(self, x, f, mode, dim=-1):
            from afpq_plugins.core.quantize import find_params

            p1, p2 = find_params(x, f, mode, dim=dim)
            return p1 * 0.5, p2 * 0.5 if mode != "zp" else p2

        def to_dict(self):
            return {"method": "half-test"}

    register_search("half-test", lambda kw: Half())
    try:
        from afpq_plugins.core.quantize import find_params

        w, _ = _data()
        a1, a2 = find_params(w, "nf3", "afpq", search="half-test")
        b1, b2 = find_params(w, "nf3", "afpq")
        assert torch.equal(a1, b1 * 0.5) and torch.equal(a2, b2 * 0.5)
        assert resolve_search({"method": "half-test"}).to_dict() == {"method": "half-test"}
    finally:
        SEARCHES.pop("half-test")
    with pytest.raises(ValueError, match="scale search"):
        resolve_search("half-test")
