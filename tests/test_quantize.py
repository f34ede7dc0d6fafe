"""Quantization maths against float64 references written from docs/format.md.

The reference (``Ref`` below) is numpy float64 throughout: the grids are typed in
from the notes, the group parameters come from the notes' formulas, and the
nearest grid value is a brute-force argmin over the table. Random inputs may fall
within float32 rounding of a rounding boundary; only there may the library pick the
other (equally near, to float32 precision) neighbour. Exact ties are constructed
deliberately, and there the documented tie rule is asserted exactly: toward zero in
``afpq``/``sym``, down in ``zp``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from afpq_plugins.core.formats import get_format, register_format
from afpq_plugins.core.gptq import ColumnQuantizer
from afpq_plugins.core.quantize import (
    decode,
    dequantize_weight,
    encode,
    fake_quantize,
    fake_quantize_groups,
    find_params,
    quantize_weight,
    round_params,
)

HYP = settings(max_examples=25, deadline=None, derandomize=True)

# -- the grids, typed in from docs/format.md -----------------------------------------------------
FP4_MAG = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
FP3_MAG = [0.0, 1.0, 2.0, 4.0]
NF4 = [
    -1, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1,
]
NF3 = [-1, -0.5350227355957031, -0.2469314038753510, 0, 0.1833375245332718, 0.3819939494132996, 0.6229856610298157, 1]

TABLES = {
    "fp4": FP4_MAG + [-m for m in FP4_MAG],  # code = sign << 3 | magnitude index
    "fp3": FP3_MAG + [-m for m in FP3_MAG],  # code = sign << 2 | magnitude index
    "nf4": [float(v) for v in NF4],
    "nf3": [float(v) for v in NF3],
    **{f"int{b}": [float(i) for i in range(2**b)] for b in (2, 3, 4, 8)},
}
TOP = {"fp4": 6.0, "fp3": 4.0, "nf4": 1.0, "nf3": 1.0}
FPNF = ("fp4", "fp3", "nf4", "nf3")
INTS = ("int2", "int3", "int4", "int8")
CASES = [(f, m) for f in FPNF for m in ("afpq", "sym", "zp")] + [(f, "zp") for f in INTS]


class Ref:
    """float64 re-statement of the notes' formulas."""

    @staticmethod
    def grid(fmt, mode):
        t = np.array(TABLES[fmt], dtype=np.float64)
        return t - t.min() if mode == "zp" else t

    @staticmethod
    def params(w, fmt, mode):
        """Per-row parameters of a float64 [..., n] array (notes, "Scales")."""
        xmax = np.maximum(w.max(-1), 0.0)
        xmin = np.minimum(w.min(-1), 0.0)
        if mode == "afpq":
            return xmax / TOP[fmt], -xmin / TOP[fmt]
        if mode == "sym":
            s = np.maximum(xmax, -xmin) / TOP[fmt]
            return s, s
        rng = (2 ** int(fmt[3:]) - 1) if fmt.startswith("int") else {"fp4": 12.0, "fp3": 8.0, "nf4": 2.0, "nf3": 2.0}[fmt]
        empty = (xmax == 0) & (xmin == 0)  # AutoGPTQ's all-zero fallback to [-1, 1]
        xmin = np.where(empty, -1.0, xmin)
        xmax = np.where(empty, 1.0, xmax)
        s = (xmax - xmin) / rng
        return s, np.round(-xmin / s)

    @staticmethod
    def scaled(x, mode, p1, p2):
        """w / s (two scales in afpq; + z in zp), float64, with zero scales guarded."""
        with np.errstate(divide="ignore", invalid="ignore"):
            if mode == "afpq":
                return np.where(x > 0, x / np.where(p1 == 0, 1, p1), np.where(x < 0, x / np.where(p2 == 0, 1, p2), 0.0))
            y = x / np.where(p1 == 0, 1, p1)
            return y + p2 if mode == "zp" else y

    @classmethod
    def nearest(cls, y, fmt, mode):
        """Index into the sorted distinct grid of the nearest value (brute force)."""
        g = np.unique(cls.grid(fmt, mode))
        d = np.abs(y[..., None] - g)
        best = d == d.min(-1, keepdims=True)
        if mode == "zp":  # ties down
            return best.argmax(-1), g
        # ties toward zero
        return np.where(best, np.abs(g), np.inf).argmin(-1), g

    @classmethod
    def encode(cls, x, fmt, mode, p1, p2):
        """Codes: nearest grid value, then its (first = +0) code in the table."""
        if fmt.startswith("int"):
            maxq = 2 ** int(fmt[3:]) - 1
            return np.clip(np.round(x / np.where(p1 == 0, 1, p1)) + p2, 0, maxq).astype(np.int64)
        idx, g = cls.nearest(cls.scaled(x, mode, p1, p2), fmt, mode)
        grid = cls.grid(fmt, mode)
        code_of = {float(v): int(np.nonzero(grid == v)[0][0]) for v in g}
        return np.vectorize(lambda i: code_of[float(g[i])])(idx).astype(np.int64)

    @classmethod
    def decode(cls, codes, fmt, mode, p1, p2):
        v = cls.grid(fmt, mode)[codes]
        if mode == "afpq":
            return np.where(v > 0, v * p1, v * p2)
        if mode == "sym":
            return v * p1
        return (v - p2) * p1


