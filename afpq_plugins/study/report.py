"""The study's markdown report: the paper's tables, Figure 5, the scale-search table, the AFPQ losses."""

from __future__ import annotations

import json
from typing import Callable, List, Optional, Sequence

from .plan import CAVEAT, Cell, Row, cell_ppl, rows_for, table_blocks, table_groups


def gap_closed(fp32: float, baseline: float, improved: float) -> Optional[float]:
    """Fraction of the perplexity gap to fp32 that ``improved`` closes over ``baseline``
    (1 = all of it, 0 = none, negative = worse); None when there is no gap."""
    gap = baseline - fp32
    if not gap > 0:
        return None
    return (baseline - improved) / gap


def _fp32_label(sec: dict) -> str:
    return "fp32 (Q4_1-derived)" if sec["settings"].get("model") == "default" else "fp32"


def _fmt_ppl(x: Optional[float]) -> str:
    if x is None:
        return "-"
    if x >= 1000:
        return f"{x:.0f}"
    return f"{x:.2f}"


def markdown_tables(sec: dict) -> str:
    """The paper's layout: per method and bit width, rows = formats, columns = group sizes."""
    cells, fp32 = sec["cells"], (sec.get("fp32") or {}).get("ppl")
    groups = table_groups(cells)
    out = []
    for method, bits in table_blocks(cells):
        out.append(f"**{method.upper()} {bits}-bit** (perplexity, lower is better; best minmax row per column in bold)")
        out.append("")
        out.append("| format | " + " | ".join(f"g{g}" for g in groups) + " |")
        out.append("|---|" + "---|" * len(groups))
        out.append(f"| {_fp32_label(sec)} | " + " | ".join(_fmt_ppl(fp32) for _ in groups) + " |")
        rows = [r for r in rows_for(method)
                if any(cell_ppl(cells, method, r, bits, g) is not None for g in groups)]
        best = {}
        for g in groups:
            vals = [cell_ppl(cells, method, r, bits, g) for r in rows if r.search is None]
            vals = [v for v in vals if v is not None]
            best[g] = min(vals) if vals else None
        for r in rows:
            vals = []
            for g in groups:
                v = cell_ppl(cells, method, r, bits, g)
                s = _fmt_ppl(v)
                if v is not None and r.search is None and v == best[g]:
                    s = f"**{s}**"
                vals.append(s)
            label = r.label.format(b=bits)
            out.append(f"| {label} | " + " | ".join(vals) + " |")
        out.append("")
    return "\n".join(out)


def two_scale_table(sec: dict) -> str:
    """Figure 5 of the paper: two scales (afpq) vs one scale + zero-point (zp) vs one scale (sym)."""
    cells = sec["cells"]
    lines = ["| method | bits | group | FP zp | FP sym | FP AFPQ | NF zp | NF sym | NF AFPQ |", "|---|---|---|---|---|---|---|---|---|"]
    n = 0
    for method, bits in table_blocks(cells):
        for g in table_groups(cells):
            vals = {}
            for fam in ("fp", "nf"):
                for mode in ("zp", "sym", "afpq"):
                    vals[fam, mode] = cell_ppl(cells, method, Row(fam, mode, None, ""), bits, g)
            if vals["fp", "zp"] is None and vals["nf", "zp"] is None:
                continue
            row = []
            for fam in ("fp", "nf"):
                best = min((v for (f, _), v in vals.items() if f == fam and v is not None), default=None)
                for mode in ("zp", "sym", "afpq"):
                    v = vals[fam, mode]
                    row.append(f"**{_fmt_ppl(v)}**" if v is not None and v == best else _fmt_ppl(v))
            lines.append(f"| {method.upper()} | {bits} | {g} | " + " | ".join(row) + " |")
            n += 1
    return "\n".join(lines) if n else ""


def search_table(sec: dict) -> str:
    """Scale search vs the paper's min/max scales: perplexities and the share of the gap to fp32 closed."""
    cells, fp32 = sec["cells"], (sec.get("fp32") or {}).get("ppl")
    lines = ["| method | format | group | minmax | + search | gap to fp32 closed |", "|---|---|---|---|---|---|"]
    n = 0
    for method, bits in table_blocks(cells):
        for r in rows_for(method):
            if r.search is None:
                continue
            base_row = Row(r.family, r.mode, None, "")
            for g in table_groups(cells):
                a, b = cell_ppl(cells, method, base_row, bits, g), cell_ppl(cells, method, r, bits, g)
                if a is None or b is None or fp32 is None:
                    continue
                gc = gap_closed(fp32, a, b)
                gcs = "-" if gc is None else f"{100 * gc:+.0f}%"
                name = f"{r.family}{bits} {r.mode}" + ("" if r.search == "mse" else f" ({r.search} search)")
                lines.append(f"| {method.upper()} | {name} | {g} | {_fmt_ppl(a)} | {_fmt_ppl(b)} | {gcs} |")
                n += 1
    return "\n".join(lines) if n else ""


