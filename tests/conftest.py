"""Shared fixtures for the core tests.

Nothing here is autouse: other test files in this folder are unaffected.
"""

from __future__ import annotations

import pytest


@pytest.fixture
def restore_format_registry():
    """Snapshot the global format registry and restore it after the test.

    Tests that register custom grids use this so that names they add (or tables
    they overwrite) never leak into other tests.
    """
    from afpq_plugins.core import formats

    saved = dict(formats._REGISTRY)
    try:
        yield formats
    finally:
        formats._REGISTRY.clear()
        formats._REGISTRY.update(saved)
