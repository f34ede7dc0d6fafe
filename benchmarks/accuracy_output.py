"""The output-aware scale search and the peer formats on SmolLM2: the cells that answer them.

Runs a targeted plan of the accuracy study (same settings, same JSON file as
``afpq bench accuracy``, so the cells are shared and resumable), in priority order:

1. the headline pairs: RTN and GPTQ NF3 AFPQ g64, min/max vs the output search;
2. the peers (NVFP4, MXFP4, bitsandbytes NF4 +-double quant, HQQ 3/4-bit) and the AFPQ /
   INT / one-scale cells at the same bits per weight;
3. RTN 3-bit whole rows (g-1), min/max vs the output search, NF3 / INT3 / FP3;
4. the small-gap cells (RTN 4-bit g64/g32, NF3 g32) and GPTQ NF3 g-1;
5. the other RTN cells of the output search (3/4 bits, g-1/64/32, INT / FP / NF), then
   GPTQ NF3 g32 and NF4 g-1/g64/g32, min/max vs the output search;
6. AWQ NF3 AFPQ g64, min/max vs the output search.

Usage (legacy venv; hold the benchmark lock; ``--max-cells`` keeps each job short and
a rerun resumes)::

    flock /tmp/afpq-bench.lock .venv-legacy/bin/python benchmarks/accuracy_output.py --threads 1 --max-cells 8
    .venv-legacy/bin/python benchmarks/accuracy_output.py --report-only

``--windows 32 --seqlen 1024`` (with another ``--out``) measures the same plan on the larger
evaluation text (its own settings key, so it never mixes with the 8 x 512 cells).

Writes ``benchmarks/out/accuracy.json`` (cells) and ``benchmarks/out/accuracy_output.md``
(the study's report of those cells, with the search and peers tables).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from afpq_plugins.study import Cell, Settings, load_results, markdown_report, run_study  # noqa: E402
from afpq_plugins.study.plan import peer_cells  # noqa: E402
from afpq_plugins.study.peers import peer_available  # noqa: E402


def _pair(method, fam, mode, bits, g):
    return [Cell(method, fam, mode, None, bits, g), Cell(method, fam, mode, "output", bits, g)]


def plan() -> list:
    cells = _pair("rtn", "nf", "afpq", 3, 64) + _pair("gptq", "nf", "afpq", 3, 64)
    cells += [c for c in peer_cells() if peer_available(c.family) is None]
    for fam, mode, bits, g in (("nf", "afpq", 4, 64), ("nf", "sym", 4, 32), ("int", "zp", 4, 64), ("nf", "sym", 3, 32),
                               ("int", "zp", 3, 64), ("nf", "sym", 4, 64), ("fp", "afpq", 4, 64), ("nf", "afpq", 4, 192),
                               ("int", "zp", 3, 32)):
        cells.append(Cell("rtn", fam, mode, None, bits, g))
    for fam, mode in (("nf", "afpq"), ("int", "zp"), ("fp", "afpq")):
        cells += _pair("rtn", fam, mode, 3, -1)
    cells.append(Cell("rtn", "nf", "afpq", "output", 4, 64))
    # the small-gap cells next (where a search could most easily be worse than min/max)
    cells += _pair("rtn", "nf", "afpq", 4, 32) + _pair("rtn", "int", "zp", 4, 64) + _pair("rtn", "fp", "afpq", 4, 64)
    cells += _pair("rtn", "nf", "afpq", 3, 32) + _pair("gptq", "nf", "afpq", 3, -1)
    for bits in (3, 4):
        for g in (64, -1, 32):
            for fam, mode in (("int", "zp"), ("fp", "afpq"), ("nf", "afpq")):
                cells += _pair("rtn", fam, mode, bits, g)
    for bits, g in ((3, -1), (3, 32), (4, 64), (4, -1), (4, 32)):
        cells += _pair("gptq", "nf", "afpq", bits, g)
    cells += _pair("awq", "nf", "afpq", 3, 64)
    return list(dict.fromkeys(cells))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join("benchmarks", "out", "accuracy"))
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--max-cells", type=int, default=None)
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--windows", type=int, default=None, help="evaluation windows (default: the study's, 8)")
    ap.add_argument("--seqlen", type=int, default=None, help="tokens per window (default: the study's, 512)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = Settings(**{k: v for k, v in (("windows", args.windows), ("seqlen", args.seqlen)) if v is not None})
    cells = plan()
    if args.report_only:
        sec = load_results(args.out + ".json")["runs"][settings.key()]
    else:
        sec = run_study(cells, settings, args.out + ".json", max_cells=args.max_cells)
    md = markdown_report(sec, cells, title="Output-aware scale search and peer formats")
    with open(args.out + "_output.md", "w", encoding="utf-8") as fh:
        fh.write(md)
    print(f"wrote {args.out}_output.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
