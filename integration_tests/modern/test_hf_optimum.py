"""optimum 2.3.0 + gptqmodel 7.6.0: the cases of ``integration_tests/legacy/test_hf_optimum.py``
(stack-agnostic, written once) run under the modern stack."""

from __future__ import annotations

import importlib.util
import os

import pytest

pytest.importorskip("optimum.gptq")

_SHARED = os.path.join(os.path.dirname(__file__), os.pardir, "legacy", "test_hf_optimum.py")
_spec = importlib.util.spec_from_file_location("_afpq_hf_optimum_cases", os.path.abspath(_SHARED))
_cases = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_cases)

globals().update({k: v for k, v in vars(_cases).items()
                  if k.startswith("test_") or k in ("tok", "float_folder", "quantized")})


def test_runs_through_gptqmodel():
    from afpq_plugins.hf import optimum as afpq_optimum

    assert afpq_optimum.uses_gptqmodel()
