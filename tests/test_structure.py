"""The package's import structure (read with ``ast`` by benchmarks/structure.py): no import
cycle, no arrow from a lower layer to a higher one or between adapters, no private name
imported across packages."""

from __future__ import annotations

import importlib.util
import os

import pytest

_PATH = os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks", "structure.py")


@pytest.fixture(scope="module")
def structure():
    spec = importlib.util.spec_from_file_location("afpq_structure", _PATH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_no_cycles_back_arrows_or_private_imports(structure):
    r = structure.report()
    assert r["modules"] > 50
    assert r["cycles"] == []
    assert r["back_arrows"] == []
    assert r["private_imports"] == []


def test_the_checker_finds_what_it_looks_for(structure):
    """A hand-made graph with one cycle, one back arrow and one sibling import."""
    g = {
        "afpq_plugins.core.a": [("afpq_plugins.core.b", "", False)],
        "afpq_plugins.core.b": [("afpq_plugins.core.a", "_x", True), ("afpq_plugins.methods", "", False)],
        "afpq_plugins.methods": [],
        "afpq_plugins.hf.x": [("afpq_plugins.vllm.y", "f", False)],
        "afpq_plugins.vllm.y": [],
    }
    assert structure.cycles(g) == [["afpq_plugins.core.a", "afpq_plugins.core.b"]]
    arrows = structure.back_arrows(g)
    assert any("core.b -> afpq_plugins.methods" in a for a in arrows)
    assert any("sibling adapter" in a for a in arrows) and len(arrows) == 2