def afpq_losses(sec: dict) -> List[str]:
    """Cells where an AFPQ (two-scale, minmax) row is not better than INT or than the same grid with one scale / zero-point."""
    cells = sec["cells"]
    out = []
    for method, bits in table_blocks(cells):
        for g in table_groups(cells):
            integer = cell_ppl(cells, method, Row("int", "zp", None, ""), bits, g)
            for fam in ("nf", "fp"):
                a = cell_ppl(cells, method, Row(fam, "afpq", None, ""), bits, g)
                if a is None:
                    continue
                for other, name in ((Row(fam, "sym", None, ""), f"{fam.upper()}{bits} sym"),
                                    (Row(fam, "zp", None, ""), f"{fam.upper()}{bits} scale+zero"),
                                    (Row("int", "zp", None, ""), f"INT{bits}")):
                    v = integer if other.family == "int" else cell_ppl(cells, method, other, bits, g)
                    if v is not None and a >= v:
                        out.append(f"{method.upper()} {bits}-bit g{g}: {fam.upper()}{bits} AFPQ {_fmt_ppl(a)} "
                                   f"vs {name} {_fmt_ppl(v)}")
    return out


def markdown_report(sec: dict, plan: Optional[Sequence[Cell]] = None, title: str = "Accuracy study") -> str:
    """The whole markdown report of one run (settings section of the JSON)."""
    s = sec["settings"]
    fp32 = sec.get("fp32") or {}
    lines = [f"# {title}", "", CAVEAT, "",
             f"Evaluation: {s['eval_text']}, {'all' if s['windows'] is None else s['windows']} windows of "
             f"{s['seqlen']} tokens ({fp32.get('tokens', '?')} predicted tokens). Calibration (GPTQ, AWQ): "
             f"{s['nsamples']} x {s['calib_seqlen']} tokens of the five other Austen novels, seed {s['seed']}. "
             f"Scales stored as {s['scale_dtype']}. GPTQ: damp {s['gptq_damp']}, act-order "
             f"{'on' if s['gptq_desc_act'] else 'off'}, true-sequential {'on' if s['gptq_true_sequential'] else 'off'}. "
             f"AWQ: clip {s['awq_clip']}." + (f" Engine of the GPTQ/AWQ cells: {s['backend']}." if s.get("backend") else ""),
             "",
             markdown_tables(sec)]
    t = two_scale_table(sec)
    if t:
        lines += ["**Two scales vs one scale + zero-point (paper's Figure 5) vs one scale**", "", t, ""]
    t = search_table(sec)
    if t:
        lines += ["**Opt-in scale searches vs min/max scales** (plain rows: the mse search, per-side shrink "
                  "minimising the weight error; \"output search\": minimising the layer-output error on the "
                  "calibration inputs)", "", t, ""]
    from .peers import peers_table

    t = peers_table(sec)
    if t:
        lines += ["**AFPQ against the formats people use instead, at equal bits per weight**", "", t, ""]
    losses = afpq_losses(sec)
    lines += ["**Cells where AFPQ does not win**" + (" (none)" if not losses else ""), ""]
    lines += [f"- {x}" for x in losses]
    if plan is not None:
        missing = [c.key for c in plan if c.key not in sec["cells"]]
        lines += ["", f"**Cells not run**: {len(missing)} of {len(plan)}" + (": " + ", ".join(missing) if missing else ""), ""]
    return "\n".join(lines).rstrip() + "\n"


def write_outputs(sec: dict, prefix: str, plan=None, model=None, histogram_layer: Optional[str] = None,
                  log: Callable[[str], None] = print) -> dict:
    """Write PREFIX.md, PREFIX.png and (given a model) PREFIX_histogram.png; returns the paths."""
    from .plots import plot_group_histogram, plot_results

    paths = {}
    md = markdown_report(sec, plan)
    with open(prefix + ".md", "w", encoding="utf-8") as fh:
        fh.write(md)
    paths["markdown"] = prefix + ".md"
    try:
        if sec["cells"]:
            paths["plot"] = plot_results(sec, prefix + ".png")
        if model is not None:
            from ..model import find_linears

            linears = find_linears(model)
            name = histogram_layer or next(iter(linears))
            if name not in linears:
                raise ValueError(f"--histogram-layer {name!r} is not a quantized Linear of the model")
            w = linears[name].weight
            g = 64 if w.shape[1] % 64 == 0 else w.shape[1]
            info = plot_group_histogram(w, prefix + "_histogram.png", layer=name, group_size=g)
            with open(prefix + "_histogram.json", "w", encoding="utf-8") as fh:
                json.dump(info, fh, indent=1, sort_keys=True)
            paths["histogram"] = prefix + "_histogram.png"
    except RuntimeError as exc:  # no matplotlib: the JSON and markdown are still written
        log(f"note: {exc}; plots skipped")
    return paths