def _ok_or_near_tie(x, fmt, mode, p1, p2, lib_codes, ref_codes):
    """Codes agree, or (float32 rounding near a boundary) both decode equally near."""
    lib_codes = np.asarray(lib_codes, dtype=np.int64)
    diff = lib_codes != ref_codes
    if not diff.any():
        return
    if fmt.startswith("int"):
        y = (x / np.where(p1 == 0, 1, p1))
        frac = np.abs(y - np.floor(y) - 0.5)
        assert (frac[diff] < 1e-5).all(), f"{fmt}/{mode}: codes differ away from a .5 boundary"
        assert (np.abs(lib_codes - ref_codes)[diff] <= 1).all()
        return
    y = Ref.scaled(x, mode, p1, p2)
    grid = Ref.grid(fmt, mode)
    d_lib = np.abs(y - grid[lib_codes])
    d_ref = np.abs(y - grid[ref_codes])
    slack = 1e-6 * np.maximum(1.0, np.abs(y))
    bad = diff & (d_lib - d_ref > slack)
    assert not bad.any(), (
        f"{fmt}/{mode}: not the nearest grid value at y={y[bad][:5]}: "
        f"lib {grid[lib_codes][bad][:5]} vs ref {grid[ref_codes][bad][:5]}"
    )


def _z_near_half(w, s):
    """Groups whose -xmin / s (with the all-zero fallback xmin = -1) is within float32
    rounding of .5: there the float32 zero-point may round either way."""
    xmin = np.minimum(w.min(-1), 0.0)
    xmin = np.where((xmin == 0) & (np.maximum(w.max(-1), 0.0) == 0), -1.0, xmin)
    return np.abs(np.abs(-xmin / s) % 1 - 0.5) < 1e-4


def _f16(a):
    return np.asarray(a, dtype=np.float64).astype(np.float16).astype(np.float64)


def _sqnr_db(w, q):
    w = np.asarray(w, dtype=np.float64)
    q = np.asarray(q, dtype=np.float64)
    return 10 * np.log10((w**2).sum(-1) / ((w - q) ** 2).sum(-1))


# -- hand-computed cases --------------------------------------------------------------------------------
W4 = torch.tensor([[1.0, -2.0, 0.5, 3.0]])
THIRD16 = 0.333251953125  # float16(1/3)


def test_hand_fp4_afpq():
    """s_pos = 3/6 = 0.5, s_neg = 2/6 (fp16 0.333251953125); codes 2->4, -6->15, 1->2, 6->7."""
    q = quantize_weight(W4, "fp4", -1, "afpq")
    assert q.codes.tolist() == [[4, 15, 2, 7]]
    assert q.scales.dtype == torch.float16 and q.scales.tolist() == [[0.5]]
    assert q.scales2.tolist() == [[THIRD16]]
    assert q.dequantize().tolist() == [[1.0, -6 * THIRD16, 0.5, 3.0]]
    torch.testing.assert_close(q.dequantize(), W4, rtol=2**-11, atol=0)  # up to fp16 scale rounding


def test_hand_fp4_sym():
    """One scale 3/6: w/s = [2, -4, 1, 6] all on the grid: exact."""
    q = quantize_weight(W4, "fp4", -1, "sym")
    assert q.codes.tolist() == [[4, 8 | 6, 2, 7]]
    assert q.scales.tolist() == [[0.5]] and q.scales2 is None
    assert q.dequantize().tolist() == W4.tolist()


def test_hand_fp4_zp():
    """s = 5/12 -> fp16 0.416748046875, z = round(4.8) = 5; grid + 6 = {0,2,3,4,4.5,...,12}:
    w/s + z = [7.3995, 0.2009, 6.1998, 12.1986] -> [7.5, 0, 6, 12] -> values [1.5, -6, 0, 6]."""
    s = 0.416748046875
    q = quantize_weight(W4, "fp4", -1, "zp")
    assert q.scales.tolist() == [[s]] and q.scales2.tolist() == [[5.0]]
    assert q.codes.tolist() == [[3, 15, 0, 7]]
    assert q.dequantize().tolist() == [[2.5 * s, -5 * s, 1 * s, 7 * s]]


def test_hand_int4_zp():
    """s = 5/15 -> fp16(1/3), z = 6; q = clamp(round(w/s) + 6) = [9, 0, 8, 15] (1.5004 -> 2)."""
    q = quantize_weight(W4, "int4", -1, "zp")
    assert q.scales.tolist() == [[THIRD16]] and q.scales2.tolist() == [[6.0]]
    assert q.codes.tolist() == [[9, 0, 8, 15]]
    assert q.dequantize().tolist() == [[3 * THIRD16, -6 * THIRD16, 2 * THIRD16, 9 * THIRD16]]


def test_hand_nf4_afpq():
    """s_pos = 3, s_neg = 2: 1/3 -> 0.3379 (code 11), -1 -> code 0, 1/6 -> 0.1609 (code 9), 1 -> 15."""
    q = quantize_weight(W4, "nf4", -1, "afpq")
    assert q.codes.tolist() == [[11, 0, 9, 15]]
    assert (q.scales.item(), q.scales2.item()) == (3.0, 2.0)
    expect = [3 * NF4[11], -2.0, 3 * NF4[9], 3.0]
    np.testing.assert_allclose(q.dequantize().double().numpy()[0], expect, rtol=2**-23)


def test_hand_fp3_afpq():
    """s_pos = 3/4, s_neg = 2/4: 1/.75 = 1.33 -> 1, -4, 0.667 -> 1, 4 (fp3 codes 1, 7, 1, 3)."""
    q = quantize_weight(W4, "fp3", -1, "afpq")
    assert q.codes.tolist() == [[1, 7, 1, 3]]
    assert q.dequantize().tolist() == [[0.75, -2.0, 0.75, 3.0]]


