"""Quantization time of a budgeted run against the uniform output-search run, side by side.

    nice -n 19 .venv-legacy/bin/python benchmarks/bench_budget_time.py --reps 3 \
        --out benchmarks/out/bench_budget_time.json

One process, one torch thread, the study's calibration (8 x 256 tokens, seed 0; tokenized once
before any timed run). Each repetition runs both, in alternating order (uniform first on even
repetitions, budget first on odd ones), on a fresh copy of the embedded SmolLM2-135M-Instruct:

* uniform: ``rtn`` NF3 AFPQ g64 with the output search (calibration energies + the search);
* budget: ``rtn`` with ``--bits-budget 3.5`` and the output search (energies, the Fisher pass,
  scoring every candidate, then the search on the chosen settings).

Both wall time and the process's CPU time (``time.process_time``: what the run computed, not
the time it waited for a shared or paused CPU) are recorded; the ratio of the medians is reported.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time

import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir)
sys.path.insert(0, ROOT)

CALIB = (8, 256)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--budget", type=float, default=3.5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--score-row-stride", type=int, default=None,
                    help="the fisher objective's row stride, with and without the output search "
                         "(default: afpq_plugins.rtn's, 8 and 32 with the output search)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    import afpq_plugins.rtn as _rtn

    if args.score_row_stride:
        _rtn.SCORE_ROW_STRIDE = _rtn.SCORE_ROW_STRIDE_OUTPUT = args.score_row_stride
    torch.set_num_threads(args.threads)

    from afpq_plugins import data as D
    from afpq_plugins.core.spec import QuantSpec
    from afpq_plugins.methods import Calibration, quantize

    model, tok = D.load_model_and_tokenizer(D.resolve_model("default"))
    calib = Calibration(*CALIB, seed=0)
    calib.samples(tok)  # memoised: tokenizing the novels is not part of either run
    spec = QuantSpec("nf3", 64, "afpq", scale_search="output")
    runs = {"uniform": [], "budget": []}

    def one(kind):
        m = copy.deepcopy(model)
        opts = {"bits_budget": args.budget} if kind == "budget" else {}
        w0, c0 = time.perf_counter(), time.process_time()
        qc = quantize(m, tok, "rtn", spec, calib, progress=False, fake=True, **opts)
        w, c = time.perf_counter() - w0, time.process_time() - c0
        rec = {"wall_s": round(w, 2), "cpu_s": round(c, 2)}
        if kind == "budget":
            rec["bits_per_weight"] = qc.extra["bits_per_weight"]
            rec["scoring_s"] = qc.extra["allocation"]["seconds"]
        runs[kind].append(rec)
        print(f"{kind:8s} wall {w:7.1f}s cpu {c:7.1f}s", flush=True)

    for r in range(args.reps):
        for kind in (("uniform", "budget") if r % 2 == 0 else ("budget", "uniform")):
            one(kind)
    med = {k: {f: statistics.median(x[f] for x in v) for f in ("wall_s", "cpu_s")} for k, v in runs.items()}
    ratio = {f: round(med["budget"][f] / med["uniform"][f], 3) for f in ("wall_s", "cpu_s")}
    out = {"settings": {"calibration": list(CALIB), "seed": 0, "threads": args.threads, "budget": args.budget,
                        "uniform": "nf3/afpq g64 + output search", "reps": args.reps,
                        "score_row_stride": args.score_row_stride or "default"},
           "runs": runs, "median": med, "ratio_budget_over_uniform": ratio}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out + ".tmp", "w", encoding="utf-8") as fh:
        json.dump(out, fh, indent=1)
    os.replace(args.out + ".tmp", args.out)
    print(f"medians: {med}; budget / uniform: wall {ratio['wall_s']:.2f}x, cpu {ratio['cpu_s']:.2f}x (target <= 2x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
