"""The study's results file: one JSON object, sections keyed by settings, written atomically."""

from __future__ import annotations

import json
import os

from .plan import Settings

_VERSION = 1


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
