"""AWQ (AutoAWQ 0.2.9) with AFPQ grids vs RTN on the embedded SmolLM2-135M-Instruct.

Calibration: the Austen calibration novels (seeded random windows); evaluation: the
first ``--windows`` windows of ``--seqlen`` tokens of Pride and Prejudice (WikiText-2
protocol). Caveat: SmolLM2's weights come from a Q4_1 GGUF (see README), so the fp32
row is a dequantized Q4_1 model.

Resumable: every finished cell is written to ``--json`` at once and skipped on the
next run with the same settings (a settings change starts a new file section).
Cells run in priority order (3-bit g64 first), so a cut-short run still answers the
main questions. ``--table`` only prints the markdown table of what is done.

    PYTHONPATH=. python benchmarks/bench_awq.py --json benchmarks/out/awq_g64.json --groups 64 &
    PYTHONPATH=. python benchmarks/bench_awq.py --json benchmarks/out/awq_g-1.json --groups -1 &
    PYTHONPATH=. python benchmarks/bench_awq.py --table --json benchmarks/out/awq_g64.json benchmarks/out/awq_g-1.json

(defaults: --nsamples 8 --calib-seqlen 256 --seqlen 512 --windows 8 --threads 1).

    PYTHONPATH=. python benchmarks/bench_awq.py --timing --nsamples 4 --timing-layers 4 --repeats 3

times AWQ nf3-AFPQ against AWQ int3 (alternating pairs, minimum and median).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
import warnings

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

#: (label, family, mode, clip) per row; method rtn / awq; the format is family + bits.
ROWS = [
    ("INT (scale + zero)", "int", "zp", "symmetric"),
    ("NF AFPQ (two scales)", "nf", "afpq", "symmetric"),
    ("NF AFPQ, two-sided clip", "nf", "afpq", "two-sided"),
    ("NF one scale (sym)", "nf", "sym", "symmetric"),
    ("FP AFPQ (two scales)", "fp", "afpq", "symmetric"),
]


def plan(groups=(64, -1)):
    """Cells in priority order: per group size, 3 bits before 4, RTN before AWQ."""
    cells = []
    for gs in groups:
        for bits in (3, 4):
            for _, fam, mode, clip in ROWS:
                if clip == "symmetric":
                    cells.append(("rtn", f"{fam}{bits}", mode, gs, "-"))
            for _, fam, mode, clip in ROWS:
                cells.append(("awq", f"{fam}{bits}", mode, gs, clip))
    return cells


def key(c):
    return "/".join(str(x) for x in c)


def run_cell(cell, model, tok, ids, args):
    from afpq_plugins.autoawq.io import awq_quantize, wrap_for_awq
    from afpq_plugins.evaluate import perplexity
    from afpq_plugins.model import quantize_model_rtn

    method, fmt, mode, gs, clip = cell
    m = copy.deepcopy(model)
    t0 = time.perf_counter()
    if method == "rtn":
        quantize_model_rtn(m, fmt, gs, mode, progress=False)
    else:
        awq_quantize(wrap_for_awq(m), tok, fmt, gs, mode, clip=clip, calib_data="austen",
                     n_samples=args.nsamples, seqlen=args.calib_seqlen, progress=False)
    tq = time.perf_counter() - t0
    r = perplexity(m, ids, seqlen=args.seqlen, windows=args.windows, progress=False)
    return {"quantize_s": round(tq, 2), "ppl": r.ppl, "eval_s": round(r.seconds, 2)}


def table(res):
    cols = [(b, g) for b in (3, 4) for g in (64, -1)]
    lines = ["| method | " + " | ".join(f"{b}-bit g{g}" for b, g in cols) + " |", "|---|" + "---|" * len(cols)]
    fp = res.get("fp32")
    if fp:
        lines.append("| fp32 (Q4_1-derived) | " + " | ".join(f"{fp['ppl']:.2f}" for _ in cols) + " |")
    for method in ("rtn", "awq"):
        for label, fam, mode, clip in ROWS:
            if method == "rtn" and clip != "symmetric":
                continue
            cells = []
            for b, g in cols:
                r = res.get(key((method, f"{fam}{b}", mode, g, clip if method == "awq" else "-")))
                cells.append("-" if r is None else f"{r['ppl']:.2f}")
            name = label if method == "awq" and clip == "two-sided" else f"{label}"
            lines.append(f"| {method.upper()} {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def timing(args) -> int:
    """AWQ-AFPQ (nf3, two scales) vs AWQ-INT (int3) quantize wall time, alternating.

    Both go through the same quantizer and settings (the INT grid is core's uniform
    path, as fast as AutoAWQ's own); first ``--timing-layers`` decoder layers of SmolLM2,
    group 64, symmetric clip; minimum and median of ``--repeats`` alternating pairs.
    """
    import statistics

    from afpq_plugins.autoawq.io import awq_quantize, wrap_for_awq
    from afpq_plugins.data import default_model_path, load_model_and_tokenizer

    warnings.simplefilter("ignore")
    base, tok = load_model_and_tokenizer(default_model_path())
    base.model.layers = base.model.layers[: args.timing_layers]
    base.config.num_hidden_layers = args.timing_layers
    times = {"int3": [], "nf3-afpq": []}
    for r in range(args.repeats):
        for name in times:
            m = copy.deepcopy(base)
            fmt, mode = ("int3", "zp") if name == "int3" else ("nf3", "afpq")
            t0 = time.perf_counter()
            awq_quantize(wrap_for_awq(m), tok, fmt, 64, mode, clip="symmetric", calib_data="austen",
                         n_samples=args.nsamples, seqlen=args.calib_seqlen, progress=False)
            times[name].append(time.perf_counter() - t0)
            del m
        print(f"repeat {r}: " + "  ".join(f"{k} {v[-1]:.2f}s" for k, v in times.items()), flush=True)
    res = {k: {"min_s": min(v), "median_s": statistics.median(v), "all_s": [round(x, 2) for x in v]}
           for k, v in times.items()}
    res["ratio_min"] = res["nf3-afpq"]["min_s"] / res["int3"]["min_s"]
    res["ratio_median"] = res["nf3-afpq"]["median_s"] / res["int3"]["median_s"]
    res["settings"] = {"layers": args.timing_layers, "nsamples": args.nsamples, "calib_seqlen": args.calib_seqlen,
                       "group_size": 64, "clip": "symmetric", "repeats": args.repeats, "threads": args.threads}
    print(json.dumps(res, indent=2, sort_keys=True))
    os.makedirs(os.path.dirname(args.timing_json), exist_ok=True)
    with open(args.timing_json, "w") as fh:
        json.dump(res, fh, indent=1, sort_keys=True)
    return 0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", nargs="+", default=[os.path.join(ROOT, "benchmarks", "out", "awq.json")],
                   help="results file (with --table: several files are merged)")
    p.add_argument("--groups", type=int, nargs="+", default=[64, -1], help="group sizes to run, in order")
    p.add_argument("--nsamples", type=int, default=8)
    p.add_argument("--calib-seqlen", type=int, default=256)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--windows", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--only", nargs="*", default=None, help="cell keys (method/fmt/mode/group/clip) to run")
    p.add_argument("--table", action="store_true", help="print the table of finished cells and exit")
    p.add_argument("--timing", action="store_true", help="only the alternating AWQ-AFPQ vs AWQ-INT wall time")
    p.add_argument("--timing-layers", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--timing-json", default=os.path.join(ROOT, "benchmarks", "out", "awq_timing.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.timing:
        return timing(args)
    settings = {k: getattr(args, k) for k in ("nsamples", "calib_seqlen", "seqlen", "windows", "threads")}
    skey = json.dumps(settings, sort_keys=True)
    if args.table:
        res = {}
        for f in args.json:
            if os.path.exists(f):
                res.update(json.load(open(f)).get(skey, {}))
        print(f"settings: {skey}\n\n{table(res)}")
        for k, r in sorted(res.items()):
            print(k, r)
        return 0
    path = args.json[0]
    allres = json.load(open(path)) if os.path.exists(path) else {}
    res = allres.setdefault(skey, {})
    warnings.simplefilter("ignore")
    from afpq_plugins.data import default_model_path, eval_text_path, load_model_and_tokenizer, load_text
    from afpq_plugins.evaluate import perplexity

    model, tok = load_model_and_tokenizer(default_model_path())
    ids = tok(load_text(str(eval_text_path())), return_tensors="pt").input_ids[0]

    def save():
        tmp = path + ".tmp"
        with open(tmp, "w") as fh:
            json.dump(allres, fh, indent=1, sort_keys=True)
        os.replace(tmp, path)

    if "fp32" not in res:
        r = perplexity(model, ids, seqlen=args.seqlen, windows=args.windows, progress=False)
        res["fp32"] = {"ppl": r.ppl, "eval_s": round(r.seconds, 2)}
        save()
        print(f"fp32 ppl {r.ppl:.3f} ({r.seconds:.0f}s)", flush=True)
    for cell in plan(args.groups):
        k = key(cell)
        if k in res or (args.only and k not in args.only):
            continue
        t0 = time.perf_counter()
        res[k] = run_cell(cell, model, tok, ids, args)
        save()
        print(f"{k:32s} {res[k]}  ({time.perf_counter() - t0:.0f}s)", flush=True)
    print(f"settings: {skey}\n\n{table(res)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
