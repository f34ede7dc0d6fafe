"""``benchmarks/bench_cpu.py``: its path table matches the kernel's own settings, its interleaving
helper measures every candidate, and the quick layer run produces the ratios RESULTS quotes.
Timing values are never asserted (speed targets live in the benchmark's output, not in tests)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from _tiny import benchmark_module
import torch

from afpq_plugins.kernels import cpu

ROOT = Path(__file__).resolve().parents[1]
OK, WHY = cpu.available()


@pytest.fixture(scope="module")
def bench():
    with benchmark_module("bench_cpu") as mod:
        yield mod


def test_interleaved_times_every_candidate_in_shuffled_rounds(bench):
    calls = []
    fns = {k: (lambda k=k: calls.append(k)) for k in "abc"}
    t = bench._interleaved(fns, budget_s=0.0, max_rounds=5)
    assert set(t) == set("abc") and all(v >= 0 for v in t.values())
    # warm-up + first timed call + at least 3 rounds, every candidate as often as the others
    assert all(calls.count(k) == calls.count("a") >= 5 for k in "abc")
    rounds = [calls[i:i + 3] for i in range(6, len(calls), 3)]
    assert len({tuple(r) for r in rounds}) > 1 or len(rounds) < 3  # the order is shuffled


@pytest.mark.skipif(not OK, reason=f"native CPU kernel unavailable: {WHY}")
def test_path_table_follows_the_kernel_settings(bench, monkeypatch):
    monkeypatch.setenv("AFPQ_CPU_PREFILL", "fp32")
    reg, _ = cpu.settings(torch.float32, cpu.ISAS[cpu.isa()[0]])
    assert bench.path_of(1, torch.float32) == "gemv" and bench.path_of(reg, torch.float32) == "gemv"
    assert bench.path_of(reg + 1, torch.float32) == "small"
    assert bench.path_of(cpu.SMALL_ROWS + 1, torch.float32) == "mm-fp32"
    monkeypatch.setenv("AFPQ_CPU_PREFILL", "bf16" if cpu.native_bf16() else "auto")
    assert bench.path_of(cpu.SMALL_ROWS + 1, torch.float32) == ("mm-bf16" if cpu.native_bf16() else "mm-fp32")


@pytest.mark.skipif(not OK, reason=f"native CPU kernel unavailable: {WHY}")
def test_quick_layer_run_writes_its_ratios(tmp_path):
    out = tmp_path / "cpu.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_cpu.py"), "--part", "layers", "--quick",
                    "--layer-budget", "0.01", "--json", str(out)], check=True, capture_output=True, text=True,
                   timeout=600)
    res = json.loads(out.read_text())
    assert {"cpu", "isa", "threads", "native bf16", "amx"} <= set(res["machine"])
    rows = res["layers"]["rows"]
    assert {(r["out"], r["in"], r["M"]) for r in rows} >= {(4096, 4096, 1), (576, 1536, 16), (1536, 576, 512)}
    for r in rows:
        assert r["int4/nf4_bf16"] == pytest.approx(r["int4"] / r["nf4_bf16"]) and r["int4/nf4_bf16"] > 0
        assert r["kernel"] == "cpu" and " / " in r["path"]
