"""Scoped shims for GPTQModel 7.6 (each restores what it patched on exit).

gptqmodel picks its loop processor and per-layer GPTQ class by module-level names that
``BaseQModel._quantize_with_calibration`` imports at call time; :func:`afpq_processors`
points those names at the AFPQ classes for the duration of one ``quantize()`` call, so an
INT config quantized in the same process (before, after or in another model object) runs
gptqmodel's stock code. It also replaces ``models.base.select_quant_linear``: gptqmodel
7.6 checks before quantizing that one of its INT kernels can pack the result (for AWQ on
CPU none can: "AWQ: CUDA is not available"); AFPQ packs into its own modules, so the
check answers with a placeholder class that no module is an instance of. For AWQ it also
folds scales into Gemma 3 style norms correctly (:func:`.awq_search.fixed_norm_folding`).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

from torch import nn

from .._patching import patched

__all__ = ["afpq_processors"]


class AFPQPacked(nn.Module):
    """Placeholder kernel class for gptqmodel's bookkeeping; AFPQ layers are AFPQLinear."""


def _no_kernel(*args, **kwargs):
    return AFPQPacked


@contextlib.contextmanager
def afpq_processors(gptq_processor=None, awq_processor=None, gptq_cls=None) -> Iterator[None]:
    """Swap ``gptq_processor.GPTQProcessor`` / ``.GPTQ`` and ``awq_processor.AWQProcessor`` (gptqmodel 7.6),
    each through :func:`afpq_plugins._patching.patched` (restored on exit, in reverse order)."""
    from gptqmodel.looper import awq_processor as awq_mod
    from gptqmodel.looper import gptq_processor as gptq_mod
    from gptqmodel.models import base as base_mod

    patches = [(gptq_mod, "GPTQProcessor", gptq_processor), (gptq_mod, "GPTQ", gptq_cls),
               (awq_mod, "AWQProcessor", awq_processor), (base_mod, "select_quant_linear", _no_kernel)]
    with contextlib.ExitStack() as stack:
        for mod, name, new in patches:
            if new is not None:
                stack.enter_context(patched(mod, name, new))
        if awq_processor is not None:
            from .awq_search import fixed_norm_folding

            stack.enter_context(fixed_norm_folding())
        yield