@pytest.mark.parametrize("fmt", list(TABLES))
def test_decode_every_code(fmt):
    """decode() of every code against the typed-in table, for each mode's formula."""
    f = get_format(fmt)
    codes = torch.arange(2**f.bits, dtype=torch.uint8)
    tbl = np.array(TABLES[fmt])
    if fmt in FPNF:
        s_pos, s_neg = torch.tensor(2.0), torch.tensor(0.5)
        got = decode(codes, fmt, "afpq", s_pos, s_neg).double().numpy()
        np.testing.assert_allclose(got, np.where(tbl > 0, 2 * tbl, 0.5 * tbl), rtol=2**-23, atol=0)
        got = decode(codes, fmt, "sym", torch.tensor(0.75), torch.tensor(0.75)).double().numpy()
        np.testing.assert_allclose(got, 0.75 * tbl, rtol=2**-22, atol=0)
    s, z = torch.tensor(0.25), torch.tensor(3.0)
    got = decode(codes, fmt, "zp", s, z).double().numpy()
    np.testing.assert_allclose(got, (tbl - tbl.min() - 3) * 0.25, rtol=2**-22, atol=1e-7)
    assert decode(codes, fmt, "zp", s, z, dtype=torch.float16).dtype == torch.float16


# -- find_params ----------------------------------------------------------------------------------------
_rows = st.integers(1, 4)
_cols = st.integers(1, 40)


@st.composite
def weights(draw, rows=_rows, cols=_cols):
    """Weights of various shapes: Gaussian, shifted, all-positive, all-negative, with zero rows."""
    r, c = draw(rows), draw(cols)
    seed = draw(st.integers(0, 2**31 - 1))
    kind = draw(st.sampled_from(["normal", "shift", "pos", "neg", "zero_rows", "lognormal", "tiny"]))
    g = np.random.default_rng(seed)
    w = g.standard_normal((r, c))
    if kind == "shift":
        w += g.uniform(-2, 2)
    elif kind == "pos":
        w = np.abs(w)
    elif kind == "neg":
        w = -np.abs(w)
    elif kind == "zero_rows":
        w[g.random(r) < 0.5] = 0.0
        w[:, g.random(c) < 0.3] = 0.0
    elif kind == "lognormal":
        w = np.exp(w) - 1.0
    elif kind == "tiny":
        w *= 1e-3
    return w.astype(np.float32)


@HYP
@given(w=weights(), case=st.sampled_from(CASES))
def test_find_params_formulas(w, case):
    fmt, mode = case
    p1, p2 = find_params(torch.from_numpy(w), fmt, mode)
    assert p1.shape == (w.shape[0], 1) and p2.shape == (w.shape[0], 1)
    assert torch.isfinite(p1).all() and torch.isfinite(p2).all()
    r1, r2 = Ref.params(w.astype(np.float64), fmt, mode)
    p1 = p1.double().numpy()[:, 0]
    p2 = p2.double().numpy()[:, 0]
    np.testing.assert_allclose(p1, r1, rtol=2**-21, atol=0)
    if mode == "zp":
        near_half = _z_near_half(w.astype(np.float64), r1)
        np.testing.assert_array_equal(p2[~near_half], r2[~near_half])  # integer zero-point
        assert (p2 == np.round(p2)).all()
        assert ((p2 >= 0) & (p2 <= get_format(fmt).range)).all()
    else:
        np.testing.assert_allclose(p2, r2, rtol=2**-21, atol=0)
    assert (p1 >= 0).all() and (p2 >= 0).all()


def test_find_params_reduces_over_dim():
    x = torch.tensor([[[1.0, -3.0], [6.0, 2.0]]])  # reduce over dim 1
    p1, p2 = find_params(x, "fp4", "afpq", dim=1)
    assert p1.shape == (1, 1, 2)
    np.testing.assert_allclose(p1.flatten().numpy(), [1.0, 2 / 6], rtol=1e-7)
    np.testing.assert_allclose(p2.flatten().numpy(), [0.0, 3 / 6], rtol=1e-7)


def test_find_params_all_zero_group():
    """afpq/sym: zero scales; zp: AutoGPTQ's [-1, 1] fallback; zeros decode to exactly 0."""
    z = torch.zeros(1, 8)
    for fmt, mode in CASES:
        p1, p2 = find_params(z, fmt, mode)
        if mode in ("afpq", "sym"):
            assert p1.item() == 0 and p2.item() == 0
        else:
            assert p1.item() == pytest.approx(2 / get_format(fmt).range, rel=1e-6)
        codes = encode(z, fmt, mode, p1, p2)
        assert decode(codes, fmt, mode, p1, p2).abs().max().item() == 0.0, (fmt, mode)


# -- encode against brute force -----------------------------------------------------------------------
@HYP
@given(case=st.sampled_from(CASES), seed=st.integers(0, 2**31 - 1), n=st.integers(1, 300))
def test_encode_matches_bruteforce(case, seed, n):
    """Random scales (fp16 values, as stored) and weights reaching past both grid ends."""
    fmt, mode = case
    f = get_format(fmt)
    g = np.random.default_rng(seed)
    p1 = _f16(g.uniform(0.01, 3.0, (n,)))
    p2 = _f16(g.uniform(0.01, 3.0, (n,)))
    if mode == "zp":
        p2 = np.round(g.uniform(0, f.range, (n,)))
        lo, hi = -p2 * p1, (f.range - p2) * p1
        x = g.uniform(lo - 0.3 * f.range * p1, hi + 0.3 * f.range * p1)
    else:
        if mode == "sym":
            p2 = p1
        top = max(f.top_pos, f.top_neg)
        x = g.uniform(-1.3 * top, 1.3 * top, (n,)) * np.where(g.random(n) < 0.5, p1, p2)
    x = x.astype(np.float32)
    codes = encode(torch.from_numpy(x), fmt, mode, torch.from_numpy(p1).float(), torch.from_numpy(p2).float())
    assert codes.dtype == torch.uint8 and codes.shape == (n,)
    ref = Ref.encode(x.astype(np.float64), fmt, mode, p1, p2)
    _ok_or_near_tie(x.astype(np.float64), fmt, mode, p1, p2, codes.numpy(), ref)
    # And decode is the float64 table formula.
    got = decode(codes, fmt, mode, torch.from_numpy(p1).float(), torch.from_numpy(p2).float()).double().numpy()
    np.testing.assert_allclose(got, Ref.decode(codes.numpy().astype(np.int64), fmt, mode, p1, p2), rtol=2**-21, atol=1e-6)


