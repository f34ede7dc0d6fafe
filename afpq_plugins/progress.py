"""What the CLI prints around a long quantization run: the plan line and the first-layer estimate."""

from __future__ import annotations

from typing import Callable

__all__ = ["decoder_layers", "describe_plan", "FirstLayerTimer"]


def decoder_layers(model):
    """The model's repeated decoder blocks (the largest ``nn.ModuleList``), or None."""
    import torch

    best = None
    for _, mod in model.named_modules():
        if isinstance(mod, torch.nn.ModuleList) and len(mod) and (best is None or len(mod) > len(best)):
            best = mod
    return best


def describe_plan(method, model, calib) -> str:
    """One line: engine, layers, samples x tokens, device (printed by the CLI before a long run)."""
    from .model import find_linears

    layers = decoder_layers(model)
    dev = next(model.parameters()).device
    nl = len(layers) if layers is not None else "?"
    return (f"afpq quantize: {method.name} through {method.engine}; {nl} decoder layers, "
            f"{len(find_linears(model))} Linear layers; calibration {calib.nsamples} x {calib.seqlen} tokens "
            f"(--nsamples/--calib-seqlen); device {dev}")


class FirstLayerTimer:
    """Prints, once, an estimate of the whole run from the time the first decoder layer took.

    Calibrated engines quantize layer by layer: the first forward of decoder layer 1 marks
    the end of layer 0 (its calibration forwards, its quantization, its output pass).
    Forward pre-hooks only; removed on exit.
    """

    def __init__(self, model, log: Callable[[str], None]):
        self.layers = decoder_layers(model)
        self.log = log
        self.handles = []
        self.t0 = None
        self.done = False

    def __enter__(self):
        import time

        if self.layers is None or len(self.layers) < 2:
            return self

        def first(mod, inp):
            if self.t0 is None:
                self.t0 = time.perf_counter()

        def second(mod, inp):
            if self.t0 is not None and not self.done:
                self.done = True
                dt = time.perf_counter() - self.t0
                n = len(self.layers)
                self.log(f"afpq quantize: the first of {n} layers took {dt:.0f}s; the whole run should take about "
                         f"{dt * n / 60:.1f} min on this machine (fewer --nsamples / --calib-seqlen is faster)")

        self.handles = [self.layers[0].register_forward_pre_hook(first),
                        self.layers[1].register_forward_pre_hook(second)]
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        return False


