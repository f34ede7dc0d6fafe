"""Core's GPTQ quantizer (``afpq_plugins.core.gptq``), without any GPTQ engine: the
``Quantizer`` contract every engine's subclass inherits, and ``encode_gptq`` (codes, decode
and mismatch count from an engine's ``[out, groups]`` parameters and ``g_idx``), checked
against a float64 nearest-grid brute force column by column."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from afpq_plugins.core.formats import get_format
from afpq_plugins.core.gptq import ColumnQuantizer, GridQuantizerMixin, encode_gptq
from afpq_plugins.core.quantize import fake_quantize, find_params, quantize_weight, round_params
from afpq_plugins.core.search import ScaleSearch


class _EngineQuantizer:
    """Stands in for an engine's ``Quantizer`` base (its own attributes and an INT find_params)."""

    def __init__(self, shape=1):
        self.scale = self.zero = None
        self.perchannel = False

    def find_params(self, x, weight=False):  # must be overridden
        raise AssertionError("the engine's INT find_params ran")


class Q(GridQuantizerMixin, _EngineQuantizer):
    def __init__(self, fmt, mode, search=None):
        super().__init__()
        self._grid_init(fmt, mode, torch.float16, search)


def _w(seed=0, rows=24, cols=64):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.05
    w[::3] += 0.03
    w[5] = -w[5].abs()  # no positive weight: s_pos = 0
    return w


def _nearest64(w, fmt, mode, p1, p2):
    """float64 brute force: each weight to the nearest decoded grid value of its group."""
    from afpq_plugins.core.quantize import decode_table

    table = decode_table(fmt, mode, p1, p2).double().numpy()  # [rows, 2**bits]
    wd = w.double().numpy()
    idx = np.abs(wd[:, :, None] - table[:, None, :]).argmin(-1)
    return np.take_along_axis(table, idx, 1)


@pytest.mark.parametrize("fmt,mode", [("nf3", "afpq"), ("fp4", "afpq"), ("nf4", "sym"), ("int3", "zp")])
def test_quantizer_contract_per_group_and_column(fmt, mode):
    w = _w()
    q = Q(fmt, mode)
    assert not q.ready() and torch.equal(q.quantize(w[:, :1]), w[:, :1])
    q.find_params(w[:, :32], weight=True)
    p1, p2 = round_params(*find_params(w[:, :32], fmt, mode), mode=mode)
    assert q.ready() and torch.equal(q.scale, p1) and torch.equal(q.zero, p2)
    cols = torch.cat([q.quantize(w[:, i:i + 1]) for i in range(32)], 1)
    if mode != "zp":  # ties aside, the column path is the float64 nearest grid value
        ref = _nearest64(w[:, :32], fmt, mode, p1[:, 0], p2[:, 0])
        assert np.allclose(cols.double().numpy(), ref, rtol=0, atol=1e-7)
    assert torch.equal(cols, fake_quantize(w[:, :32], fmt, -1, mode))
    with pytest.raises(NotImplementedError):
        q.find_params(w, weight=False)
    with pytest.raises(ValueError, match="has 3 bits, asked for 4"):
        Q("nf3", "afpq")._check_bits(4)


@pytest.mark.parametrize("fmt,mode", [("nf3", "afpq"), ("nf4", "sym"), ("int3", "zp"), ("nf3", "zp")])
def test_column_quantizer_from_params(fmt, mode):
    """Built from given parameters (llm-compressor computes them itself): the same column path as
    the quantizer built from the weights, and the float64 nearest grid value."""
    w = _w(1)
    p1, p2 = round_params(*find_params(w, fmt, mode), mode=mode)
    cq = ColumnQuantizer.from_params(p1[:, 0], p2[:, 0], fmt, mode)  # any shape, one pair per row
    own = ColumnQuantizer(w, fmt, mode, torch.float16)
    assert torch.equal(cq.p1, own.p1) and torch.equal(cq.p2, own.p2)
    cols = torch.cat([cq(w[:, i:i + 1]) for i in range(w.shape[1])], 1)
    assert torch.equal(cols, torch.cat([own(w[:, i:i + 1]) for i in range(w.shape[1])], 1))
    assert torch.equal(cols, fake_quantize(w, fmt, -1, mode))
    if mode != "zp":
        assert np.allclose(cols.double().numpy(), _nearest64(w, fmt, mode, p1[:, 0], p2[:, 0]), rtol=0, atol=1e-7)


