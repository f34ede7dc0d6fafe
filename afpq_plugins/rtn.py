"""Round to nearest, the registry's ``rtn`` method (engine ``core``): no calibration unless the
scale search asks for it (``scale_search="output"`` collects each Linear's input energies) or a
bits budget is given.

With ``bits_budget`` (``afpq quantize --bits-budget 3.5``) each Linear gets its own format,
group size and mode from a candidate set (:data:`~afpq_plugins.core.budget.DEFAULT_CANDIDATES`
unless given), chosen to minimise the summed relative output-aware error of the layers,
``sum_j h_j (w - q(w))^2 / sum_j h_j w^2`` (``h = diag(X^T X)`` of the layer's calibration
inputs: the output search's objective, over the layer's output energy; each candidate scored
with its min/max scales) with the average bits per weight, counted as the
peers table counts them, within the budget; layers a host fuses (q/k/v, gate/up) get one
choice together (:mod:`afpq_plugins.core.budget`). The spec's scale search then quantizes each
layer with its chosen setting; the checkpoint records the per-module settings in
``quantization_config.modules``.
"""

from __future__ import annotations

from dataclasses import replace

import torch

import math
import time
from typing import Dict, Optional, Sequence

from .core import budget as B
from .core.checkpoint import AFPQConfigDict
from .core.output_search import BoundOutputSearch, grouped_energies, input_energies, is_output_search
from .core.quantize import fake_quantize
from .core.spec import QuantSpec
from .model import find_linears, quantize_model_rtn

__all__ = ["run", "RTN_OUTPUT_CALIBRATION", "output_searches", "budgeted_specs", "layer_errors", "calibration_samples"]

#: RTN's calibration for the output search when none is given (nsamples x seqlen tokens).
RTN_OUTPUT_CALIBRATION = (32, 512)


def run(model, tokenizer, spec: QuantSpec, calib, progress: bool = True, fake: bool = False,
        bits_budget: Optional[float] = None, candidates: Optional[Sequence[B.Candidate]] = None) -> AFPQConfigDict:
    """RTN of ``model``'s Linears with ``spec``; ``fake=True`` keeps ``nn.Linear`` modules holding
    the decoded weights (what the packed modules decode to, bit for bit; faster to evaluate on CPU).
    ``bits_budget``: per-layer settings under that average bits per weight (module docstring)."""
    spec = spec.resolved("rtn")
    linears = find_linears(model, spec.skip)
    energies = None
    if is_output_search(spec.scale_search) or bits_budget is not None:
        energies = calibration_energies(model, tokenizer, linears, calib, progress)
    layer_specs, extra = None, {}
    if bits_budget is not None:
        layer_specs, extra = budgeted_specs(linears, energies, spec, bits_budget, candidates, progress)
        spec = _most_common(layer_specs, linears)
    specs = {n: (layer_specs or {}).get(n, spec) for n in linears}
    layer_searches = None
    if is_output_search(spec.scale_search):
        layer_searches = {n: BoundOutputSearch(spec.scale_search, grouped_energies(energies[n], specs[n].group_size),
                                               name=n) for n in linears}
    if not fake:
        return quantize_model_rtn(model, progress=progress, layer_searches=layer_searches, spec=spec,
                                  layer_specs=layer_specs, extra=extra or None)
    with torch.no_grad():
        for name, lin in linears.items():
            s = specs[name]
            lin.weight.copy_(fake_quantize(lin.weight, s.format, s.group_size, s.mode,
                                           scale_dtype=s.torch_scale_dtype, name=name,
                                           search=(layer_searches or {}).get(name, s.scale_search)))
    return AFPQConfigDict.from_spec(spec, "rtn", quantized_modules=list(linears), layer_specs=layer_specs,
                                    extra={**extra, "fake": True})


def calibration_samples(tokenizer, calib) -> list:
    """RTN's calibration windows (token-id tensors; default size :data:`RTN_OUTPUT_CALIBRATION`)."""
    if tokenizer is None:
        raise ValueError("RTN with scale search 'output' or a bits budget needs calibration activations: "
                         "pass the tokenizer")
    calib = replace(calib, nsamples=calib.nsamples or RTN_OUTPUT_CALIBRATION[0],
                    seqlen=calib.seqlen or RTN_OUTPUT_CALIBRATION[1])
    return list(calib.samples(tokenizer))


