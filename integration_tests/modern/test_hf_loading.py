"""AFPQ checkpoints through transformers 5.x's ``AutoModelForCausalLM``.

The cases are stack-agnostic and live once, in ``integration_tests/legacy/test_hf_loading.py``;
this module runs every one of them under the modern stack (the AutoGPTQ / AutoAWQ
adapter cases skip: those upstreams exist on the legacy stack only).
"""

from __future__ import annotations

import importlib.util
import os

import pytest

pytest.importorskip("transformers")

_SHARED = os.path.join(os.path.dirname(__file__), os.pardir, "legacy", "test_hf_loading.py")
_spec = importlib.util.spec_from_file_location("_afpq_hf_loading_cases", os.path.abspath(_SHARED))
_cases = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_cases)

globals().update({k: v for k, v in vars(_cases).items() if k.startswith("test_") or k in ("rtn_checkpoints", "ckpt")})


def test_runs_on_transformers_5():
    import transformers

    assert int(transformers.__version__.split(".")[0]) >= 5
