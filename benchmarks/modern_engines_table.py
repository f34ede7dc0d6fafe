"""The modern-engines accuracy table of benchmarks/RESULTS.md, from the study's JSON files.

Each argument is ``LABEL=PATH`` (a ``bench accuracy --out PATH`` prefix or its ``.json``);
the cells of every run in the file are read (INT3, NF3 one-scale, NF3 AFPQ, FP3 AFPQ at
group 64 and -1, whichever were measured) and one markdown row is printed per
(label, method), with whether NF3 AFPQ beats INT3 in each group::

    .venv-modern/bin/python benchmarks/modern_engines_table.py \\
        "GPTQModel 7.6=benchmarks/out/accuracy_gptqmodel" \\
        "llm-compressor 0.14=benchmarks/out/accuracy_llmcompressor"
"""

from __future__ import annotations

import json
import sys
from typing import Dict, List, Optional, Tuple

COLUMNS: Tuple[Tuple[str, str, int, str], ...] = (
    ("int3", "zp", 64, "INT3 g64"), ("nf3", "sym", 64, "NF3 one-scale g64"), ("nf3", "afpq", 64, "NF3 AFPQ g64"),
    ("fp3", "afpq", 64, "FP3 AFPQ g64"),
    ("int3", "zp", -1, "INT3 g-1"), ("nf3", "sym", -1, "NF3 one-scale g-1"), ("nf3", "afpq", -1, "NF3 AFPQ g-1"),
    ("fp3", "afpq", -1, "FP3 AFPQ g-1"),
)


def read_cells(path: str) -> Dict[str, dict]:
    if not path.endswith(".json"):
        path += ".json"
    with open(path, encoding="utf-8") as fh:
        data = json.load(fh)
    cells: Dict[str, dict] = {}
    for run in data.get("runs", {}).values():
        cells.update(run.get("cells", {}))
    return cells


def ppl(cells: Dict[str, dict], method: str, fmt: str, mode: str, group: int) -> Optional[float]:
    c = cells.get(f"{method}/{fmt}/{mode}/minmax/g{group}")
    return None if c is None else float(c["ppl"])


def verdict(cells: Dict[str, dict], method: str, group: int) -> str:
    a, i = ppl(cells, method, "nf3", "afpq", group), ppl(cells, method, "int3", "zp", group)
    if a is None or i is None:
        return "-"
    return "yes" if a < i else "**no**"


def rows(label: str, cells: Dict[str, dict]) -> List[str]:
    out = []
    for method in sorted({c["method"] for c in cells.values()}):
        vals = [ppl(cells, method, f, m, g) for f, m, g, _ in COLUMNS]
        if all(v is None for v in vals):
            continue
        text = ["-" if v is None else f"{v:.2f}" for v in vals]
        out.append(f"| {label} | {method.upper()} | " + " | ".join(text)
                   + f" | {verdict(cells, method, 64)} / {verdict(cells, method, -1)} |")
    return out


def main(argv: List[str]) -> int:
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    print("| engine | method | " + " | ".join(c[3] for c in COLUMNS) + " | NF3 AFPQ < INT3 (g64 / g-1) |")
    print("|---|---|" + "---|" * len(COLUMNS) + "---|")
    for arg in argv:
        label, _, path = arg.partition("=")
        for line in rows(label, read_cells(path)):
            print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