def _midpoint_probes(fmt, mode):
    """float32 numbers at and next to every float64 midpoint of the (shifted) grid."""
    g = np.unique(Ref.grid(fmt, mode))
    probes = []
    for a, b in zip(g[:-1], g[1:]):
        m32 = np.float32((a + b) / 2)
        for y in (np.nextafter(m32, np.float32(-np.inf)), m32, np.nextafter(m32, np.float32(np.inf))):
            probes.append(y)
    # Beyond both ends of the grid, and the grid values themselves.
    big = [g[0] - 1, g[-1] + 1, g[0] * 10 - 100, g[-1] * 10 + 100, -1e6, 1e6]
    probes += [np.float32(v) for v in big] + [np.float32(v) for v in g]
    return np.array(probes, dtype=np.float32)


@pytest.mark.parametrize("fmt,mode", [c for c in CASES if not c[0].startswith("int")])
def test_encode_nearest_next_to_every_midpoint(fmt, mode):
    """Exact nearest for the float32 numbers on either side of each rounding boundary.

    y is passed with unit scales (and z = 0), so the encoder sees exactly these
    numbers; the reference decides nearness in float64 against the notes' table.
    """
    y = _midpoint_probes(fmt, mode)
    one = torch.ones(())
    p2 = torch.zeros(()) if mode == "zp" else one
    codes = encode(torch.from_numpy(y), fmt, mode, one, p2).numpy().astype(np.int64)
    ref = Ref.encode(y.astype(np.float64), fmt, mode, np.ones(1), p2.double().numpy())
    grid = Ref.grid(fmt, mode)
    wrong = codes != ref
    assert not wrong.any(), (
        f"{fmt}/{mode}: y={y[wrong].tolist()} encoded to {grid[codes[wrong]].tolist()}, "
        f"nearest is {grid[ref[wrong]].tolist()}"
    )
    # Huge finite values clamp to the grid's ends.
    huge = torch.tensor([-3e38, -1e30, 1e30, 3e38])
    ends = grid[encode(huge, fmt, mode, one, p2).numpy()].tolist()
    assert ends == [grid.min(), grid.min(), grid.max(), grid.max()]


@pytest.mark.parametrize("fmt", ["fp4", "fp3"])
@pytest.mark.parametrize("mode", ["afpq", "sym", "zp"])
def test_exact_ties(fmt, mode):
    """FP midpoints are exact binary numbers: on a midpoint, afpq/sym round toward zero, zp down."""
    g = np.unique(Ref.grid(fmt, mode))
    mids = (g[:-1] + g[1:]) / 2
    one = torch.ones(())
    p2 = torch.zeros(()) if mode == "zp" else one
    codes = encode(torch.tensor(mids, dtype=torch.float32), fmt, mode, one, p2).numpy()
    got = Ref.grid(fmt, mode)[codes]
    if mode == "zp":
        expect = g[:-1]
    else:
        expect = np.where(mids > 0, g[:-1], g[1:])  # toward zero
    np.testing.assert_array_equal(got, expect)


def test_exact_ties_nf():
    """Constructed NF4 ties: y = (a + b) / 2 where that sum is exact in float32."""
    g = np.unique(Ref.grid("nf4", "afpq"))
    one = torch.ones(())
    for a, b in zip(g[:-1], g[1:]):
        m = (a + b) / 2
        if float(np.float32(m)) != m:
            continue
        c = encode(torch.tensor([m], dtype=torch.float32), "nf4", "afpq", one, one).item()
        assert TABLES["nf4"][c] == (a if m > 0 else b), (a, b)


@pytest.mark.parametrize("mode", ["afpq", "sym"])
def test_ties_through_scales_round_toward_zero(mode):
    """w = m * s with m an FP4 midpoint and s an fp16 scale, both exact: w / s = m exactly,
    so the documented tie rule applies (toward zero) whatever the scale."""
    s = _f16(np.random.default_rng(0).uniform(0.05, 4.0, 4000))
    s_t = torch.from_numpy(s).float()
    lower = {0.25: 0.0, 0.75: 0.5, 1.25: 1.0, 1.75: 1.5, 2.5: 2.0, 3.5: 3.0, 5.0: 4.0}
    for m, lo in lower.items():
        for sign in (1.0, -1.0):
            w = torch.from_numpy(sign * m * s).float()
            assert torch.equal(w.double(), torch.from_numpy(sign * m * s))  # exact in float32
            codes = encode(w, "fp4", mode, s_t, s_t).numpy()
            got = np.array(TABLES["fp4"])[codes]
            bad = got != sign * lo
            assert not bad.any(), (
                f"{mode}: {int(bad.sum())} of {len(s)} exact ties at {sign * m} rounded away from zero, "
                f"e.g. s={s[bad][0]!r}"
            )


def test_ties_through_quantize_weight():
    """A whole row whose scales are exact: 0.75 * s_pos and -1.25 * s_neg are ties."""
    s = 1.4052734375  # fp16-exact
    t = 0.98486328125  # fp16-exact
    w = torch.tensor([[6 * s, 0.75 * s, -6 * t, -1.25 * t]], dtype=torch.float32)
    q = quantize_weight(w, "fp4", -1, "afpq")
    assert (q.scales.item(), q.scales2.item()) == (s, t)
    assert [TABLES["fp4"][c] for c in q.codes[0].tolist()] == [6.0, 0.5, -6.0, -1.0]


