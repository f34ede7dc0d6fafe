"""``AFPQQuantizer`` / ``AFPQGPTQ`` against core, on single layers (no model).

* ``find_params`` stores exactly core's ``find_params`` + ``round_params`` (s_pos in
  ``.scale``, s_neg in ``.zero``) and ``quantize`` is core's encode/decode;
* with an identity Hessian GPTQ has no error feedback, so every grouping (plain,
  static groups, act-order) must give core's round-to-nearest result bit for bit;
* with a real Hessian GPTQ must lower the layer's output error below RTN's;
* the CLI's ``--method gptq`` writes a checkpoint that ``afpq eval`` reads.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

with warnings.catch_warnings(record=True):
    pytest.importorskip("auto_gptq")
    import afpq_plugins.autogptq as A

from afpq_plugins.core.quantize import fake_quantize, find_params, quantize_weight, round_params
from afpq_plugins.core.search import ScaleSearch

FORMATS = [("nf3", "afpq"), ("fp4", "afpq"), ("nf4", "sym"), ("int3", "zp"), ("fp3", "afpq")]


@pytest.mark.parametrize("fmt,mode", FORMATS)
def test_find_params_and_quantize_are_core(fmt, mode):
    torch.manual_seed(0)
    w = torch.randn(48, 32)
    w[3] = -w[3].abs()  # a row without positive weights: s_pos = 0 is valid
    w[4] = 0.0
    q = A.AFPQQuantizer(fmt=fmt, mode=mode)
    q.configure(int(fmt[-1]), perchannel=True, sym=mode == "sym")
    assert not q.ready()
    q.find_params(w, weight=True)
    assert q.ready()
    p1, p2 = round_params(*find_params(w, fmt, mode), mode=mode)
    assert torch.equal(q.scale, p1) and torch.equal(q.zero, p2)
    cols = torch.stack([q.quantize(w[:, i : i + 1]).flatten() for i in range(w.shape[1])], 1)
    assert torch.equal(cols, fake_quantize(w, fmt, -1, mode))
    assert torch.isfinite(cols).all()


def _gptq(layer, fmt, mode, H):
    g = A.AFPQGPTQ.bind(fmt, mode, torch.float16)(layer)
    g.quantizer.configure(int(fmt[-1]), perchannel=True, sym=mode == "sym")
    g.H = H.clone()
    g.nsamples = 1
    return g


@pytest.mark.parametrize("fmt,mode", FORMATS)
@pytest.mark.parametrize("grouping", ["plain", "static", "act", "static-act", "row"])
def test_identity_hessian_gives_core_rtn(fmt, mode, grouping):
    torch.manual_seed(1)
    layer = nn.Linear(64, 40, bias=False)
    w = layer.weight.data.clone()
    gs = -1 if grouping == "row" else 16
    g = _gptq(layer, fmt, mode, torch.eye(64))
    from afpq_plugins.autogptq import compat

    with compat.no_cuda_synchronize():
        scale, zero, g_idx = g.fasterquant(group_size=gs, actorder="act" in grouping, static_groups="static" in grouping)
    if grouping == "act":
        # Act-order groups the columns in GPTQ's order (argsort of the Hessian diagonal).
        perm = torch.argsort(torch.diag(torch.eye(64)), descending=True)
        expect = fake_quantize(w[:, perm], fmt, gs, mode)[:, torch.argsort(perm)]
    else:
        expect = fake_quantize(w, fmt, gs, mode)
    assert torch.equal(layer.weight.data, expect)
    qw = quantize_weight(w, fmt, gs, mode)
    if "act" not in grouping or "static" in grouping:
        # Plain order (or static groups): GPTQ's per-group parameters are core's.
        assert torch.equal(scale.t().half(), qw.scales)
        if qw.scales2 is not None:
            assert torch.equal(zero.t().half(), qw.scales2)
    ql = A.quant_linear_class(fmt, A.AFPQQuantizeConfig(bits=int(fmt[-1]), fmt=fmt, mode=mode).mode, torch.float16)(
        int(fmt[-1]), gs, 64, 40, False, weight_dtype=torch.float32)
    ql.pack(layer, scale, zero, g_idx)
    assert ql.pack_mismatches == 0
    assert torch.equal(ql.dequantize(), layer.weight.data)


@pytest.mark.parametrize("fmt,mode", [("nf3", "afpq"), ("fp3", "afpq"), ("nf4", "sym")])
def test_gptq_beats_rtn_on_layer_output(fmt, mode):
    torch.manual_seed(2)
    layer = nn.Linear(128, 64, bias=False)
    x = torch.randn(512, 128) @ torch.randn(128, 128) * 0.3  # correlated inputs
    H = 2 * x.t() @ x / x.shape[0]
    w = layer.weight.data.clone()
    g = _gptq(layer, fmt, mode, H)
    from afpq_plugins.autogptq import compat

    with compat.no_cuda_synchronize():
        g.fasterquant(group_size=32)
    err_gptq = ((x @ layer.weight.data.t() - x @ w.t()) ** 2).mean()
    err_rtn = ((x @ fake_quantize(w, fmt, 32, mode).t() - x @ w.t()) ** 2).mean()
    assert err_gptq < 0.9 * err_rtn


def test_config_validation():
    with pytest.raises(ValueError, match="bits"):
        A.AFPQQuantizeConfig(bits=4, fmt="nf3")
    assert A.AFPQQuantizeConfig(bits=3, fmt="nf3").mode == "afpq"
    assert A.AFPQQuantizeConfig(bits=3, fmt="nf3", sym=True).mode == "sym"
    assert A.AFPQQuantizeConfig(bits=3, fmt="int3").mode == "zp"
    with pytest.raises(ValueError):
        A.AFPQQuantizeConfig(bits=3, fmt="int3", mode="afpq")
    with pytest.raises(NotImplementedError):
        A.AFPQQuantizer(fmt="nf3").configure(3, perchannel=True, trits=True)
    with pytest.raises(ValueError, match="scale_search"):
        A.AFPQQuantizeConfig(bits=3, fmt="nf3", scale_search="best")
    cfg = A.AFPQQuantizeConfig(bits=3, fmt="nf3", scale_search=ScaleSearch(grid=7, min_shrink=0.6))
    back = A.AFPQQuantizeConfig.from_afpq(cfg.to_afpq())
    assert back.scale_search == {"method": "mse", "grid": 7, "min_shrink": 0.6, "norm": 2.0}
    assert A.AFPQQuantizeConfig(bits=3, fmt="nf3").scale_search == {"method": "minmax"}


def test_autogptq_mse_flag_uses_its_own_candidates():
    """``configure(mse=True)`` searches AutoGPTQ's shrink factors 1 - i / grid, i < maxshrink * grid."""
    q = A.AFPQQuantizer(fmt="nf3")
    q.configure(3, perchannel=True, mse=True, norm=2.4, grid=100, maxshrink=0.8)
    expect = [1 - i / 100 for i in range(80)]
    got = q.search.factors()
    assert len(got) == 80 and max(abs(a - b) for a, b in zip(got, expect)) < 1e-12
    assert q.search.norm == 2.4


