"""The CPU dry run of ``benchmarks/gpu_check.py`` (Triton interpreter, tiny shapes).

Keeps the one-shot GPU script alive on CPU-only CI: it must run end to end and its
correctness figures must hold. References: every kernel row's error is measured by the
script against a float64 product with the exactly decoded weight, and the end-to-end
AFPQ model through the Triton kernels is compared with the same model through the torch
reference kernel; here those figures are checked, and the report's tables are present.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# Not imported here: importing triton in this process would decide "compiled, not
# interpreted" for test_triton_kernels.py run after this module.
if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_dry_run(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p),
               CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    env.pop("OUT", None)
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--dry-run", "--out", str(tmp_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    res = json.loads((tmp_path / "gpu_check.json").read_text())
    assert res["dry_run"] is True
    # The CUDA test selection still collects tests (a rename would silently run nothing on the GPU).
    assert res["tests"]["returncode"] == 0 and "collected" in res["tests"]["summary"]
    assert not res["tests"]["summary"].startswith("0/")

    rows = res["kernels"]["rows"]
    assert {(r["fmt"], r["M"]) for r in rows} == {("nf4", 1), ("nf4", 17), ("fp4", 1), ("nf3", 1)}
    for r in rows:
        what = f"{r['fmt']} M={r['M']}"
        assert r["rel_err"] < 3e-3 and r["rel_err_bf16"] < 2.5e-2, what  # fp16 / bf16 rounding only
        assert r["errors"] == {} or set(r["errors"]) == {"int4"}, (what, r["errors"])  # INT4 may lack a CPU build
        assert r["afpq_us"] > 0 and r["fp16_us"] > 0 and r["torch_ref_us"] > 0, what
    assert [r["plan"]["path"] for r in rows if r["fmt"] == "nf4"] == ["gemv", "gemm"]

    sweep = res["sweeps"][0]["results"]
    assert len(sweep) == 2 and all(c["us"] and c["rel_err"] < 3e-3 for c in sweep), sweep

    dec = res["decode"]
    assert dec["checks"]["afpq_triton_vs_torch_ref_rel_err"] < 1e-2
    for name in ("fp16", "afpq_nf4"):
        assert dec["variants"][name]["eager"]["tokens_per_s"] > 0, name

    # The CUDA GEMV section: its correctness matrix (the numpy model stands in for the kernel on
    # CPU, checked against float64 by the script), its table rows, its targets.
    cu = res["cuda"]
    assert cu["correctness"]["checked"] >= 8 and cu["correctness"]["failures"] == 0, cu["correctness"]
    assert all(r["within_bound"] and r["model_mismatches"] == 0 for r in cu["correctness"]["rows"] if "model_mismatches" in r)
    assert {(r["fmt"], r["M"]) for r in cu["table"]} == {("nf4", 1), ("nf4", 16)}
    m16 = next(r for r in cu["table"] if r["M"] == 16)
    assert "M > 8" in m16["errors"]["cuda"] and m16["triton_us"] > 0 and m16["fp16_us"] > 0
    assert cu["targets"] and cu["decode_skipped"]

    md = (tmp_path / "gpu_check.md").read_text()
    for heading in ("## Kernels", "## Targets", "## Decode", "## Sweep", "## CUDA GEMV"):
        assert heading in md
    assert (tmp_path / "gpu_check.log").stat().st_size > 0
