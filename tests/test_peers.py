"""Peer formats against hand-computed cases. NVFP4/MXFP4 need no package; the
bitsandbytes and HQQ cases skip cleanly where the package is missing."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from afpq_plugins.study.peers import (
    PEERS,
    apply_peer,
    bits_per_weight,
    mxfp4_fake_quantize,
    nvfp4_fake_quantize,
    peer_available,
    round_e2m1,
    round_e4m3,
)


def test_round_e2m1_hand_cases_and_ties_to_even():
    y = torch.tensor([0.0, 0.25, 0.26, 0.75, 1.2, 1.25, 1.75, 2.5, 3.5, 5.0, 5.01, 7.0, -0.25, -2.5, -1.3, 100.0])
    want = torch.tensor([0.0, 0.0, 0.5, 1.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0, 6.0, -0.0, -2.0, -1.5, 6.0])
    torch.testing.assert_close(round_e2m1(y), want, rtol=0, atol=0)


def test_round_e2m1_against_float64_nearest():
    mags = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6], dtype=np.float64)
    y = torch.linspace(-7, 7, 2001)
    a = np.minimum(np.abs(y.double().numpy()), 6.0)
    d = np.abs(a[:, None] - mags)
    best = d.min(1, keepdims=True)
    cand = np.where(d == best, np.arange(8), 99)
    # nearest; on a tie the even index (the even code)
    idx = np.where((cand % 2 == 0) & (cand < 99), cand, 99).min(1)
    idx = np.where(idx == 99, cand.min(1), idx)
    want = np.copysign(mags[idx], y.double().numpy())
    np.testing.assert_array_equal(round_e2m1(y).double().numpy(), want)


def test_round_e4m3_hand_cases():
    x = torch.tensor([448.0, 500.0, 112.0, 74.6667, 0.1, 17.0])
    # 74.67: E4M3 step at [64, 128) is 8 -> 72; 0.1 -> 0.1015625 (13 * 2**-7); 17 -> 16 (step 2, tie to even)
    want = torch.tensor([448.0, 448.0, 112.0, 72.0, 0.1015625, 16.0])
    torch.testing.assert_close(round_e4m3(x), want, rtol=0, atol=0)


def test_nvfp4_hand_case():
    w = torch.zeros(1, 48)
    w[0, :8] = torch.tensor([6.0, 3.0, -1.2, 0.26, 0.25, 0.75, 2.5, 5.0])
    w[0, 16:20] = torch.tensor([1.5, 0.3, -0.7, 0.1])
    w[0, 32:34] = torch.tensor([1.0, 0.5])
    got = nvfp4_fake_quantize(w)
    # tensor amax 6 -> global = 6 / (6 * 448) = 1/448
    # block 0: amax 6 -> E4M3(448) = 448 -> effective scale 1
    want = torch.zeros(1, 48)
    want[0, :8] = torch.tensor([6.0, 3.0, -1.0, 0.5, 0.0, 1.0, 2.0, 4.0])
    # block 1: amax 1.5 -> E4M3(112) = 112 -> scale 0.25: 6, 1.2->1, -2.8->-3, 0.4->0.5
    want[0, 16:20] = torch.tensor([1.5, 0.25, -0.75, 0.125])
    # block 2: amax 1 -> 74.67 rounds to E4M3 72 -> scale 72/448: 6.22 saturates to 6, 3.11 -> 3
    want[0, 32:34] = torch.tensor([6 * 72 / 448, 3 * 72 / 448])
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    assert torch.equal(nvfp4_fake_quantize(torch.zeros(2, 16)), torch.zeros(2, 16))
    with pytest.raises(ValueError, match="blk.q: .*multiple of 16"):
        nvfp4_fake_quantize(torch.ones(2, 20), name="blk.q")


def test_mxfp4_hand_case():
    w = torch.zeros(2, 32)
    w[0, :7] = torch.tensor([7.0, 5.0, -2.5, 0.75, 0.25, 1.25, 3.5])  # amax 7: 2**(2-2) = 1
    w[1, :3] = torch.tensor([0.3, -0.1, 0.02])  # amax 0.3: floor(log2 0.3) = -2 -> 2**-4
    want = torch.zeros(2, 32)
    want[0, :7] = torch.tensor([6.0, 4.0, -2.0, 1.0, 0.0, 1.0, 4.0])
    want[1, :3] = torch.tensor([4 * 0.0625, -1.5 * 0.0625, 0.5 * 0.0625])
    torch.testing.assert_close(mxfp4_fake_quantize(w), want, rtol=0, atol=0)
    p2 = torch.zeros(1, 32)
    p2[0, 0], p2[0, 1] = 4.0, -3.0  # amax a power of two: scale 2**(2-2) = 1, exact
    torch.testing.assert_close(mxfp4_fake_quantize(p2), p2, rtol=0, atol=0)
    assert torch.equal(mxfp4_fake_quantize(torch.zeros(1, 32)), torch.zeros(1, 32))


def test_bits_per_weight_hand_counts():
    assert bits_per_weight("nvfp4") == 4.5
    assert bits_per_weight("mxfp4") == 4.25
    assert bits_per_weight("bnb-nf4") == 4.5
    assert bits_per_weight("bnb-nf4-dq") == 4 + 8 / 64 + 32 / 16384
    assert bits_per_weight("hqq4") == 4.5 and bits_per_weight("hqq3") == 3.5
    assert bits_per_weight("afpq", 3, 64) == 3.5 and bits_per_weight("afpq", 4, 192) == 4 + 1 / 6
    assert bits_per_weight("zp", 4, 64) == 4 + 20 / 64 and bits_per_weight("sym", 3, 32) == 3.5
    assert bits_per_weight("afpq", 4, -1, in_features=576) == 4 + 32 / 576
    assert bits_per_weight("nvfp4", numel=64) == 4.5 + 0.5
    with pytest.raises(ValueError, match="unknown kind"):
        bits_per_weight("int5")


needs_bnb = pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes not installed")
needs_hqq = pytest.mark.skipif(importlib.util.find_spec("hqq") is None, reason="hqq not installed")


@needs_bnb
def test_bnb_nf4_hand_case():
    from afpq_plugins.core.formats import get_format

    nf4 = get_format("nf4").sorted_values  # the same NF4 table bitsandbytes uses
    w = torch.zeros(2, 64)
    w[0, :5] = torch.tensor([2.0, -2.0, 1.0, 0.0, 0.2])  # absmax 2: 0.5 -> 0.4407, 0.1 -> 0.0796
    w[1, :2] = torch.tensor([-0.5, 0.25])  # absmax 0.5: -1, 0.5 -> 0.4407
    want = torch.zeros(2, 64)
    want[0, :5] = torch.tensor([2.0, -2.0, 2 * nf4[12], 0.0, 2 * nf4[8]])
    want[1, :2] = torch.tensor([-0.5, 0.5 * nf4[12]])
    got = PEERS["bnb-nf4"].fn(w, "w")
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    # double quant: the absmax itself is 8-bit quantized (around the mean absmax): the same
    # codes, times one slightly different scale per block (within 2 % here)
    dq = PEERS["bnb-nf4-dq"].fn(w, "w")
    for r in range(2):
        nz = want[r] != 0
        ratio = dq[r][nz] / want[r][nz]
        torch.testing.assert_close(ratio, ratio[:1].expand_as(ratio), rtol=1e-6, atol=0)
        assert abs(ratio[0].item() - 1) < 0.02
        assert torch.equal(dq[r][~nz], want[r][~nz])


@needs_hqq
@pytest.mark.parametrize("bits", [3, 4])
def test_hqq_reproduces_a_uniform_ramp_and_stays_on_its_grid(bits):
    n = 1 << bits
    ramp = torch.arange(n, dtype=torch.float32) * 0.125 - 0.5  # exactly 2**bits evenly spaced levels
    w = torch.cat([ramp.repeat(64 // n), ramp.flip(0).repeat(64 // n)]).reshape(2, 64)
    got = PEERS[f"hqq{bits}"].fn(w, "w")
    torch.testing.assert_close(got, w, rtol=0, atol=2e-3)  # float16 scale/zero
    g = torch.Generator().manual_seed(0)
    r = torch.randn(3, 128, generator=g)
    q = PEERS[f"hqq{bits}"].fn(r, "w").reshape(-1, 64)
    assert all(len(torch.unique(row)) <= n for row in q)  # at most 2**bits levels per group of 64


def test_apply_peer_and_availability():
    torch.manual_seed(0)
    lin = torch.nn.Linear(32, 4, bias=False)
    model = torch.nn.Module()
    model.proj, model.lm_head = lin, torch.nn.Linear(32, 4, bias=False)
    before = model.lm_head.weight.clone()
    want = mxfp4_fake_quantize(lin.weight.detach())
    apply_peer(model, "mxfp4")
    torch.testing.assert_close(lin.weight.detach(), want, rtol=0, atol=0)
    assert torch.equal(model.lm_head.weight, before)  # lm_head is skipped, as in the study's RTN
    assert peer_available("nvfp4") is None
    with pytest.raises(ValueError, match="unknown peer"):
        apply_peer(model, "fp8")


def test_peers_table_states_the_winner_per_budget():
    from afpq_plugins.study.peers import peers_table

    def cell(method, fmt, ppl):
        return {"method": method, "format": fmt, "ppl": ppl}

    cells = {
        "peer/nvfp4/peer/minmax/g16": cell("peer", "nvfp4", 30.0),   # 4.5 bits/weight
        "peer/mxfp4/peer/minmax/g32": cell("peer", "mxfp4", 33.0),   # 4.25
        "peer/hqq3/peer/minmax/g64": cell("peer", "hqq3", 40.0),     # 3.5
        "rtn/nf4/afpq/minmax/g64": cell("rtn", "nf4", 29.0),         # 4.5: beats NVFP4
        "rtn/nf4/sym/minmax/g64": cell("rtn", "nf4", 34.0),          # 4.25: loses to MXFP4
        "rtn/nf3/afpq/minmax/g64": cell("rtn", "nf3", 45.0),         # 3.5: loses to HQQ3
        "rtn/nf3/afpq/output/g64": cell("rtn", "nf3", 38.0),         # 3.5, calibrated: wins
    }
    t = peers_table({"cells": cells, "fp32": {"ppl": 20.0}})
    lines = t.splitlines()
    assert "| peer: NVFP4 (E2M1, E4M3 scale / 16, FP32 / tensor) | 4.500 | no | 30.00 |" in lines
    assert "| NF3 AFPQ g64 + output search | 3.500 | yes (8 x 256 tokens) | 38.00 |" in lines
    win = [x for x in lines if x.startswith("- within")]
    assert win[0] == "- within 4.250 bits/weight: **MXFP4 (E2M1, E8M0 scale / 32)** (33.00)"  # no AFPQ row that cheap
    assert any("within 4.500" in x and "**NF4 AFPQ g64 (two fp16 scales)** (29.00)" in x and "AFPQ wins" in x
               for x in win)
    three = [x for x in win if "within 3.500" in x][0]
    assert "**NF3 AFPQ g64 + output search** (38.00)" in three and "without calibration: **HQQ 3-bit g64** (40.00)" in three
    assert "AFPQ wins" in three  # the best AFPQ row (calibrated) beats HQQ3
    assert peers_table({"cells": {"rtn/nf4/afpq/minmax/g64": cells["rtn/nf4/afpq/minmax/g64"]}}) == ""