@pytest.mark.parametrize("fmt,mode", [c for c in CASES if not c[0].startswith("int")])
def test_binned_encoder_against_bucketize_reference(fmt, mode):
    """The O(1) binned encoder vs a bucketize over float64 midpoints with the tie rule."""
    f = get_format(fmt)
    enc = f.encoder(mode)
    assert enc is not None
    g = np.unique(Ref.grid(fmt, mode))
    mids = torch.tensor((g[:-1] + g[1:]) / 2, dtype=torch.float64)
    rng = np.random.default_rng(1)
    span = g[-1] - g[0]
    y = np.concatenate([
        rng.uniform(g[0] - 0.2 * span, g[-1] + 0.2 * span, 20000),
        rng.standard_normal(5000) * span / 8 + (g[0] + g[-1]) / 2,
        _midpoint_probes(fmt, mode),
        [0.0, -0.0],
    ]).astype(np.float32)
    y64 = torch.from_numpy(y).double()
    idx = torch.bucketize(y64, mids)  # on a midpoint -> the lower value
    if mode != "zp":
        on_neg_mid = (y64 < 0) & torch.isin(y64, mids)
        idx = idx + on_neg_mid.long()  # negative ties -> toward zero
    code_of = {float(v): int(np.nonzero(Ref.grid(fmt, mode) == v)[0][0]) for v in g}
    ref = np.array([code_of[float(g[i])] for i in idx.tolist()])
    got = enc(torch.from_numpy(y)).numpy().astype(np.int64)
    wrong = got != ref
    assert not wrong.any(), f"{fmt}/{mode}: {int(wrong.sum())} mismatches, e.g. y={y[wrong][:4].tolist()}"


def test_encode_fallback_when_binning_is_impossible(restore_format_registry):
    """A grid with midpoints too close for 2**16 bins uses the bucketize path; still nearest."""
    table = [-1.0, -0.5, 0.0, 1e-7, 2e-7, 0.5, 0.75, 1.0]  # midpoints 5e-8 and 1.5e-7 share any bin
    register_format("t_dense", table)
    f = get_format("t_dense")
    assert f.encoder("afpq") is None
    rng = np.random.default_rng(2)
    y = np.concatenate([rng.uniform(-1.5, 1.5, 2000), rng.uniform(-1e-7, 3e-7, 2000), [-0.25, 0.5, 0.625]]).astype(np.float32)
    one = torch.ones(())
    codes = encode(torch.from_numpy(y), f, "afpq", one, one).numpy()
    grid = np.array(table)
    d = np.abs(y.astype(np.float64)[:, None] - grid)
    best = d == d.min(-1, keepdims=True)
    ref = np.where(best, np.abs(grid), np.inf).argmin(-1)
    dist = np.sort(d, -1)
    near_tie = dist[:, 1] - dist[:, 0] <= 1e-6 * np.maximum(1, np.abs(y))
    assert ((codes == ref) | near_tie).all()
    assert grid[codes[-3]] == 0.0  # -0.25: exact tie between -0.5 and 0 -> toward zero
    assert grid[codes[-2]] == 0.5 and grid[codes[-1]] == 0.5  # on the grid; 0.625: tie -> down