@pytest.mark.parametrize("fmt,mode", [("nf3", "afpq"), ("fp4", "afpq"), ("nf4", "sym"), ("nf3", "zp")])
def test_column_path_on_and_beside_the_rounding_thresholds(fmt, mode):
    """Scaled values exactly on each rounding threshold and one float32 step either side: the
    column path picks the same grid value as ``decode(encode())`` (core's encoder)."""
    from afpq_plugins.core.quantize import decode, encode

    f = get_format(fmt)
    t = f.thresholds(mode)
    y = torch.cat([t, torch.nextafter(t, torch.full_like(t, -np.inf)), torch.nextafter(t, torch.full_like(t, np.inf)),
                   torch.tensor([-1e6, 1e6, 0.0, -0.0])])
    ones = torch.ones(y.numel(), 1)
    p2 = torch.zeros_like(ones) if mode == "zp" else ones  # zp: y = x / s + z
    cq = ColumnQuantizer.from_params(ones, p2, fmt, mode)
    x = y.unsqueeze(1)
    want = decode(encode(x, f, mode, ones, p2), f, mode, ones, p2)
    assert torch.equal(cq.column(x), want)


def test_gptq_mse_flag_and_explicit_search():
    q = Q("nf3", "afpq")
    q._gptq_mse(grid=100, maxshrink=0.8, norm=2.4)
    assert q.search == ScaleSearch.gptq_mse(100, 0.8, 2.4) and len(q.search.factors()) == 80
    q2 = Q("nf3", "afpq", search="mse")
    q2._gptq_mse()  # an explicit search wins over the engine's flag
    assert q2.search == ScaleSearch()
    w = _w(1)
    q2.find_params(w[:, :16], weight=True)
    p1, _ = round_params(*find_params(w[:, :16], "nf3", "afpq", search="mse"), mode="afpq")
    assert torch.equal(q2.scale, p1)


@pytest.mark.parametrize("fmt,mode", [("nf3", "afpq"), ("int4", "zp"), ("fp3", "sym")])
def test_encode_gptq_default_and_act_order(fmt, mode):
    w = _w(2, rows=16, cols=64)
    qw = quantize_weight(w, fmt, 16, mode)
    # default g_idx: codes equal RTN's, decode equals the RTN weight, no mismatch
    p2 = qw.scales if qw.scales2 is None else qw.scales2
    wq = qw.dequantize()
    res = encode_gptq(wq, qw.scales.t(), p2.t(), None, fmt, mode, 16)
    assert torch.equal(res.codes, qw.codes) and torch.equal(res.decoded, wq) and res.mismatches == 0
    # act-order: a permuted g_idx; each column uses its own group's parameters
    g_idx = torch.randperm(64, generator=torch.Generator().manual_seed(0)) // 16
    s1, s2 = qw.scales.float().t(), p2.float().t()  # [out, groups]
    ref = torch.stack([torch.from_numpy(_nearest64(w[:, i:i + 1], fmt, mode, s1[:, g_idx[i]], s2[:, g_idx[i]]))[:, 0]
                       for i in range(64)], 1).float()
    res = encode_gptq(ref, s1, s2, g_idx, fmt, mode, 16)
    assert res.mismatches == 0 and torch.equal(res.decoded, ref) and torch.equal(res.g_idx, g_idx)
    # a weight off the grid is counted
    off = ref.clone()
    off[0, 0] += 1e-3
    assert encode_gptq(off, s1, s2, g_idx, fmt, mode, 16).mismatches == 1
    assert res.codes.dtype == torch.uint8 and int(res.codes.max()) < 2 ** get_format(fmt).bits
