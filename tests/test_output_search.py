"""The output-aware scale search: against a float64 brute force over the same candidates,
never worse than min/max on its own objective, finite on degenerate groups, and the
calibration energies against a hand-computed forward pass."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from afpq_plugins.core.formats import get_format
from afpq_plugins.core.output_search import (
    OutputSearch,
    find_params_output,
    grouped_blocks,
    grouped_energies,
    input_energies,
    output_error,
    resolve_output_search,
)
from afpq_plugins.core.quantize import fake_quantize_groups, find_params


# -- float64 reference quantizers (nearest grid value by brute force over the table) ------------
def _nearest(y, table):
    table = np.asarray(table, dtype=np.float64)
    return table[np.abs(y[..., None] - table).argmin(-1)]


def _fq64(x, f, mode, a, b):
    """Fake-quantize float64 ``x`` [rows, gs] with the min/max range shrunk by a (pos side) and b (neg side)."""
    xmax = np.clip(x.max(-1, keepdims=True), 0, None)
    xmin = np.clip(x.min(-1, keepdims=True), None, 0)
    if mode == "afpq":
        sp, sn = xmax * a / f.top_pos, -xmin * b / f.top_neg
        y = np.where(x >= 0, x / np.where(sp == 0, 1, sp), x / np.where(sn == 0, 1, sn))
        v = _nearest(y, f.sorted_values)
        return np.where(v > 0, v * sp, v * sn)
    if mode == "sym":
        s = np.maximum(xmax * a / f.top_pos, -xmin * a / f.top_neg)
        return _nearest(x / np.where(s == 0, 1, s), f.sorted_values) * s
    lo, hi = xmin * a, xmax * a  # zp, both ends together
    empty = (lo == 0) & (hi == 0)
    lo, hi = np.where(empty, -1, lo), np.where(empty, 1, hi)
    s = (hi - lo) / f.range
    z = np.round(-lo / s)
    grid = np.asarray(f.sorted_values) - f.sorted_values[0]
    if f.uniform_int:
        q = np.clip(np.round(x / s) + z, 0, (1 << f.bits) - 1)
    else:
        q = _nearest(x / s + z, grid)
    return (q - z) * s


def _obj64(x, xq, h=None, H=None):
    e = x - xq
    if H is not None:
        return np.einsum("rgi,gij,rgj->rg", e, H, e)
    return (h * e * e).sum(-1)


def _groups(seed=0, rows=16, groups=3, gs=16):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, groups, gs, generator=g) * torch.rand(rows, groups, 1, generator=g)
    w[::3] += 0.6 * torch.rand(w[::3].shape[0], groups, 1, generator=g)  # skewed groups
    w[1::4, :, :2] *= 5  # outliers
    return w


def _energies(seed=0, groups=3, gs=16):
    g = torch.Generator().manual_seed(seed + 100)
    h = torch.rand(groups, gs, generator=g) ** 4  # heavy-tailed, a few loud columns
    h[:, 3] *= 50
    h[0, 5] = 0.0  # one quiet column
    return h


def _params_obj64(w, f, mode, p1, p2, h=None, H=None):
    x = w.double().numpy()
    xq = fake_quantize_groups(w.double(), f, mode, p1.double(), p2.double(), torch.float64).numpy()
    # fake_quantize_groups rounds in float32 arithmetic; the objective itself is float64
    return _obj64(x, xq, None if h is None else h.double().numpy(), None if H is None else H.double().numpy())


@pytest.mark.parametrize("fmt,mode", [("nf3", "afpq"), ("fp4", "afpq"), ("fp3", "afpq"), ("nf4", "sym"),
                                      ("int3", "zp"), ("nf3", "zp")])
def test_diag_search_matches_float64_brute_force(fmt, mode):
    """The chosen pair's objective equals the best of every candidate (afpq: all grid^2 pairs)."""
    f = get_format(fmt)
    search = OutputSearch(grid=7, min_shrink=0.55)
    w, h = _groups(), _energies()
    p1, p2 = find_params_output(w, f, mode, energies=h, search=search)
    got = _params_obj64(w, f, mode, p1, p2, h=h)
    x, hn = w.double().numpy(), h.double().numpy()
    best = np.full(got.shape, np.inf)
    pairs = itertools.product(search.factors(), repeat=2) if mode == "afpq" else ((a, a) for a in search.factors())
    for a, b in pairs:
        best = np.minimum(best, _obj64(x, _fq64(x, f, mode, a, b), hn))
    np.testing.assert_allclose(got, best, rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("fmt,mode", [("nf3", "afpq"), ("fp4", "afpq"), ("nf4", "afpq"), ("nf3", "sym"),
                                      ("int4", "zp")])
@pytest.mark.parametrize("objective", ["diag", "block"])
def test_never_worse_than_minmax_on_its_objective(fmt, mode, objective):
    f = get_format(fmt)
    w = _groups(seed=3, rows=20, groups=2, gs=24)
    g = torch.Generator().manual_seed(7)
    X = torch.randn(200, 2 * 24, generator=g) * (torch.rand(2 * 24, generator=g) ** 3 * 4)
    Hfull = X.t() @ X
    H = grouped_blocks(Hfull, 24)
    h = grouped_energies(torch.diagonal(Hfull), 24)
    kw = {"second_moment": H} if objective == "block" else {"energies": h}
    p1, p2 = find_params_output(w, f, mode, search=OutputSearch(objective=objective), **kw)
    q1, q2 = find_params(w, f, mode)  # the paper's min/max
    okw = {"H": H} if objective == "block" else {"h": h}
    got, base = _params_obj64(w, f, mode, p1, p2, **okw), _params_obj64(w, f, mode, q1, q2, **okw)
    assert np.isfinite(got).all()
    assert (got <= base * (1 + 1e-5) + 1e-9).all()
    assert (got < base * (1 - 1e-3)).any()  # it does find better scales somewhere


def test_block_objective_is_the_output_error_and_between_minmax_and_global_best():
    """e^T (X^T X) e equals ||X e||^2 (float64), and coordinate descent lands between the
    min/max pair and the best of all grid^2 pairs."""
    f = get_format("nf3")
    search = OutputSearch(grid=6, min_shrink=0.5, objective="block")
    w = _groups(seed=5, rows=10, groups=1, gs=12)
    g = torch.Generator().manual_seed(9)
    X = torch.randn(64, 12, generator=g, dtype=torch.float64) * torch.linspace(0.1, 3, 12, dtype=torch.float64)
    H = (X.t() @ X).unsqueeze(0)
    e = torch.randn(10, 1, 12, generator=g, dtype=torch.float64)
    want = ((e.squeeze(1) @ X.t()) ** 2).sum(-1, keepdim=True)
    torch.testing.assert_close(output_error(e, torch.zeros_like(e), second_moment=H).squeeze(1).double(), want,
                               rtol=1e-5, atol=1e-6)
    p1, p2 = find_params_output(w, f, "afpq", search=search, second_moment=H.float())
    got = _params_obj64(w, f, "afpq", p1, p2, H=H)
    x, Hn = w.double().numpy(), H.numpy()
    best = np.full(got.shape, np.inf)
    for a, b in itertools.product(search.factors(), repeat=2):
        best = np.minimum(best, _obj64(x, _fq64(x, f, "afpq", a, b), H=Hn))
    base = _obj64(x, _fq64(x, f, "afpq", 1.0, 1.0), H=Hn)
    assert (got <= base * (1 + 1e-5) + 1e-9).all()
    assert (got >= best * (1 - 1e-4) - 1e-9).all()


@pytest.mark.parametrize("mode,fmt", [("afpq", "nf3"), ("afpq", "fp4"), ("sym", "nf4"), ("zp", "int3")])
def test_degenerate_groups_stay_finite(mode, fmt):
    f = get_format(fmt)
    gs = 8
    w = torch.stack([
        torch.rand(gs) + 0.1,                 # all positive
        -torch.rand(gs) - 0.1,                # all negative
        torch.zeros(gs),                      # all zero
        torch.tensor([0.0] * (gs - 1) + [2.0]),  # one non-zero
        torch.randn(gs),                      # ordinary, but see the energies below
    ]).unsqueeze(1)
    h = torch.rand(1, gs)
    h[0, :3] = 0.0  # zero-energy columns
    for energies in (h, torch.zeros(1, gs)):
        p1, p2 = find_params_output(w, f, mode, energies=energies)
        wq = fake_quantize_groups(w, f, mode, p1, p2, torch.float32)
        assert torch.isfinite(p1).all() and torch.isfinite(p2).all() and torch.isfinite(wq).all()
        assert torch.equal(wq[2], torch.zeros_like(wq[2]))  # all-zero group decodes to zeros
    # all energy zero: nothing to gain, the min/max pair is kept exactly
    q1, q2 = find_params(w, f, mode)
    torch.testing.assert_close(p1, q1, rtol=0, atol=0)
    torch.testing.assert_close(p2, q2, rtol=0, atol=0)
    # one element per group
    one = torch.tensor([[0.3], [-0.7], [0.0]])
    p1, p2 = find_params_output(one, f, mode, energies=torch.ones(1))
    assert torch.isfinite(fake_quantize_groups(one, f, mode, p1, p2, torch.float32)).all()


def test_dim_and_arguments():
    f = get_format("nf3")
    w, h = _groups(seed=2, rows=6, groups=1, gs=10).squeeze(1), torch.rand(10) + 0.1
    p1, p2 = find_params_output(w, f, "afpq", energies=h)
    t1, t2 = find_params_output(w.t(), f, "afpq", energies=h.unsqueeze(1), dim=0)
    torch.testing.assert_close(t1.t(), p1)
    torch.testing.assert_close(t2.t(), p2)
    with pytest.raises(ValueError, match="layer.q: .*energies"):
        find_params_output(w, f, "afpq", name="layer.q")
    with pytest.raises(ValueError, match="non-negative"):
        find_params_output(w, f, "afpq", energies=-h)
    with pytest.raises(ValueError, match="do not broadcast"):
        find_params_output(w, f, "afpq", energies=torch.ones(3))
    with pytest.raises(ValueError, match="second_moment"):
        find_params_output(w, f, "afpq", energies=h, search=OutputSearch(objective="block"))
    with pytest.raises(ValueError, match="objective"):
        OutputSearch(objective="full")
    s = OutputSearch(grid=5, min_shrink=0.7)
    assert resolve_output_search(s.to_dict()) == s and resolve_output_search("output") == OutputSearch()


def test_input_energies_against_a_hand_computed_forward():
    torch.manual_seed(0)
    emb, l1, l2 = torch.nn.Embedding(11, 6), torch.nn.Linear(6, 5), torch.nn.Linear(5, 4)
    model = torch.nn.Sequential(emb, l1, l2)
    samples = [torch.randint(0, 11, (7,)), torch.randint(0, 11, (3,))]
    got = input_energies(model, {"l1": l1, "l2": l2}, samples)
    full = input_energies(model, {"l2": l2}, samples, second_moment=True)
    x1 = torch.cat([emb.weight[s] for s in samples]).double()
    x2 = x1 @ l1.weight.double().t() + l1.bias.double()
    torch.testing.assert_close(got["l1"].double(), (x1 ** 2).sum(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got["l2"].double(), (x2 ** 2).sum(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(full["l2"].double(), x2.t() @ x2, rtol=1e-5, atol=1e-6)
    assert not l1._forward_pre_hooks and not l2._forward_pre_hooks  # hooks removed
    H = torch.arange(16.0).reshape(4, 4)
    torch.testing.assert_close(grouped_blocks(H, 2), torch.stack([H[:2, :2], H[2:, 2:]]))
    torch.testing.assert_close(grouped_energies(torch.arange(4.0), -1), torch.arange(4.0).reshape(1, 4))


def test_bound_and_column_cursor_searches_see_the_right_energies():
    """RTN's bound search on [rows, groups, gs] chunks and GPTQ's column walk over consecutive
    blocks give the same parameters as the search on each group with its own energies."""
    f = get_format("nf3")
    w = _groups(seed=4, rows=6, groups=3, gs=8)
    h = torch.rand(24) ** 3
    want = [find_params_output(w[:, g], f, "afpq", energies=h[8 * g:8 * g + 8]) for g in range(3)]
    b1, b2 = OutputSearch().bind(grouped_energies(h, 8)).params(w, f, "afpq")
    cur = __import__("afpq_plugins.core.output_search", fromlist=["x"]).ColumnCursorSearch(OutputSearch(), h)
    wide = w.reshape(6, 24)
    cur.params(wide, f, "afpq")  # AutoGPTQ's first call on all columns restarts the walk
    for g in range(3):
        torch.testing.assert_close(b1[:, g], want[g][0], rtol=0, atol=0)
        torch.testing.assert_close(b2[:, g], want[g][1], rtol=0, atol=0)
        c1, c2 = cur.params(wide[:, 8 * g:8 * g + 8], f, "afpq")
        torch.testing.assert_close(c1, want[g][0], rtol=0, atol=0)
        torch.testing.assert_close(c2, want[g][1], rtol=0, atol=0)
    assert cur.pos == 0
    with pytest.raises(ValueError, match="calibration"):
        OutputSearch().params(w, f, "afpq")


def test_rtn_output_search_through_the_methods_registry(tmp_path):
    """RTN with ``scale_search="output"``: the fake path equals the packed modules' decode, each
    layer's weights equal core's search bound to a float64 hand-computed diag(X^T X) of that
    layer's inputs, and the checkpoint config records the search."""
    pytest.importorskip("transformers")
    import copy

    from _tiny import tiny_llama_folder

    from afpq_plugins.core.quantize import fake_quantize
    from afpq_plugins.data import load_model_and_tokenizer
    from afpq_plugins.methods import Calibration, FormatSpec, quantize
    from afpq_plugins.model import find_linears

    model, tok = load_model_and_tokenizer(tiny_llama_folder(str(tmp_path / "m")))
    fake, packed = copy.deepcopy(model), copy.deepcopy(model)
    spec, calib = FormatSpec("nf3", 32, scale_search="output"), Calibration(2, 16, seed=1)
    samples = calib.samples(tok)
    lin = find_linears(model)["model.layers.0.mlp.down_proj"]
    seen = []
    h = lin.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().double().reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        for s in samples:
            model(s.reshape(1, -1))
    h.remove()
    x = torch.cat(seen)
    energies = (x * x).sum(0).float()  # float64 reference, one layer
    qc = quantize(fake, tok, "rtn", spec, calib, fake=True, progress=False)
    quantize(packed, tok, "rtn", spec, calib, progress=False)
    assert qc.extra["scale_search"]["method"] == "output"
    want = fake_quantize(lin.weight.detach(), "nf3", 32, search=OutputSearch().bind(grouped_energies(energies, 32)))
    got = fake.get_submodule("model.layers.0.mlp.down_proj").weight.detach()
    assert (got != want).float().mean() < 0.01  # float32 sums vs the float64 reference may flip a rare tie
    assert not torch.equal(got, fake_quantize(lin.weight.detach(), "nf3", 32))
    for name in qc.quantized_modules:
        a, b = fake.get_submodule(name), packed.get_submodule(name)
        with torch.no_grad():
            torch.testing.assert_close(a.weight, b(torch.eye(a.in_features)).t(), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="needs calibration activations"):
        quantize(copy.deepcopy(model), None, "rtn", spec, fake=True, progress=False)
