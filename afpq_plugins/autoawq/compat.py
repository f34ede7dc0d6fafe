"""Scoped shims for AutoAWQ 0.2.9 (each patches one name and restores it)."""

from __future__ import annotations

import contextlib
import functools

from .._patching import patched


@contextlib.contextmanager
def awq_progress(enabled: bool):
    """Silence AutoAWQ 0.2.9's "AWQ" progress bar when ``enabled`` is False.

    ``awq.quantize.quantizer`` does ``from tqdm import tqdm`` and calls it with no way
    to disable it (and tqdm reads ``TQDM_DISABLE`` only at import), so for the duration
    of the block that module's ``tqdm`` name is a ``partial(tqdm, disable=True)``.
    """
    if enabled:
        yield
        return
    import awq.quantize.quantizer as qmod

    with patched(qmod, "tqdm", functools.partial(qmod.tqdm, disable=True)):
        yield


@contextlib.contextmanager
def snapshot_state_dict(module):
    """Make ``module.state_dict()`` return copies, for the duration of the block.

    AutoAWQ 0.2.9's ``AwqQuantizer._compute_best_scale`` saves the block's weights as
    ``{k: v.cpu() for k, v in module2inspect.state_dict().items()}`` and, for each of
    its 20 candidate ratios, scales the weights *in place* (``fc.weight.mul_``) before
    restoring them with ``load_state_dict``. On CUDA ``.cpu()`` copies; on CPU it
    returns the live tensor, so the "saved" weights are scaled too and the scales of
    all candidates pile up in the weights (measured on SmolLM2: the float model after
    AWQ's scaling is 13% off in relative squared logit error, and AWQ ends far worse
    than RTN). Patches one name, the instance attribute ``state_dict`` of this module
    (removed afterwards); a no-op when the module's parameters are not on the CPU.
    """
    params = list(module.parameters())
    if not params or params[0].device.type != "cpu" or "state_dict" in vars(module):
        yield
        return
    cls_state_dict = type(module).state_dict

    def copied(*args, **kwargs):
        return {k: v.clone() for k, v in cls_state_dict(module, *args, **kwargs).items()}

    object.__setattr__(module, "state_dict", copied)
    try:
        yield
    finally:
        object.__delattr__(module, "state_dict")