@pytest.mark.parametrize("fmt,mode", [("nf3", "afpq"), ("fp4", "afpq"), ("int3", "zp")])
def test_identity_hessian_with_scale_search_gives_core_search(fmt, mode):
    torch.manual_seed(3)
    layer = nn.Linear(64, 40, bias=False)
    w = layer.weight.data.clone()
    g = A.AFPQGPTQ.bind(fmt, mode, torch.float16, "mse")(layer)
    g.quantizer.configure(int(fmt[-1]), perchannel=True, sym=False)
    g.H = torch.eye(64)
    g.nsamples = 1
    from afpq_plugins.autogptq import compat

    with compat.no_cuda_synchronize():
        g.fasterquant(group_size=16)
    assert torch.equal(layer.weight.data, fake_quantize(w, fmt, 16, mode, search="mse"))
    assert not torch.equal(layer.weight.data, fake_quantize(w, fmt, 16, mode))  # the search changed something


def test_cli_gptq_quantize_then_eval(tmp_path, capsys):
    from _tiny import tiny_llama_folder

    from afpq_plugins.cli import main

    src = tiny_llama_folder(str(tmp_path / "m"))
    out = str(tmp_path / "q")
    rc = main(["quantize", src, out, "--method", "gptq", "--format", "nf3", "--group-size", "32", "--desc-act",
               "--nsamples", "4", "--calib-seqlen", "64", "--scale-search", "mse", "--quiet"])
    assert rc == 0
    import json

    with open(f"{out}/config.json", encoding="utf-8") as fh:
        qc = json.load(fh)["quantization_config"]
    assert (qc["method"], qc["format"], qc["desc_act"], qc["layout"]) == ("gptq", "nf3", True, "gptq")
    assert qc["scale_search"]["method"] == "mse"
    capsys.readouterr()
    assert main(["eval", out, "--seqlen", "32", "--windows", "2", "--json", "--quiet"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["kind"] == "afpq" and res["ppl"] > 0