def calibration_energies(model, tokenizer, linears, calib, progress: bool) -> Dict[str, torch.Tensor]:
    """Each Linear's input energies ``diag(X^T X)`` over the calibration samples (forward hooks;
    default calibration :data:`RTN_OUTPUT_CALIBRATION`)."""
    return input_energies(model, linears, calibration_samples(tokenizer, calib), progress=progress)


def output_searches(model, tokenizer, spec: QuantSpec, calib, progress: bool):
    """For the output search: the search bound to each Linear's input energies ``diag(X^T X)``
    over the calibration samples (forward hooks); None for other searches."""
    if not is_output_search(spec.scale_search):
        return None
    linears = find_linears(model, spec.skip)
    energies = calibration_energies(model, tokenizer, linears, calib, progress)
    return {n: BoundOutputSearch(spec.scale_search, grouped_energies(h, spec.group_size), name=n)
            for n, h in energies.items()}


def layer_errors(weight: torch.Tensor, energies: torch.Tensor, specs: Sequence[QuantSpec], name: str = "weight"):
    """``sum_j h_j (w_ij - q(w)_ij)^2`` of one ``[out, in]`` weight under each spec (min/max scales;
    ``inf`` where the spec's group size does not divide the layer)."""
    w = weight.detach().float()
    h = energies.float().reshape(1, -1)
    out = []
    for s in specs:
        try:
            s.groups(w.shape[1], name)
        except ValueError:
            out.append(math.inf)
            continue
        q = fake_quantize(w, s.format, s.group_size, s.mode, s.torch_scale_dtype, name=name, search=None)
        out.append(float(((w - q.float()) ** 2 * h).sum(dtype=torch.float64)))
    return out


def budgeted_specs(linears, energies, spec: QuantSpec, bits_budget: float,
                   candidates: Optional[Sequence[B.Candidate]] = None, progress: bool = True):
    """``({layer: spec}, extra config keys)``: the per-layer choice under ``bits_budget``."""
    t0 = time.perf_counter()
    specs = B.candidate_specs(spec, candidates or B.DEFAULT_CANDIDATES)
    shapes = {n: (lin.in_features, lin.out_features) for n, lin in linears.items()}
    errs = {}
    it = linears.items()
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, total=len(linears), desc=f"bits budget {bits_budget}: scoring {len(specs)} candidates",
                  unit="layer")
    for n, lin in it:
        # each layer's error relative to its output energy sum_j h_j ||w_:j||^2: the fraction of the
        # layer's output signal the candidate loses (raw errors are dominated by the few layers with
        # the largest activations, which then take the bits every other layer needs)
        w = lin.weight.detach().float()
        ref = float((w * w * energies[n].float().reshape(1, -1)).sum(dtype=torch.float64)) or 1.0
        errs[n] = [e / ref for e in layer_errors(lin.weight, energies[n], specs, n)]
    units = B.fused_units(list(linears))
    unit_err = [[math.fsum(errs[n][c] for n in u) for c in range(len(specs))] for u in units]
    unit_cost = [B.unit_costs(specs, shapes, u) for u in units]
    total = sum(i * o for i, o in shapes.values())
    alloc = B.allocate(unit_err, unit_cost, math.floor(bits_budget * total))
    chosen = {n: specs[c] for u, c in zip(units, alloc.choice) for n in u}
    bpw = alloc.bits / total
    extra = {"bits_budget": bits_budget, "bits_per_weight": round(bpw, 6),
             "allocation": {"candidates": [c.label() for c in (candidates or B.DEFAULT_CANDIDATES)],
                            "error": "per layer sum_j h_j (w - q(w))^2 / sum_j h_j w^2 (h = diag(X^T X)), "
                                     "min/max scales, summed over layers",
                            "exact": alloc.exact, "seconds": round(time.perf_counter() - t0, 2),
                            "shares": {k: round(v, 4) for k, v in B.summary(chosen, shapes).items()}}}
    return chosen, extra


def _most_common(layer_specs: Dict[str, QuantSpec], linears) -> QuantSpec:
    """The spec covering the most weights (the checkpoint's top-level keys; the rest go to ``modules``)."""
    weight: Dict[QuantSpec, int] = {}
    for n, s in layer_specs.items():
        weight[s] = weight.get(s, 0) + linears[n].in_features * linears[n].out_features
    return max(weight, key=weight.get)
