"""Which objective should the bits budget minimise? A study on SmolLM2 at one budget.

    nice -n 19 .venv-legacy/bin/python benchmarks/budget_study.py --budget 3.5 \
        --out benchmarks/out/budget_study_3.5.json

One process: the calibration energies ``h = diag(X^T X)`` and the Fisher weights
``F_ij = sum_t g_ti^2 x_tj^2`` (``g`` the gradient of the calibration loss at the layer's
output, :func:`afpq_plugins.core.sensitivity.fisher_weights`) of every Linear on the
study's calibration (8 x 256 tokens, seed 0); then every candidate quantizes every layer
**with the output search** (the quantizer the budgeted run uses), keeping the decoded
weights, and is scored under each objective; each objective's allocation is then assembled
from the kept weights (so it is bit for bit what ``afpq quantize --bits-budget B
--scale-search output`` with that objective writes) and scored on the evaluation windows,
with the uniform reference cell in the same run.

Objectives (per unit, summed over units; the allocator is :func:`afpq_plugins.core.budget.allocate`):

* ``relative-minmax``: ``sum h e^2 / sum h w^2`` with min/max scales (the first released objective);
* ``relative-output``: the same ratio with the output search's scales;
* ``fisher-output``: ``sum F e^2`` with the output search's scales (a second-order estimate of
  the loss increase: absolute, comparable across layers);
* ``fisher-minmax``: ``sum F e^2`` with min/max scales.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir)
sys.path.insert(0, ROOT)

from afpq_plugins.core import budget as B  # noqa: E402
from afpq_plugins.core.output_search import BoundOutputSearch, OutputSearch, grouped_energies, input_energies  # noqa: E402
from afpq_plugins.core.quantize import fake_quantize  # noqa: E402
from afpq_plugins.core.spec import QuantSpec  # noqa: E402
from afpq_plugins.evaluate import compare, perplexity  # noqa: E402

CALIB = (8, 256)


def parse_candidates(values):
    from afpq_plugins.cli import _candidates

    return list(_candidates(values))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--budget", type=float, nargs="+", default=[3.5])
    ap.add_argument("--candidates", nargs="+", default=None, help="as afpq quantize --candidates (default: the built-in set)")
    ap.add_argument("--objectives", nargs="+",
                    default=["relative-minmax", "relative-output", "fisher-output", "fisher-minmax"])
    ap.add_argument("--reference", nargs="*", default=[],
                    help="uniform output-search cells scored in the same run (fmt/mode/group)")
    ap.add_argument("--reference-json", default=None,
                    help="bench_budget.py JSON whose cells (same windows; its fp32 must match) join the comparison")
    ap.add_argument("--score-row-stride", type=int, default=8,
                    help="output-search objectives score every k-th row of each layer (default 8)")
    ap.add_argument("--compare-to", nargs="*", default=["uniform nf3-afpq-g64-output (bench_budget)"],
                    help="cells every other cell is compared with (paired)")
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--limit-layers", type=int, default=None, help="debug: only the first N Linears")
    ap.add_argument("--out", required=True)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: on a shared 2-core machine two threads contend, 10-40x slower)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from afpq_plugins import data as D
    from afpq_plugins.core.sensitivity import fisher_weights
    from afpq_plugins.methods import Calibration
    from afpq_plugins.model import find_linears

    model, tok = D.load_model_and_tokenizer(D.resolve_model("default"))
    ids = tok(D.load_text(str(D.eval_text_path())), return_tensors="pt").input_ids[0]
    linears = find_linears(model)
    if args.limit_layers:
        linears = dict(list(linears.items())[: args.limit_layers])
    samples = Calibration(*CALIB, seed=0).samples(tok)
    t0 = time.perf_counter()
    h = input_energies(model, linears, samples)
    t_h = time.perf_counter() - t0
    t0 = time.perf_counter()
    F = fisher_weights(model, linears, samples)
    t_f = time.perf_counter() - t0
    print(f"energies {t_h:.1f}s, fisher {t_f:.1f}s", flush=True)

    base = QuantSpec("nf3", 64, "afpq")
    cands = parse_candidates(args.candidates) if args.candidates else list(B.DEFAULT_CANDIDATES)
    specs = B.candidate_specs(base, cands)
    refs = []
    for r in args.reference:
        fmt, mode, g = r.split("/")
        refs.append(QuantSpec(fmt, int(g), mode))
    search = OutputSearch()
    kept = {}  # (spec, name) -> decoded weight with the output search (full rows), computed on first use

    def decoded(s, n):
        if (s, n) not in kept:
            w = linears[n].weight.detach().float()
            kept[s, n] = fake_quantize(w, s.format, s.group_size, s.mode, s.torch_scale_dtype, name=n,
                                       search=BoundOutputSearch(search, grouped_energies(h[n], s.group_size), name=n))
        return kept[s, n]

    # scoring: min/max objectives on every row; output-search objectives on every k-th row (the
    # search is independent per row and group, so the sampled rows' errors are exact; the sum is
    # scaled by out / rows scored)
    k = args.score_row_stride
    errs = {o: {} for o in args.objectives}
    t_cand = {}
    for si, s in enumerate(specs):
        t0 = time.perf_counter()
        for n, lin in linears.items():
            w = lin.weight.detach().float()
            if w.shape[1] % (s.group_size if s.group_size > 0 else w.shape[1]):
                for o in errs:
                    errs[o][si, n] = math.inf
                continue
            hh = h[n].float().reshape(1, -1)
            q_mm = q_out = None
            for o in errs:
                kind, scales = o.split("-")
                if scales == "output":
                    if q_out is None:
                        ws = w[::k]
                        q_out = fake_quantize(ws, s.format, s.group_size, s.mode, s.torch_scale_dtype, name=n,
                                              search=BoundOutputSearch(search, grouped_energies(h[n], s.group_size),
                                                                       name=n))
                    ww, qq, FF, scale = w[::k], q_out, F[n][::k], w.shape[0] / w[::k].shape[0]
                else:
                    if q_mm is None:
                        q_mm = fake_quantize(w, s.format, s.group_size, s.mode, s.torch_scale_dtype, name=n)
                    ww, qq, FF, scale = w, q_mm, F[n], 1.0
                e2 = (ww - qq) ** 2
                if kind == "relative":
                    ref = float((ww * ww * hh).sum(dtype=torch.float64)) or 1.0
                    errs[o][si, n] = float((e2 * hh).sum(dtype=torch.float64)) / ref
                else:
                    errs[o][si, n] = scale * float((e2 * FF).sum(dtype=torch.float64))
        t_cand[s.describe()] = round(time.perf_counter() - t0, 1)
        print(f"scored {s.describe():16s} {t_cand[s.describe()]:.1f}s", flush=True)

    originals = {n: lin.weight.detach().clone() for n, lin in linears.items()}

    def evaluate(choice):
        with torch.no_grad():
            for n, lin in linears.items():
                lin.weight.copy_(decoded(choice[n], n) if choice is not None else originals[n])
        r = perplexity(model, ids, seqlen=args.seqlen, windows=args.windows, progress=False).as_dict()
        return r

    def save():
        out = {"settings": {"windows": args.windows, "seqlen": args.seqlen, "calibration": list(CALIB), "seed": 0,
                            "candidates": [c.label() for c in cands], "threads": torch.get_num_threads(),
                            "score_row_stride": k},
               "seconds": {"energies": round(t_h, 1), "fisher": round(t_f, 1), "candidates": t_cand},
               "cells": cells}
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out + ".tmp", "w", encoding="utf-8") as fh:
            json.dump(out, fh, indent=1)
        os.replace(args.out + ".tmp", args.out)

    shapes = {n: (lin.in_features, lin.out_features) for n, lin in linears.items()}
    total = sum(i * o for i, o in shapes.values())
    units = B.fused_units(list(linears))
    cells = {"fp32": evaluate(None)}
    print(f"fp32 {cells['fp32']['ppl']:.3f}", flush=True)
    if args.reference_json:
        with open(args.reference_json, encoding="utf-8") as fh:
            old = json.load(fh)
        drift = max(abs(a - b) for a, b in zip(old["cells"]["fp32"]["window_nll"], cells["fp32"]["window_nll"]))
        print(f"fp32 window NLLs vs {args.reference_json}: max difference {drift:.2e}", flush=True)
        if not args.limit_layers and drift > 1e-4:  # summation order (thread count) moves the 7th digit only
            raise SystemExit(f"{args.reference_json}: its fp32 windows differ from this run's: not comparable")
        for name, c in old["cells"].items():
            if name != "fp32" and "ppl" in c:
                cells[f"uniform {name} (bench_budget)" if "budget" not in name else f"{name} (bench_budget)"] = c
    for r in refs:
        cells[f"uniform {r.describe()} + output"] = c = evaluate({n: r for n in linears})
        c["bits_per_weight"] = B.bits_per_weight(r, 576, 576)
        print(f"uniform {r.describe()} {c['ppl']:.3f}", flush=True)
    for budget in args.budget:
        for o in args.objectives:
            ue = [[math.fsum(errs[o][si, n] for n in u) for si in range(len(specs))] for u in units]
            uc = [B.unit_costs(specs, shapes, u) for u in units]
            alloc = B.allocate(ue, uc, math.floor(budget * total))
            choice = {n: specs[c] for u, c in zip(units, alloc.choice) for n in u}
            t_q = time.perf_counter()
            for n in linears:
                decoded(choice[n], n)
            t_q = time.perf_counter() - t_q
            c = evaluate(choice)
            c.update(quantize_s_uncached=round(t_q, 1), bits_per_weight=alloc.bits / total, budget=budget, objective=o,
                     shares=B.summary(choice, shapes))
            cells[f"budget {budget} {o}"] = c
            save()
            print(f"budget {budget} {o}: {c['ppl']:.3f} +- {c['ppl_se']:.3f} bpw {c['bits_per_weight']:.4f} "
                  f"{ {k: round(v, 3) for k, v in c['shares'].items()} }", flush=True)
    save()
    fp = cells["fp32"]
    for name, c in cells.items():
        if name == "fp32":
            continue
        line = f"{name:45s} {c['ppl']:.3f} +- {c['ppl_se']:.3f}"
        for rname in cells:
            if rname in args.compare_to and rname != name:
                cmp = compare(c, cells[rname])
                gap = (cells[rname]["ppl"] - c["ppl"]) / (cells[rname]["ppl"] - fp["ppl"])
                line += f" | vs {rname}: {cmp['nll_diff']:+.4f} +- {cmp['nll_diff_se']:.4f} ({gap:+.1%} of gap)"
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
