"""The package's import structure: module graph, cycles, back arrows, duplicated rules.

    python benchmarks/structure.py [--json]

Reads every module of ``afpq_plugins`` with :mod:`ast` (nothing is imported) and follows
every ``import`` statement, at module level or inside a function (a lazy import is still
an arrow). Prints:

* cycles: strongly connected components of the module graph with more than one module
  (a package ``__init__`` re-exporting its own submodules is not counted as an arrow back);
* back arrows: an import from a lower layer to a higher one (:func:`layer`: core at the
  bottom, then kernels, nn, the loaders and the registry, the adapters, the CLI and study);
  adapters importing a sibling adapter are listed too;
* private imports across packages (``from ..x import _helper``).

``tests/test_structure.py`` asserts what this prints is empty.
"""

from __future__ import annotations

import ast
import json
import os
import sys
from typing import Dict, List, Set, Tuple

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "afpq_plugins")
PKG = "afpq_plugins"

ADAPTERS = ("autogptq", "autoawq", "gptqmodel", "llmcompressor", "hf", "vllm")


def layer(mod: str) -> int:
    """0 core (and the stdlib-only ``_patching`` and ``_version``), 1 kernels, 2 nn, 3 the loaders and the
    registry (``model``, ``data``, ``evaluate``, ``methods``, ``rtn``, ``progress``),
    4 the adapters, 5 CLI and study, 6 the package ``__init__`` (public re-exports)."""
    parts = mod.split(".")
    sub = parts[1] if len(parts) > 1 else ""
    if sub in ("core", "_patching", "_version"):  # stdlib-only leaves
        return 0
    if sub == "kernels":
        return 1
    if sub == "nn":
        return 2
    if sub in ADAPTERS:
        return 4
    if sub in ("cli", "study", "__main__"):
        return 5
    if sub == "":
        return 6
    return 3


def modules() -> Dict[str, str]:
    out = {}
    for dirpath, _, files in os.walk(ROOT):
        for f in files:
            if not f.endswith(".py"):
                continue
            path = os.path.join(dirpath, f)
            rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
            name = PKG if rel == "__init__" else f"{PKG}.{rel[:-len('.__init__')] if rel.endswith('__init__') else rel}"
            out[name] = path
    return out


def _resolve(mod: str, is_pkg: bool, level: int, target: str) -> str:
    base = mod.split(".") if is_pkg else mod.split(".")[:-1]
    if level > 1:
        base = base[: len(base) - (level - 1)]
    return ".".join(base + ([target] if target else []))


def imports(mods: Dict[str, str]) -> Dict[str, List[Tuple[str, str, bool]]]:
    """{module: [(imported module, name or '', private)]}, internal modules only."""
    graph: Dict[str, List[Tuple[str, str, bool]]] = {}
    for mod, path in mods.items():
        is_pkg = path.endswith("__init__.py")
        tree = ast.parse(open(path, encoding="utf-8").read(), path)
        edges = []
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.startswith(PKG):
                        edges.append((_closest(a.name, mods), "", False))
            elif isinstance(node, ast.ImportFrom):
                target = _resolve(mod, is_pkg, node.level, node.module or "") if node.level else (node.module or "")
                if not target.startswith(PKG):
                    continue
                for a in node.names:
                    sub = f"{target}.{a.name}"
                    if sub in mods:  # from .pkg import submodule
                        edges.append((sub, "", False))
                    else:
                        private = a.name.startswith("_") and not (a.name.startswith("__") and a.name.endswith("__"))
                        edges.append((_closest(target, mods), a.name, private))
        graph[mod] = [e for e in edges if e[0] and e[0] != mod]
    return graph


def _closest(name: str, mods) -> str:
    while name and name not in mods:
        name = name.rpartition(".")[0]
    return name


def _is_parent_pkg(a: str, b: str) -> bool:
    return b.startswith(a + ".")


def cycles(graph) -> List[List[str]]:
    """Strongly connected components (> 1 module), ignoring a submodule's imports of its own
    package ``__init__`` (Python runs the package first anyway)."""
    adj: Dict[str, Set[str]] = {m: set() for m in graph}
    for m, edges in graph.items():
        for t, _, _ in edges:
            if _is_parent_pkg(t, m):
                continue
            adj[m].add(t)
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

    def strong(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in adj.get(v, ()):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in sorted(adj):
        if v not in index:
            strong(v)
    return sorted(out)


def back_arrows(graph) -> List[str]:
    out = []
    for m, edges in sorted(graph.items()):
        for t, name, _ in edges:
            if _is_parent_pkg(t, m) or _is_parent_pkg(m, t):
                continue
            lm, lt = layer(m), layer(t)
            if lt > lm:
                out.append(f"{m} -> {t}{'.' + name if name else ''} (layer {lm} imports layer {lt})")
            elif m.split(".")[1] in ADAPTERS and t.split(".")[1] in ADAPTERS and m.split(".")[1] != t.split(".")[1]:
                out.append(f"{m} -> {t}{'.' + name if name else ''} (adapter imports a sibling adapter)")
    return sorted(set(out))


def private_imports(graph) -> List[str]:
    out = []
    for m, edges in sorted(graph.items()):
        for t, name, private in edges:
            if private and m.split(".")[:2] != t.split(".")[:2]:
                out.append(f"{m} imports {t}.{name}")
            elif private and m.split(".")[:2] == t.split(".")[:2] and m.count(".") >= 2 and t.count(".") >= 2 \
                    and m.rpartition(".")[0] != t.rpartition(".")[0]:
                out.append(f"{m} imports {t}.{name}")
    return sorted(set(out))


def report() -> dict:
    mods = modules()
    g = imports(mods)
    return {"modules": len(mods), "cycles": cycles(g), "back_arrows": back_arrows(g),
            "private_imports": private_imports(g)}


def main(argv=None) -> int:
    r = report()
    if "--json" in (argv or sys.argv[1:]):
        print(json.dumps(r, indent=2))
        return 0
    print(f"{r['modules']} modules")
    print(f"cycles: {len(r['cycles'])}")
    for c in r["cycles"]:
        print("  " + " <-> ".join(c))
    print(f"back arrows: {len(r['back_arrows'])}")
    for b in r["back_arrows"]:
        print("  " + b)
    print(f"private imports across modules of different packages: {len(r['private_imports'])}")
    for p in r["private_imports"]:
        print("  " + p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
