"""The pure helpers of ``benchmarks/bench_engine_time.py`` (run order, medians, ratios, table, JSON)
against hand-computed cases; no engine is imported."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from _tiny import benchmark_module



@pytest.fixture(scope="module")
def bench():
    with benchmark_module("bench_engine_time") as mod:
        yield mod


def test_run_order_alternates_who_goes_first(bench):
    v = ("int-stock", "nf3-afpq", "int-core")
    assert bench.run_order(0, v) == ["int-stock", "nf3-afpq", "int-core"]
    assert bench.run_order(1, v) == ["int-core", "nf3-afpq", "int-stock"]
    assert bench.run_order(2, v) == bench.run_order(0, v)
    # over two repeats stock INT and AFPQ each go before the other once
    o0, o1 = bench.run_order(0, v), bench.run_order(1, v)
    assert o0.index("int-stock") < o0.index("nf3-afpq") and o1.index("nf3-afpq") < o1.index("int-stock")


def test_summarize_medians_and_ratios_hand_computed(bench):
    times = {"int-stock": [10.0, 12.0], "nf3-afpq": [13.0, 9.0, 14.0], "int-core": [11.0, 10.0, 20.0, 12.0]}
    res = bench.summarize(times)
    # medians by hand: (10+12)/2 = 11; middle of 9,13,14 = 13; (11+12)/2 = 11.5
    assert res["median_s"] == {"int-stock": 11.0, "nf3-afpq": 13.0, "int-core": 11.5}
    assert res["ratio_vs_stock"] == pytest.approx(13.0 / 11.0)
    assert res["ratio_vs_core"] == pytest.approx(13.0 / 11.5)
    assert res["runs_s"] == times and res["runs_s"] is not times


def test_summarize_missing_variant_and_empty_runs(bench):
    res = bench.summarize({"int-stock": [2.0], "nf3-afpq": [3.0]})
    assert res["ratio_vs_stock"] == pytest.approx(1.5) and res["ratio_vs_core"] is None
    with pytest.raises(ValueError, match="int-core"):
        bench.summarize({"int-stock": [1.0], "int-core": []})


def test_format_table_marks_ratios_over_the_target(bench):
    results = {
        "gptqmodel-gptq": dict(bench.summarize({"int-stock": [10.0], "nf3-afpq": [12.0], "int-core": [11.0]}), layers=30),
        "llmcompressor-gptq": bench.summarize({"int-stock": [20.0], "nf3-afpq": [22.0]}),
    }
    lines = bench.format_table(results, target=1.15).splitlines()
    assert len(lines) == 4
    assert lines[0].startswith("| engine | method |")
    # 12/10 = 1.20 is over 1.15; 12/11 = 1.09 is not
    assert lines[2] == "| gptqmodel | gptq | 30 | 10.0 | 11.0 | 12.0 | 1.20 (over) | 1.09 |"
    assert lines[3] == "| llmcompressor | gptq | - | 20.0 | - | 22.0 | 1.10 | - |"


def test_write_json_atomic_round_trip_leaves_no_temp(bench, tmp_path):
    path = tmp_path / "sub" / "t.json"
    bench.write_json_atomic(str(path), {"a": [1.5, 2]})
    bench.write_json_atomic(str(path), {"b": 1})
    assert json.loads(path.read_text()) == {"b": 1}
    assert [p.name for p in path.parent.iterdir()] == ["t.json"]


def test_truncate_keeps_first_layers_and_checks_range(bench):
    m = SimpleNamespace(model=SimpleNamespace(layers=[0, 1, 2, 3]),
                        config=SimpleNamespace(num_hidden_layers=4, layer_types=["a", "b", "c", "d"]))
    assert bench.truncate(m, 2) is m
    assert m.model.layers == [0, 1] and m.config.num_hidden_layers == 2 and m.config.layer_types == ["a", "b"]
    with pytest.raises(ValueError, match="--layers"):
        bench.truncate(m, 3)
    with pytest.raises(ValueError, match="--layers"):
        bench.truncate(m, 0)


def test_fixed_calibration_clones_cut_windows_and_survives_resolved(bench):
    import torch

    from afpq_plugins.methods import get_method

    windows = [torch.arange(10) + 100 * i for i in range(3)]
    cal = bench.fixed_calibration(windows)
    assert (cal.nsamples, cal.seqlen) == (3, 10)
    small = bench.fixed_calibration(windows, 2, 4)
    got = small.samples(None)
    assert [g.tolist() for g in got] == [[0, 1, 2, 3], [100, 101, 102, 103]]
    got[0][0] = -1  # clones: the windows are untouched
    assert windows[0][0] == 0
    # the registry resolves a calibration with dataclasses.replace: the windows must come along
    res = small.resolved(get_method("rtn"))
    assert type(res) is type(small) and [g.tolist() for g in res.samples(None)] == [[0, 1, 2, 3], [100, 101, 102, 103]]


def test_parse_layers_all_and_per_engine(bench):
    eng = ["gptqmodel-gptq", "gptqmodel-awq", "llmcompressor-gptq"]
    assert bench.parse_layers(None, eng) == dict.fromkeys(eng)
    assert bench.parse_layers(["4"], eng) == dict.fromkeys(eng, 4)
    assert bench.parse_layers(["gptqmodel-awq=1", "llmcompressor-gptq=2"], eng) == {
        "gptqmodel-gptq": None, "gptqmodel-awq": 1, "llmcompressor-gptq": 2}
    # later items win; an engine not being run is accepted and ignored
    assert bench.parse_layers(["3", "gptqmodel-awq=1"], eng[:2]) == {"gptqmodel-gptq": 3, "gptqmodel-awq": 1}
    assert bench.parse_layers(["llmcompressor-gptq=2"], eng[:1]) == {"gptqmodel-gptq": None}
    for bad, msg in (("x", "ENGINE=K"), ("0", ">= 1"), ("vllm-gptq=2", "unknown engine"), ("gptqmodel-awq=", "ENGINE=K")):
        with pytest.raises(ValueError, match=msg):
            bench.parse_layers([bad], eng)


def test_fixed_stock_variant_adds_its_columns(bench):
    res = bench.summarize({"int-stock": [40.0], "int-stock-fixed": [10.0], "nf3-afpq": [11.0], "int-core": [10.0]})
    assert res["ratio_vs_stock"] == pytest.approx(11.0 / 40.0)
    assert res["ratio_vs_stock_fixed"] == pytest.approx(1.1)
    lines = bench.format_table({"gptqmodel-awq": dict(res, layers=1),
                                "gptqmodel-gptq": bench.summarize({"int-stock": [2.0], "nf3-afpq": [2.0]})}).splitlines()
    assert lines[0] == ("| engine | method | layers | int-stock s | int-stock-fixed s | int-core s | nf3-afpq s | "
                        "AFPQ / stock INT | AFPQ / stock INT fixed | AFPQ / core INT |")
    assert lines[1] == "|" + "---|" * 10
    assert lines[2] == "| gptqmodel | awq | 1 | 40.0 | 10.0 | 10.0 | 11.0 | 0.28 | 1.10 | 1.10 |"
    assert lines[3] == "| gptqmodel | gptq | - | 2.0 | - | - | 2.0 | 1.00 | - | - |"
