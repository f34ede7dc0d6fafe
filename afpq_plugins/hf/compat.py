"""Scoped shims for running optimum's GPTQ with the AFPQ grid (each patches one name and
restores it on exit; none is active outside its ``with`` block).

* :func:`gptq_class` is the injection point, not a workaround: optimum (2.0.0 and 2.3.0)
  builds its per-layer GPTQ object as ``GPTQ(layer)`` / ``GPTQ(layer, qcfg=...)`` from
  the module-level name ``optimum.gptq.quantizer.GPTQ`` and offers no hook to choose
  the class; for one ``quantize_model`` call that name points at the AFPQ subclass.
* :func:`cpu_calibration_optimum_2_0` (optimum 2.0.0 with auto-gptq only): its
  ``GPTQQuantizer.quantize_model`` moves CPU calibration inputs and blocks to CUDA
  device 0 (``if not is_gptqmodel_available() and device.type == "cpu": device = 0``,
  twice) because auto-gptq < 0.7 could not quantize on CPU. On a machine without CUDA
  ``optimum.gptq.quantizer.is_gptqmodel_available`` answers True for that call, which
  keeps them on the CPU. Its other effects inside ``quantize_model`` are harmless here:
  ``checkpoint_format`` becomes ``"gptq_v2"`` (the AFPQ subclass writes its own format
  and overrides ``pack_model`` / ``post_init_model`` / ``save``, the only places that
  use gptqmodel), and optimum would log "Detected gptqmodel and auto-gptq, will use
  gptqmodel", which is false here: that one record is filtered out while the shim is on.
* auto-gptq 0.7.1's ``GPTQ.fasterquant`` calls ``torch.cuda.synchronize()``: the shared
  shim ``afpq_plugins._patching.no_cuda_synchronize`` (also the AutoGPTQ adapter's) is reused.

optimum 2.3.0 with gptqmodel 7.6.0 needs no CPU shim.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Iterator

import torch

from .._patching import no_cuda_synchronize, patched

__all__ = ["patched", "gptq_class", "cpu_calibration_optimum_2_0", "no_cuda_synchronize"]


@contextlib.contextmanager
def gptq_class(cls) -> Iterator[None]:
    """``optimum.gptq.quantizer.GPTQ`` is ``cls`` inside the block."""
    from optimum.gptq import quantizer as oq

    with patched(oq, "GPTQ", cls):
        yield


@contextlib.contextmanager
def cpu_calibration_optimum_2_0() -> Iterator[None]:
    """See the module docstring; a no-op with CUDA or with gptqmodel installed."""
    from optimum.gptq import quantizer as oq

    if torch.cuda.is_available() or oq.is_gptqmodel_available():
        yield
        return
    class _DropFalseBackendNote(logging.Filter):
        def filter(self, record):
            return "Detected gptqmodel and auto-gptq" not in record.getMessage()

    note = _DropFalseBackendNote()
    oq.logger.addFilter(note)
    try:
        with patched(oq, "is_gptqmodel_available", lambda: True):
            yield
    finally:
        oq.logger.removeFilter(note)
