"""A bits budget through GPTQ (and AWQ) on SmolLM2, paired with the uniform run it competes with.

    PYTHONPATH=. .venv-legacy/bin/python benchmarks/budget_engines_accuracy.py --method gptq --budget 3.5 \
        --out benchmarks/figures/issue24/budget_gptq_3.5.json

The study's settings (first 8 windows of 512 tokens of *Pride and Prejudice*; calibration 8 x 256
tokens of the other novels, seed 0; float16 scales; GPTQ damp 0.01, act-order and true-sequential
off; AWQ clip symmetric), one process, one torch thread, both runs from fresh copies of the same
float model: the uniform NF3 AFPQ g64 + output search cell and ``--bits-budget`` with the output
search (default candidates, fisher objective; AWQ writes the gptq layout). Prints the perplexities
with their standard errors and the paired per-window NLL difference.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from afpq_plugins import data  # noqa: E402
from afpq_plugins.core.spec import QuantSpec  # noqa: E402
from afpq_plugins.evaluate import compare, perplexity  # noqa: E402
from afpq_plugins.methods import Calibration, quantize  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--method", choices=["gptq", "awq"], default="gptq")
    ap.add_argument("--backend", default=None)
    ap.add_argument("--budget", type=float, default=3.5)
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=os.path.join("benchmarks", "out", "budget_engines.json"))
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    model, tok = data.load_model_and_tokenizer(data.resolve_model("default"), torch.float32)
    text = data.load_text(str(data.eval_text_path()))
    calib = Calibration(8, 256, seed=0)
    opts = ({"desc_act": False, "true_sequential": False, "damp_percent": 0.01} if a.method == "gptq"
            else {"clip": "symmetric"})
    spec = QuantSpec("nf3", 64, "afpq", scale_search="output")
    res = {"settings": vars(a), "cells": {}}
    fp = perplexity(model, tok, text, seqlen=a.seqlen, windows=a.windows, progress=False)
    res["cells"]["fp32"] = fp.as_dict()
    print(f"fp32: {fp.ppl:.2f} +- {fp.ppl_se:.2f}", flush=True)
    for name, extra in (("uniform nf3 afpq g64 + output", {}), (f"budget {a.budget} + output", {"bits_budget": a.budget})):
        m = copy.deepcopy(model)
        t = time.perf_counter()
        s = spec if not extra or a.method != "awq" else QuantSpec("nf3", 64, "afpq", layout="gptq", scale_search="output")
        qc = quantize(m, tok, a.method, s, calib, backend=a.backend, progress=False, **opts, **extra)
        secs = time.perf_counter() - t
        r = perplexity(m, tok, text, seqlen=a.seqlen, windows=a.windows, progress=False)
        res["cells"][name] = {**r.as_dict(), "quantize_s": secs, "bits_per_weight": qc.extra.get("bits_per_weight"),
                              "shares": qc.extra.get("allocation", {}).get("shares")}
        print(f"{name}: {r.ppl:.2f} +- {r.ppl_se:.2f} ({secs:.0f} s)", flush=True)
        del m
    u, b = (res["cells"][k] for k in list(res["cells"])[1:])
    res["paired"] = compare(b, u)
    res["gap_closed"] = (u["ppl"] - b["ppl"]) / (u["ppl"] - fp.ppl)
    print(json.dumps({"paired": res["paired"], "gap_closed": res["gap_closed"]}), flush=True)
    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    with open(a.out + ".tmp", "w") as fh:
        json.dump(res, fh, indent=2)
    os.replace(a.out + ".tmp", a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