# -- quantize_weight / fake_quantize against the full reference ------------------------------------------
@HYP
@given(data=st.data(), case=st.sampled_from(CASES), gs=st.sampled_from([-1, 1, 4, 8, 16]))
def test_quantize_weight_matches_reference(data, case, gs):
    fmt, mode = case
    ngroups = data.draw(st.integers(1, 4))
    cols = ngroups * (gs if gs > 0 else data.draw(st.integers(1, 24)))
    w = data.draw(weights(cols=st.just(cols)))
    q = quantize_weight(torch.from_numpy(w), fmt, gs, mode)
    out_f, in_f = w.shape
    gsz = in_f if gs == -1 else gs
    G = in_f // gsz
    assert q.codes.shape == (out_f, in_f) and q.codes.dtype == torch.uint8
    assert q.scales.shape == (G, out_f) and q.scales.dtype == torch.float16
    assert (q.scales2 is None) == (mode == "sym")
    assert q.g_idx.tolist() == [i // gsz for i in range(in_f)]
    wg = w.astype(np.float64).reshape(out_f, G, gsz)
    r1, r2 = Ref.params(wg, fmt, mode)
    s1 = q.scales.double().numpy().T  # [out, G]
    s2 = s1 if mode == "sym" else q.scales2.double().numpy().T
    # Stored scales are the formula's value rounded to fp16 (one fp16 ulp of double rounding allowed).
    np.testing.assert_allclose(s1, _f16(r1), rtol=2**-10, atol=2**-24)
    if mode == "zp":
        assert ((s2 == np.round(s2)) & (s2 >= 0) & (s2 <= get_format(fmt).range)).all()
        near_half = _z_near_half(wg, r1)
        np.testing.assert_array_equal(s2[~near_half], r2[~near_half])  # z = round(-xmin / s)
    else:
        np.testing.assert_allclose(s2, _f16(r2), rtol=2**-10, atol=2**-24)
    # Codes: nearest given the stored parameters.
    ref_codes = Ref.encode(wg, fmt, mode, s1[..., None], s2[..., None])
    _ok_or_near_tie(wg, fmt, mode, s1[..., None], s2[..., None], q.codes.numpy().reshape(out_f, G, gsz).astype(np.int64), ref_codes)
    # Decoded values.
    expect = Ref.decode(q.codes.numpy().astype(np.int64).reshape(out_f, G, gsz), fmt, mode, s1[..., None], s2[..., None])
    deq = q.dequantize().double().numpy().reshape(out_f, G, gsz)
    np.testing.assert_allclose(deq, expect, rtol=2**-21, atol=1e-6)
    fq = fake_quantize(torch.from_numpy(w), fmt, gs, mode)
    assert fq.dtype == torch.float32
    np.testing.assert_allclose(fq.double().numpy().reshape(out_f, G, gsz), expect, rtol=2**-21, atol=1e-6)
    assert np.isfinite(deq).all()


@pytest.mark.parametrize("fmt,mode", CASES)
def test_special_groups_never_nan(fmt, mode):
    """All-positive, all-negative, all-zero, single-element and tiny groups: finite, sane."""
    rows = [
        [0.5, 1.0, 2.0, 3.0],
        [-0.5, -1.0, -2.0, -3.0],
        [0.0, 0.0, 0.0, 0.0],
        [0.0, 0.0, 0.0, 7.0],
        [-7.0, 0.0, 0.0, 0.0],
        [1e-30, -1e-30, 0.0, 1e-30],  # scales underflow fp16 to 0
        [1e-6, 2e-6, -3e-6, 0.0],  # fp16 subnormal scales
        [-0.0, -0.0, 0.0, -0.0],
    ]
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        w = torch.tensor(rows, dtype=dtype)
        for gs in (-1, 1, 2):
            fq = fake_quantize(w, fmt, gs, mode)
            assert fq.dtype == dtype
            assert torch.isfinite(fq).all(), (fmt, mode, dtype, gs)
            q = quantize_weight(w, fmt, gs, mode)
            assert torch.isfinite(q.scales.float()).all()
            if q.scales2 is not None:
                assert torch.isfinite(q.scales2.float()).all()
            assert torch.equal(fq, q.dequantize(dtype))
            # Zero weights stay exactly zero.
            assert (fq.float()[w.float() == 0] == 0).all(), (fmt, mode, dtype, gs)
            # No weight changes sign.
            assert (fq.float() * w.float() >= 0).all(), (fmt, mode, dtype, gs)


@pytest.mark.parametrize("fmt,mode", CASES)
def test_group_size_one_is_nearly_lossless(fmt, mode):
    """One weight per group: its own extreme maps to the grid end, up to fp16 scale rounding
    (the zero-point grids on positive-only NF/FP need 0 on the grid: z = 0 there)."""
    g = np.random.default_rng(3)
    w = g.choice([-1.0, 1.0], (8, 16)) * g.uniform(0.1, 3.0, (8, 16))  # fp16 scales stay normal
    w = torch.from_numpy(w.astype(np.float32))
    fq = fake_quantize(w, fmt, 1, mode).double()
    np.testing.assert_allclose(fq.numpy(), w.double().numpy(), rtol=2**-10, atol=1e-7)


@pytest.mark.parametrize("fmt,mode", CASES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_input_dtypes(fmt, mode, dtype):
    """fp16/bf16 inputs: same result as quantizing their float64 values; output in the input dtype."""
    w32 = torch.from_numpy(np.random.default_rng(4).standard_normal((6, 32)).astype(np.float32))
    w = w32.to(dtype)
    fq = fake_quantize(w, fmt, 16, mode)
    assert fq.dtype == dtype and fq.shape == w.shape
    q = quantize_weight(w, fmt, 16, mode)
    wg = w.double().numpy().reshape(6, 2, 16)
    s1 = q.scales.double().numpy().T[..., None]
    s2 = s1 if mode == "sym" else q.scales2.double().numpy().T[..., None]
    np.testing.assert_allclose(s1[..., 0], _f16(Ref.params(wg, fmt, mode)[0]), rtol=2**-10)
    ref_codes = Ref.encode(wg, fmt, mode, s1, s2)
    _ok_or_near_tie(wg, fmt, mode, s1, s2, q.codes.numpy().reshape(6, 2, 16).astype(np.int64), ref_codes)
    expect = torch.from_numpy(Ref.decode(q.codes.numpy().astype(np.int64).reshape(6, 2, 16), fmt, mode, s1, s2).reshape(6, 32))
    eps = {torch.float16: 2**-10, torch.bfloat16: 2**-7, torch.float32: 2**-21}[dtype]
    torch.testing.assert_close(fq.double(), expect, rtol=eps, atol=1e-6)


# -- errors -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_non_finite_input_names_the_tensor(bad, dtype):
    w = torch.randn(4, 8).to(dtype)
    w[2, 3] = bad
    name = "model.layers.7.mlp.up_proj.weight"
    for fn in (quantize_weight, fake_quantize):
        with pytest.raises(ValueError) as exc:
            fn(w, "nf4", 4, "afpq", name=name)
        assert name in str(exc.value) and "1 non-finite" in str(exc.value)


@pytest.mark.parametrize("gs", [0, -2, 3, 5, 16, 7])
def test_group_size_errors(gs):
    w = torch.randn(2, 8)
    with pytest.raises(ValueError) as exc:
        quantize_weight(w, "fp4", gs, name="blk.w")
    msg = str(exc.value)
    assert "blk.w" in msg and "group_size" in msg and str(gs) in msg and "8" in msg
    with pytest.raises(ValueError, match="group_size"):
        fake_quantize(w, "fp4", gs)


def test_shape_and_dtype_errors():
    with pytest.raises(ValueError, match=r"2-D.*\(8,\)"):
        quantize_weight(torch.randn(8), "nf4", -1, name="vec")
    with pytest.raises(ValueError, match="2-D"):
        quantize_weight(torch.randn(2, 2, 8), "nf4", -1)
    with pytest.raises(ValueError, match="floating"):
        quantize_weight(torch.ones(2, 8, dtype=torch.int32), "nf4", -1)
    with pytest.raises(ValueError, match="unknown format"):
        quantize_weight(torch.randn(2, 8), "fp5", -1)
    with pytest.raises(ValueError, match="does not support mode"):
        quantize_weight(torch.randn(2, 8), "int4", -1, "afpq")


def test_scale_overflow_names_the_tensor():
    w = torch.tensor([[1e6, -1e6, 0.5, 0.25]])
    with pytest.raises(ValueError) as exc:
        quantize_weight(w, "nf4", -1, "afpq", name="huge.weight")
    assert "huge.weight" in str(exc.value) and "float16" in str(exc.value)
    q = quantize_weight(w, "nf4", -1, "afpq", scale_dtype=torch.float32)  # fine in fp32
    assert q.scales.dtype == torch.float32 and q.scales.item() == 1e6
    q = quantize_weight(w, "nf4", -1, "afpq", scale_dtype=torch.bfloat16)
    assert q.scales.dtype == torch.bfloat16
    torch.testing.assert_close(q.dequantize()[0, :2], torch.tensor([1e6, -1e6]), rtol=2**-8, atol=0)


# -- laws ----------------------------------------------------------------------------------------------------
@HYP
@given(w=weights(rows=st.integers(1, 6), cols=st.sampled_from([8, 16, 32])), case=st.sampled_from(CASES),
       gs=st.sampled_from([-1, 4, 8]))
def test_requantize_with_same_scales_is_identity(w, case, gs):
    """encode(decode(codes)) == codes and decode again gives the same weights."""
    fmt, mode = case
    q = quantize_weight(torch.from_numpy(w), fmt, gs, mode)
    out_f, in_f = w.shape
    G = q.scales.shape[0]
    s1 = q.scales.float().t().unsqueeze(-1)
    s2 = s1 if q.scales2 is None else q.scales2.float().t().unsqueeze(-1)
    c = q.codes.reshape(out_f, G, -1)
    w1 = decode(c, fmt, mode, s1, s2)
    c2 = encode(w1, fmt, mode, s1, s2)
    w2 = decode(c2, fmt, mode, s1, s2)
    assert torch.equal(w2, w1)
    assert torch.equal(c2, c)  # the encoder only emits canonical codes (+0, never -0)


def _gauss(seed, rows=64, cols=512):
    return np.random.default_rng(seed).standard_normal((rows, cols)).astype(np.float32)


DISTS = {
    "gauss": lambda: _gauss(10),
    "skewed": lambda: _gauss(11) + 0.7,
    "lognormal": lambda: np.exp(_gauss(12)) - 1.0,
    "laplace": lambda: np.random.default_rng(13).laplace(size=(64, 512)).astype(np.float32),
}


def _mean_group_sqnr(w, fmt, mode, gs):
    fq = fake_quantize(torch.from_numpy(w), fmt, gs, mode).double().numpy()
    g = w.shape[1] if gs == -1 else gs
    return float(_sqnr_db(w.reshape(-1, g), fq.reshape(-1, g)).mean())


@pytest.mark.parametrize("dist", list(DISTS))
@pytest.mark.parametrize("fmt", FPNF)
def test_two_scales_beat_one_scale(dist, fmt):
    """The paper's claim: AFPQ's two scales are never worse than one absmax scale (mean
    group SQNR), on symmetric and on skewed weights, at every group size."""
    w = DISTS[dist]()
    for gs in (32, 128, -1):
        two = _mean_group_sqnr(w, fmt, "afpq", gs)
        one = _mean_group_sqnr(w, fmt, "sym", gs)
        assert two > one, f"{fmt} {dist} g{gs}: afpq {two:.2f} dB <= sym {one:.2f} dB"


@pytest.mark.parametrize("fmt", FPNF)
@pytest.mark.parametrize("dist", ["gauss", "laplace"])
def test_two_scales_beat_scale_plus_zero_point(fmt, dist):
    """The notes: two scales beat the Figure-5 scale + zero-point baseline (zero-mean weights)."""
    w = DISTS[dist]()
    for gs in (64, 128):
        two = _mean_group_sqnr(w, fmt, "afpq", gs)
        zp = _mean_group_sqnr(w, fmt, "zp", gs)
        assert two > zp, f"{fmt} {dist} g{gs}: afpq {two:.2f} dB <= zp {zp:.2f} dB"


# Measured on this seed (mean group SQNR, Gaussian, g64): fp4 afpq 19.98 / sym 19.59,
# nf4 21.25 / 20.79, fp3 13.56 / 12.98, nf3 14.82 / 14.19, int4 20.93, int3 14.31,
# int2 6.91, int8 ~45; floors sit ~0.5 dB below. A regression that breaks the
# rounding or the scales costs several dB.
SQNR_FLOORS = {
    ("fp4", "afpq"): 19.5, ("fp4", "sym"): 19.1,
    ("nf4", "afpq"): 20.75, ("nf4", "sym"): 20.3,
    ("fp3", "afpq"): 13.0, ("fp3", "sym"): 12.5,
    ("nf3", "afpq"): 14.3, ("nf3", "sym"): 13.7,
    ("int4", "zp"): 20.4, ("int3", "zp"): 13.8, ("int2", "zp"): 6.4, ("int8", "zp"): 44.0,
}


@pytest.mark.parametrize("fmt,mode", list(SQNR_FLOORS))
def test_sqnr_floor_gaussian_g64(fmt, mode):
    w = _gauss(20, 128, 1024)
    got = _mean_group_sqnr(w, fmt, mode, 64)
    assert got > SQNR_FLOORS[(fmt, mode)], f"{fmt}/{mode} g64: {got:.2f} dB"
    assert got < SQNR_FLOORS[(fmt, mode)] + 2.0, f"{fmt}/{mode} g64: {got:.2f} dB: floor is stale"


def test_dequantize_weight_with_explicit_default_g_idx_matches():
    w = torch.from_numpy(_gauss(5, 4, 32))
    q = quantize_weight(w, "nf3", 8, "afpq")
    a = dequantize_weight(q.codes, q.scales, q.scales2, None, "nf3", "afpq")
    b = dequantize_weight(q.codes, q.scales, q.scales2, q.g_idx, "nf3", "afpq")
    expect = Ref.decode(q.codes.numpy().astype(np.int64).reshape(4, 4, 8), "nf3", "afpq",
                        q.scales.double().numpy().T[..., None], q.scales2.double().numpy().T[..., None]).reshape(4, 32)
    np.testing.assert_allclose(a.double().numpy(), expect, rtol=2**-22)
    assert torch.equal(a, b)


@pytest.mark.parametrize("fmt,mode", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_fake_quantize_groups_is_decode_of_encode(fmt, mode, dtype):
    """The fused path (grid values straight from the binned encoder) equals decode(encode())."""
    gen = torch.Generator().manual_seed(7)
    x = (torch.randn(96, 32, generator=gen) * 0.05).to(dtype)
    x[0] = x[0].abs()  # no negative weight: s_neg = 0
    x[1] = 0.0
    x[2] = -x[2].abs()
    p1, p2 = round_params(*find_params(x, fmt, mode), mode=mode)
    expect = decode(encode(x, fmt, mode, p1, p2), fmt, mode, p1, p2, dtype)
    got = fake_quantize_groups(x, fmt, mode, p1, p2)
    assert got.dtype == dtype and torch.equal(got, expect)
    # and on every rounding boundary (unit scales): the probes of the nearest-value test
    if not fmt.startswith("int"):
        y = torch.from_numpy(_midpoint_probes(fmt, mode))
        one = torch.ones(())
        z = torch.zeros(()) if mode == "zp" else one
        assert torch.equal(fake_quantize_groups(y, fmt, mode, one, z), decode(encode(y, fmt, mode, one, z), fmt, mode, one, z))


def _on_midpoints(fmt, mode, rows=24, cols=40):
    """Weights on exact rounding midpoints (ties), their float32 neighbours and grid values;
    each row holds the grid's two ends, so the min/max scales are exactly 0.25."""
    grid = np.unique(Ref.grid(fmt, mode))
    if mode == "zp":
        grid = grid - grid.max() / 2  # a range around 0
    mids = (grid[1:] + grid[:-1]) / 2
    vals = np.concatenate([grid, mids, np.nextafter(mids, np.inf), np.nextafter(mids, -np.inf)])
    rng = np.random.default_rng(0)
    w = vals[rng.integers(len(vals), size=(rows, cols))]
    w[:, 0], w[:, 1] = grid.max(), grid.min()
    return torch.from_numpy(w * 0.25).float()


@pytest.mark.parametrize("fmt,mode", CASES)
@pytest.mark.parametrize("search", [None, "mse"])
def test_column_quantizer_is_core_fake_quant(fmt, mode, search):
    """GPTQ's per-column path (bucketize + per-row table) equals fake_quantize bit for bit, ties included."""
    w = _on_midpoints(fmt, mode)
    w[3] = -w[3].abs()  # no positive weight: s_pos = 0
    w[4] = 0.0
    q = ColumnQuantizer(w, fmt, mode, search=search)
    p1, p2 = round_params(*find_params(w, fmt, mode, search=search), mode=mode)
    assert torch.equal(q.p1, p1) and torch.equal(q.p2, p2)
    cols = torch.cat([q(w[:, i : i + 1]) for i in range(w.shape[1])], 1)
    assert torch.equal(cols, fake_quantize(w, fmt, -1, mode, search=search))
    wh = w.half()  # other dtypes: same parameters, result in the input's dtype
    half = torch.cat([q(wh[:, i : i + 1]) for i in range(w.shape[1])], 1)
    assert half.dtype == torch.float16
    assert torch.equal(half, decode(encode(wh, fmt, mode, q.p1, q.p2), fmt, mode, q.p1, q.p2, torch.float16))
    assert torch.equal(q(w), cols)  # a whole block takes the general path, same values
    one = ColumnQuantizer(w, fmt, mode, perchannel=False)  # one group for the whole tensor
    assert torch.equal(one.p1, one.p1[:1].expand_as(one.p1))
    assert torch.equal(one(w[:, :1]), decode(encode(w[:, :1], fmt, mode, one.p1, one.p2), fmt, mode, one.p1, one.p2))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_check_finite_finds_every_bad_value_and_no_false_alarm(dtype):
    """The fast path (a float32 sum) never hides a NaN or Inf, and finite values whose sum
    overflows float32 are not reported (the element-wise check decides)."""
    from afpq_plugins.core.quantize import check_finite

    g = torch.Generator().manual_seed(0)
    x = torch.randn(37, 129, generator=g).to(dtype)
    check_finite(x, "w")
    for pos in (0, 1000, x.numel() - 1):
        for bad in (float("nan"), float("inf"), float("-inf")):
            y = x.clone()
            y.view(-1)[pos] = bad
            with pytest.raises(ValueError, match=r"^w: 1 non-finite value\(s\)"):
                check_finite(y, "w")
    big = torch.full((4, 8), torch.finfo(dtype).max, dtype=dtype)  # finite; its float32 sum is inf
    check_finite(big, "w")
    big[1, 2] = -big[1, 2]
    check_finite(big, "w")
    check_finite(torch.empty(0, 3, dtype=dtype), "w")
