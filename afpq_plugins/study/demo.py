"""``afpq demo``: a preset of the accuracy study (RTN only, seven rows, 3 and 4 bits) with its own table.

The cells run through :func:`afpq_plugins.study.run.run_study` (the methods registry,
the study's JSON) like every other study; this module only picks the rows and group
sizes and prints the compact table (one row per format, one column per bits x group).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from typing import Callable, List, Optional, Sequence

from .plan import Cell, Row, Settings

__all__ = ["DEMO_ROWS", "demo_plan", "format_demo_table", "run_demo"]

#: Rows of the demo table; the format is family + bits.
DEMO_ROWS = (
    Row("int", "zp", None, "INT (scale + zero)"),
    Row("nf", "sym", None, "NF sym (one scale)"),
    Row("nf", "afpq", None, "NF AFPQ (two scales)"),
    Row("fp", "sym", None, "FP sym (one scale)"),
    Row("fp", "afpq", None, "FP AFPQ (two scales)"),
    Row("nf", "afpq", "mse", "NF AFPQ + scale search"),
    # the best we have: the output-aware search (calibrated; its calibration pass is in the cell's time)
    Row("nf", "afpq", "output", "NF AFPQ + output-aware scale search"),
)
BITS = (3, 4)


def demo_plan(quick: bool, group_sizes: Optional[Sequence[int]] = None) -> List[Cell]:
    gs = tuple(group_sizes) if group_sizes else ((64,) if quick else (64, -1))
    return [Cell("rtn", r.family, r.mode, r.search, b, g) for g in gs for b in BITS for r in DEMO_ROWS]


def format_demo_table(fp32_ppl: float, results: dict, group_sizes: Sequence[int],
                      errors: Optional[dict] = None, fp32_se: Optional[float] = None) -> str:
    """Markdown table: one row per format, one column per bits x group size.

    ``results``: ``{(fmt, mode, search, group_size): ppl}``; ``errors`` (same keys) and
    ``fp32_se``: standard errors, printed as ``ppl +- se`` where given.
    """
    def cell(v, se):
        return "-" if v is None else (f"{v:.2f}" if se is None else f"{v:.2f} +- {se:.2f}")

    cols = [(b, g) for g in group_sizes for b in BITS]
    head = "| method | " + " | ".join(f"{b}-bit g{g}" for b, g in cols) + " |"
    lines = [head, "|---|" + "---|" * len(cols)]
    lines.append("| fp32 (Q4_1-derived) | " + " | ".join(cell(fp32_ppl, fp32_se) for _ in cols) + " |")
    for r in DEMO_ROWS:
        cells = []
        for b, g in cols:
            key = (f"{r.family}{b}", r.mode, r.search, g)
            cells.append(cell(results.get(key), (errors or {}).get(key)))
        lines.append(f"| {r.label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_demo(inputs, quick: bool, seqlen: int, windows: Optional[int], group_sizes=None,
             json_out: Optional[str] = None, log: Callable[[str], None] = print) -> str:
    """Run the preset on ``inputs`` = ``(model, tokenizer, eval ids)``; returns the table."""
    from .run import run_study

    plan = demo_plan(quick, group_sizes)
    groups = sorted({c.group_size for c in plan}, key=lambda g: (g == -1, g))
    t_start = time.perf_counter()
    settings = Settings(seqlen=seqlen, windows=windows)
    with tempfile.TemporaryDirectory(prefix="afpq-demo-") as tmp:
        sec = run_study(plan, settings, os.path.join(tmp, "demo.json"), inputs=inputs, log=log)
    fp32 = sec["fp32"]
    cells = [sec["cells"][c.key] for c in plan]
    results = {(c.fmt, c.mode, c.search, c.group_size): r["ppl"] for c, r in zip(plan, cells)}
    errors = {(c.fmt, c.mode, c.search, c.group_size): r.get("ppl_se") for c, r in zip(plan, cells)}
    table = format_demo_table(fp32["ppl"], results, groups, errors, fp32.get("ppl_se"))
    log("")
    log(table)
    log(f"\nTotal {time.perf_counter() - t_start:.0f}s. fp32 = SmolLM2-135M-Instruct dequantized from Q4_1; "
        "lower perplexity is better; +- is the standard error over windows (two cells closer than their "
        "combined error are a tie).")
    if json_out:
        rows = [{k: r.get(k) for k in ("format", "mode", "scale_search", "bits", "group_size", "ppl", "ppl_se",
                                       "window_nll", "quantize_s", "eval_s")} for r in cells]
        tmp_out = json_out + ".tmp"
        with open(tmp_out, "w", encoding="utf-8") as fh:
            json.dump({"fp32": fp32, "seqlen": seqlen, "windows": windows, "rows": rows, "table_markdown": table},
                      fh, indent=2, sort_keys=True)
        os.replace(tmp_out, json_out)
    return table
