"""The accuracy study (``afpq bench accuracy``) on a tiny random model: JSON, resume, settings
keys, markdown layout, plots, errors. Numbers are checked against independent references."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch

pytest.importorskip("transformers")

from test_cli import _reference_ppl, folder, text_file  # noqa: E402,F401  (fixtures and the NLL reference)

from afpq_plugins import study as acc  # noqa: E402
from afpq_plugins.study import plots as study_plots  # noqa: E402
from afpq_plugins.study import run as study_run  # noqa: E402
from afpq_plugins import cli  # noqa: E402


@pytest.fixture(scope="module")
def settings(folder, text_file):
    return acc.Settings(model=folder, eval_text=text_file, seqlen=64, windows=2)


@pytest.fixture(scope="module")
def inputs(settings):
    return acc.load_inputs(settings)


class Counter:
    """A cell runner that counts its calls and returns a made-up perplexity."""

    def __init__(self):
        self.calls = []

    def __call__(self, cell, model, tok, ids, settings):
        self.calls.append(cell.key)
        return {"method": cell.method, "format": cell.fmt, "mode": cell.mode, "scale_search": cell.search or "minmax",
                "bits": cell.bits, "group_size": cell.group_size, "ppl": 10.0 + len(self.calls), "quantize_s": 0, "eval_s": 0}


def test_rtn_cells_match_references(folder, text_file, settings, inputs, tmp_path):
    from afpq_plugins.model import find_linears, quantize_model_rtn

    plan = acc.build_plan(["rtn"], [32], rtn_bits=[3], rtn_rows=[acc.RTN_ROWS[0], acc.RTN_ROWS[6], acc.RTN_ROWS[9]])
    path = str(tmp_path / "r.json")
    sec = acc.run_study(plan, settings, path, inputs=inputs, log=lambda m: None)
    data = json.load(open(path))
    assert list(data["runs"]) == [settings.key()]
    stored = data["runs"][settings.key()]
    assert stored["settings"] == settings.to_dict() and set(stored["cells"]) == {c.key for c in plan}
    ref_fp32, ntok = _reference_ppl(folder, text_file, None, -1, None, 64, 2)  # test_cli's float64 NLL loop
    assert stored["fp32"]["ppl"] == pytest.approx(ref_fp32, rel=1e-4) and stored["fp32"]["tokens"] == ntok == 126
    for cell in plan:
        if cell.search is None:
            ref, _ = _reference_ppl(folder, text_file, cell.fmt, 32, cell.mode, 64, 2)
            assert sec["cells"][cell.key]["ppl"] == pytest.approx(ref, rel=1e-4), cell.key
        # the study's weights are what quantize_model_rtn stores (decoded by AFPQLinear's forward)
        model = inputs[0]
        mine, packed = copy.deepcopy(model), copy.deepcopy(model)
        study_run._rtn(mine, cell, settings)
        quantize_model_rtn(packed, cell.fmt, cell.group_size, cell.mode, progress=False, scale_search=cell.search)
        for name, lin in find_linears(mine).items():
            layer = packed.get_submodule(name)
            with torch.no_grad():
                decoded = layer(torch.eye(lin.in_features)).t()
            torch.testing.assert_close(lin.weight.detach(), decoded, rtol=1e-5, atol=1e-6, msg=f"{cell.key} {name}")


def test_resume_skips_finished_cells(settings, inputs, tmp_path):
    path = str(tmp_path / "r.json")
    plan = acc.build_plan(["rtn"], [32], rtn_bits=[3])
    c1 = Counter()
    acc.run_study(plan, settings, path, inputs=inputs, cell_runner=c1, log=lambda m: None)
    assert c1.calls == [c.key for c in plan] and len(plan) == len(acc.RTN_ROWS)
    c2 = Counter()
    acc.run_study(plan, settings, path, inputs=inputs, cell_runner=c2, log=lambda m: None)
    assert c2.calls == []
    bigger = acc.build_plan(["rtn"], [32, -1], rtn_bits=[3])
    c3 = Counter()
    sec = acc.run_study(bigger, settings, path, inputs=inputs, cell_runner=c3, log=lambda m: None)
    assert c3.calls == [c.key for c in bigger if c.group_size == -1]
    assert sec["cells"][plan[0].key]["ppl"] == 11.0  # the first run's value is kept
    c4 = Counter()  # --max-cells: stops early, the rest follows on the next call
    acc.run_study(acc.build_plan(["rtn"], [64], rtn_bits=[4]), settings, path, inputs=inputs, cell_runner=c4,
                  log=lambda m: None, max_cells=2)
    assert len(c4.calls) == 2


def test_settings_mismatch_is_not_mixed(settings, inputs, tmp_path):
    path = str(tmp_path / "r.json")
    plan = acc.build_plan(["rtn"], [32], rtn_bits=[4], rtn_rows=acc.RTN_ROWS[:2])
    acc.run_study(plan, settings, path, inputs=inputs, cell_runner=Counter(), log=lambda m: None)
    other = acc.Settings(**{**settings.to_dict(), "windows": 1})
    c = Counter()
    sec = acc.run_study(plan, other, path, inputs=inputs, cell_runner=c, log=lambda m: None)
    assert c.calls == [x.key for x in plan]  # nothing reused from the windows=2 run
    data = json.load(open(path))
    assert set(data["runs"]) == {settings.key(), other.key()}
    assert data["runs"][settings.key()]["fp32"]["windows"] == 2 and sec["fp32"]["windows"] == 1
    assert data["runs"][settings.key()]["cells"][plan[0].key]["ppl"] == 11.0


def _section():
    cells = {}

    def put(method, fam, mode, search, bits, g, ppl):
        cells[acc.cell_key(method, f"{fam}{bits}", mode, search, g)] = {
            "method": method, "format": f"{fam}{bits}", "mode": mode, "scale_search": search or "minmax",
            "bits": bits, "group_size": g, "ppl": ppl}

    for g, (i, fs, fa, ns, na, fz, nz, nm) in {-1: (90, 120, 60, 80, 50, 70, 55, 45), 64: (30, 31, 29.5, 30.5, 28, 29, 28.5, 27)}.items():
        put("rtn", "int", "zp", None, 3, g, i)
        put("rtn", "fp", "sym", None, 3, g, fs)
        put("rtn", "fp", "afpq", None, 3, g, fa)
        put("rtn", "nf", "sym", None, 3, g, ns)
        put("rtn", "nf", "afpq", None, 3, g, na)
        put("rtn", "fp", "zp", None, 3, g, fz)
        put("rtn", "nf", "zp", None, 3, g, nz)
        put("rtn", "nf", "afpq", "mse", 3, g, nm)
    put("gptq", "int", "zp", None, 3, 64, 25.0)
    put("gptq", "nf", "afpq", None, 3, 64, 26.0)  # AFPQ loses here
    return {"settings": acc.Settings().to_dict(), "fp32": {"ppl": 20.0, "tokens": 4088}, "cells": cells}


def test_markdown_layout_and_figures():
    sec = _section()
    md = acc.markdown_report(sec, plan=acc.build_plan(["rtn", "gptq"], [64, -1], rtn_bits=[3], calibrated_rows=acc.CALIBRATED_ROWS[:3]))
    assert "Q4_1 GGUF" in md
    lines = md.splitlines()
    i = lines.index("**RTN 3-bit** (perplexity, lower is better; best minmax row per column in bold)")
    assert lines[i + 2:i + 13] == [
        "| format | g-1 | g64 |",
        "|---|---|---|",
        "| fp32 (Q4_1-derived) | 20.00 | 20.00 |",
        "| INT3 (scale + zero) | 90.00 | 30.00 |",
        "| FP3 sym (one scale) | 120.00 | 31.00 |",
        "| FP3 scale + zero-point (Fig. 5) | 70.00 | 29.00 |",
        "| FP3 asym = AFPQ (two scales) | 60.00 | 29.50 |",
        "| NF3 sym (one scale) | 80.00 | 30.50 |",
        "| NF3 scale + zero-point (Fig. 5) | 55.00 | 28.50 |",
        "| NF3 asym = AFPQ (two scales) | **50.00** | **28.00** |",
        "| NF3 AFPQ + scale search | 45.00 | 27.00 |",
    ]
    j = lines.index("**GPTQ 3-bit** (perplexity, lower is better; best minmax row per column in bold)")
    assert lines[j + 2:j + 7] == ["| format | g-1 | g64 |", "|---|---|---|", "| fp32 (Q4_1-derived) | 20.00 | 20.00 |",
                                  "| INT3 (scale + zero) | - | **25.00** |", "| NF3 asym = AFPQ (two scales) | - | 26.00 |"]
    # Figure 5 table: FP AFPQ at g64 (29.5) loses to FP zp (29.0)
    assert "| RTN | 3 | 64 | **29.00** | 31.00 | 29.50 | 28.50 | 30.50 | **28.00** |" in lines
    # scale search: gap closed = (50 - 45) / (50 - 20) = 17 %, (28 - 27) / (28 - 20) = 12.5 % -> +12 or +13
    assert "| RTN | nf3 afpq | -1 | 50.00 | 45.00 | +17% |" in lines
    assert any(x.startswith("| RTN | nf3 afpq | 64 | 28.00 | 27.00 | +1") for x in lines)
    losses = acc.afpq_losses(sec)
    assert losses == ["RTN 3-bit g64: FP3 AFPQ 29.50 vs FP3 scale+zero 29.00",
                      "GPTQ 3-bit g64: NF3 AFPQ 26.00 vs INT3 25.00"]
    missing = [x for x in lines if x.startswith("**Cells not run**")]
    assert missing and missing[0].startswith("**Cells not run**: 8 of 26: rtn/int3/zp/mse/g64,")


def test_gap_closed():
    assert acc.gap_closed(20.0, 50.0, 45.0) == pytest.approx(5 / 30)
    assert acc.gap_closed(20.0, 50.0, 55.0) == pytest.approx(-5 / 30)
    assert acc.gap_closed(20.0, 20.0, 19.0) is None


def test_plan_order_and_quick_subset():
    full = acc.build_plan(groups=acc.FULL["groups"], calibrated_rows=acc.FULL["calibrated_rows"])
    quick = acc.build_plan(groups=acc.QUICK["groups"], calibrated_rows=acc.QUICK["calibrated_rows"])
    assert len(full) == 2 * 4 * len(acc.RTN_ROWS) + 2 * 4 * len(acc.CALIBRATED_ROWS) == 112
    assert len({c.key for c in full}) == len(full)
    assert {c.key for c in quick} <= {c.key for c in full} and len(quick) == 24
    assert [c.method for c in full[:80]] == ["rtn"] * 80 and full[0].group_size == 64
    assert [(c.method, c.fmt, c.mode) for c in full[80:84]] == [("gptq", "int3", "zp"), ("gptq", "nf3", "afpq"),
                                                                ("gptq", "nf3", "sym"), ("gptq", "fp3", "afpq")]
    with_search = acc.build_plan(["gptq", "awq"], [64, -1], search_methods=["gptq"])
    assert [c.key for c in with_search[-2:]] == ["gptq/nf3/afpq/mse/g64", "gptq/nf3/afpq/mse/g-1"]
    assert len(with_search) == 18 and not any(c.search for c in with_search if c.method == "awq")
    with pytest.raises(ValueError, match="gptq and awq only"):
        acc.build_plan(search_methods=["rtn"])


def _is_png(path):
    with open(path, "rb") as fh:
        return fh.read(8) == b"\x89PNG\r\n\x1a\n"


def test_plots_written(tmp_path):
    pytest.importorskip("matplotlib")
    p = acc.plot_results(_section(), str(tmp_path / "a.png"))
    assert _is_png(p) and os.path.getsize(p) > 5000
    torch.manual_seed(0)
    w = torch.randn(8, 128)
    w[3, 64:] *= 0.1
    w[3, 64] = 3.0  # a skewed group: one large positive weight
    info = acc.plot_group_histogram(w, str(tmp_path / "h.png"), layer="x", group_size=64, quantile=1.0)
    assert _is_png(str(tmp_path / "h.png"))
    assert (info["row"], info["group"]) == (3, 1)  # the most skewed group
    g = w[3, 64:]
    # INT3 grid points, computed here: s = (max - min) / 7, z = round(-min / s), points s * (q - z)
    s = (g.max() - min(g.min(), 0)) / 7
    z = torch.round(-min(g.min(), 0) / s)
    ref = (torch.arange(8) - z) * s.half().float()
    pts = study_plots._grid_points(g, "int3", "zp")
    assert torch.allclose(pts, ref, rtol=1e-3, atol=1e-6)
    assert len(study_plots._grid_points(g, "fp3", "sym")) == 7 and len(study_plots._grid_points(g, "fp3", "afpq")) == 7
    assert study_plots._grid_points(g, "fp3", "afpq").max() == pytest.approx(g.max().item(), rel=1e-3)
    assert study_plots._grid_points(g, "fp3", "afpq").min() == pytest.approx(g.min().item(), rel=1e-3)
    assert info["mse"]["fp3/afpq"]["group"] < info["mse"]["fp3/sym"]["group"]


def test_cli_end_to_end_and_resume(folder, text_file, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = str(tmp_path / "acc")
    argv = ["bench", "accuracy", "--methods", "rtn", "--bits", "3", "--group-size", "32", "--model", folder,
            "--text", text_file, "--seqlen", "64", "--windows", "2", "--out", out]
    assert cli.main(argv) == 0
    for ext in (".json", ".md", ".png", "_histogram.png"):
        assert os.path.isfile(out + ext), ext
    md = open(out + ".md").read()
    assert "| INT3 (scale + zero) |" in md and "Q4_1" in md
    capsys.readouterr()
    assert cli.main(argv) == 0
    out2 = capsys.readouterr().out
    assert "13 already in" in out2 and ", 0 to run" in out2  # all 13 cells (3 with the output search) were there
    assert cli.main(argv + ["--report-only", "--no-histogram"]) == 0


def test_bad_arguments(folder, text_file, tmp_path, capsys, settings, inputs):
    base = ["bench", "accuracy", "--model", folder, "--text", text_file, "--seqlen", "64", "--windows", "2",
            "--methods", "rtn", "--out", str(tmp_path / "x"), "--no-histogram"]
    assert cli.main(base + ["--group-size", "48"]) == 2
    assert "group size 48" in capsys.readouterr().err
    assert cli.main(base + ["--bits", "5"]) == 2
    assert "bits must be 3 or 4" in capsys.readouterr().err
    assert cli.main(base + ["--nsamples", "0"]) == 2
    assert "nsamples" in capsys.readouterr().err
    assert cli.main(base + ["--text", str(tmp_path / "nope.txt")]) == 2
    assert "not found" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(base + ["--methods", "qat"])
    with pytest.raises(ValueError, match="unknown method"):
        acc.build_plan(["qat"])
    with pytest.raises(ValueError, match="group size"):
        acc.build_plan(["rtn"], [0])
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]")
    with pytest.raises(ValueError, match="not an accuracy results file"):
        acc.run_study(acc.build_plan(["rtn"], [32]), settings, str(bad), inputs=inputs, log=lambda m: None)
