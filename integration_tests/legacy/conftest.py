"""Fixtures for the legacy-stack integration tests (AutoGPTQ 0.7.1, AutoAWQ 0.2.9).

These tests call the *real* upstream code, on CPU, and compare it bit for bit with
``afpq_plugins.core``. They run in the legacy venv (``make test``); outside it (no
``auto_gptq`` / ``awq`` installed at all) they are skipped with a reason. An upstream
package that is installed but fails to import is an error, never a skip.

No shim is needed on CPU with torch 2.13.0: ``auto_gptq.nn_modules.qlinear.*`` catches
the missing ``autogptq_cuda_*`` / ``exllama_kernels`` extensions itself (it logs
"CUDA extension not installed."), and ``awq.modules.linear.gemm`` catches the missing
``awq_ext`` (``try_import``) and imports triton's Python package, which loads without a
GPU. ``WQLinear_GEMM.from_linear`` picks ``get_best_device() == "cpu"``. The only thing
scoped here is the upstream import-time warning noise (see :func:`_import_upstream`).
"""

from __future__ import annotations

import importlib
import importlib.util
import warnings

import pytest


def _import_upstream(module: str):
    """Import an upstream module, skipping only if its distribution is absent.

    Import-time warnings of the pinned upstream versions are recorded and dropped, for
    the duration of the import only (``warnings.catch_warnings`` restores the filters
    and ``showwarning`` afterwards): AutoGPTQ 0.7.1's triton kernels use the deprecated
    ``torch.cuda.amp.custom_fwd`` (FutureWarning); AutoAWQ 0.2.9 warns that it is
    deprecated and ``torch.jit.script``s a helper (DeprecationWarning). Recording rather
    than an "ignore" filter because ``awq/__init__.py`` itself runs
    ``warnings.simplefilter("default", DeprecationWarning)``, which would take precedence.
    """
    top = module.split(".")[0]
    if importlib.util.find_spec(top) is None:
        pytest.skip(f"{top} is not installed: run these tests in the legacy venv (make test)")
    with warnings.catch_warnings(record=True):
        return importlib.import_module(module)


@pytest.fixture(scope="session")
def gptq_quant_linears():
    """AutoGPTQ 0.7.1 ``QuantLinear`` classes whose ``pack()`` is pure torch/numpy.

    name -> (class, bits it packs). ``pack()`` of all four only needs the CUDA
    extension at forward time, never to pack. (``qlinear_exllamav2`` and
    ``qlinear_marlin`` have no v1-layout ``pack``; ``qlinear_qigen`` needs ``gekko``
    and a CPU-kernel build.)
    """
    mods = {
        "cuda_old": ("auto_gptq.nn_modules.qlinear.qlinear_cuda_old", (2, 3, 4, 8)),
        "cuda": ("auto_gptq.nn_modules.qlinear.qlinear_cuda", (2, 3, 4, 8)),
        "triton": ("auto_gptq.nn_modules.qlinear.qlinear_triton", (2, 4, 8)),
        "exllama": ("auto_gptq.nn_modules.qlinear.qlinear_exllama", (4,)),
    }
    return {name: (_import_upstream(mod).QuantLinear, bits) for name, (mod, bits) in mods.items()}


@pytest.fixture(scope="session")
def gptq_quantizer_cls():
    """AutoGPTQ 0.7.1's ``auto_gptq.quantization.quantizer.Quantizer``."""
    return _import_upstream("auto_gptq.quantization.quantizer").Quantizer


@pytest.fixture(scope="session")
def awq_gemm():
    """AutoAWQ 0.2.9's ``awq.modules.linear.gemm`` module (``WQLinear_GEMM``)."""
    return _import_upstream("awq.modules.linear.gemm")


@pytest.fixture(scope="session")
def awq_packing_utils():
    """AutoAWQ 0.2.9's ``awq.utils.packing_utils`` (its own unpack / AWQ->exllama repack)."""
    return _import_upstream("awq.utils.packing_utils")

