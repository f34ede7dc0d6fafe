"""The opt-in scale search (beyond the paper): never worse than min/max, and the
two-scale search is separable, checked against a float64 brute force over all pairs."""

from __future__ import annotations

import itertools
import json
import os

import numpy as np
import pytest
import torch

from afpq_plugins.core.formats import get_format
from afpq_plugins.core.quantize import decode, encode, fake_quantize, find_params
from afpq_plugins.core.search import ScaleSearch
from afpq_plugins.core.search_registry import resolve_search


def _np_fq_afpq(x, table, s_pos, s_neg):
    """float64 nearest-grid quantization with two scales (brute force over the table)."""
    table = np.asarray(table, dtype=np.float64)
    y = np.where(x >= 0, x / np.where(s_pos == 0, 1, s_pos), x / np.where(s_neg == 0, 1, s_neg))
    v = table[np.abs(y[..., None] - table).argmin(-1)]
    return np.where(v > 0, v * s_pos, v * s_neg)


def _groups(seed=0, rows=24, gs=32):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, gs, generator=g) * torch.rand(rows, 1, generator=g)
    w[::3] += 0.7 * torch.rand(rows // 3 + (rows % 3 > 0), 1, generator=g)  # skewed groups
    w[1::5, :2] *= 6  # outliers
    return w


@pytest.mark.parametrize("fmt,mode", [("nf3", "afpq"), ("fp4", "afpq"), ("nf4", "sym"), ("int3", "zp"), ("fp3", "afpq")])
def test_search_never_worse_than_minmax(fmt, mode):
    w = _groups()
    err = {}
    for search in (None, "mse"):
        p1, p2 = find_params(w, fmt, mode, search=search)
        w_hat = decode(encode(w, fmt, mode, p1, p2), fmt, mode, p1, p2)
        err[search] = ((w - w_hat).double() ** 2).sum(-1)
    assert (err["mse"] <= err[None] + 1e-12).all()
    assert (err["mse"] < err[None]).any()  # and it does find better scales somewhere


def test_afpq_search_is_the_best_pair_over_the_whole_grid():
    """Searching each side alone (2 x grid candidates) finds the same error as all grid^2 pairs."""
    search = ScaleSearch(grid=8, min_shrink=0.6)
    f = get_format("nf3")
    w = _groups(seed=1, rows=12, gs=16)
    p1, p2 = find_params(w, f, "afpq", search=search)
    x = w.double().numpy()
    xmax = np.clip(x.max(-1, keepdims=True), 0, None)
    xmin = np.clip(x.min(-1, keepdims=True), None, 0)
    best = np.full((x.shape[0], 1), np.inf)
    for a, b in itertools.product(search.factors(), repeat=2):
        e = ((x - _np_fq_afpq(x, f.values, xmax * a / f.top_pos, -xmin * b / f.top_neg)) ** 2).sum(-1, keepdims=True)
        best = np.minimum(best, e)
    got = ((x - _np_fq_afpq(x, f.values, p1.double().numpy(), p2.double().numpy())) ** 2).sum(-1, keepdims=True)
    np.testing.assert_allclose(got, best, rtol=1e-5, atol=1e-9)


def test_resolve_search_and_errors():
    assert resolve_search(None) is None and resolve_search("minmax") is None
    assert resolve_search("mse") == ScaleSearch()
    assert resolve_search({"method": "mse", "grid": 5, "min_shrink": 0.8, "norm": 2.0}) == ScaleSearch(5, 0.8, 2.0)
    with pytest.raises(ValueError, match="scale search"):
        resolve_search("best")
    with pytest.raises(ValueError):
        ScaleSearch(grid=0)


def test_search_handles_degenerate_groups():
    w = torch.tensor([[0.0] * 8, [1.0] * 8, [-2.0] * 8, [0.5, 0, 0, 0, 0, 0, 0, 0]])
    for fmt, mode in [("nf4", "afpq"), ("fp3", "sym"), ("int4", "zp")]:
        out = fake_quantize(w, fmt, 8, mode, search="mse")
        assert torch.isfinite(out).all()


def test_rtn_records_the_search_in_the_checkpoint(tmp_path):
    pytest.importorskip("transformers")
    from _tiny import tiny_llama

    from afpq_plugins.model import load_quantized, quantize_model_rtn, save_quantized

    model = tiny_llama()
    qc = quantize_model_rtn(model, "nf3", 32, progress=False, scale_search="mse")
    out = save_quantized(model, str(tmp_path / "ck"), qc)
    cfg = json.load(open(os.path.join(out, "config.json")))["quantization_config"]
    assert cfg["scale_search"] == {"method": "mse", "grid": 20, "min_shrink": 0.5, "norm": 2.0}
    back = load_quantized(out)
    ids = torch.randint(0, 100, (1, 12))
    with torch.no_grad():
        assert torch.equal(back(ids).logits, model(ids).logits)
