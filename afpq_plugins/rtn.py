"""Round to nearest, the registry's ``rtn`` method (engine ``core``): no calibration unless the
scale search asks for it (``scale_search="output"`` collects each Linear's input energies) or a
bits budget is given.

With ``bits_budget`` (``afpq quantize --bits-budget 3.5``) each Linear gets its own format,
group size and mode from a candidate set (:data:`~afpq_plugins.core.budget.DEFAULT_CANDIDATES`
unless given), chosen to minimise the summed error of the layers with the average bits per
weight, counted as the peers table counts them, within the budget; layers a host fuses (q/k/v,
gate/up) get one choice together (:mod:`afpq_plugins.core.budget`). The error
(``budget_objective``):

* ``"fisher"`` (default): ``sum_ij F_ij (w - q(w))_ij^2`` with ``F_ij = sum_t g_ti^2 x_tj^2``
  over the calibration tokens (``g`` the loss gradient at the layer output:
  :mod:`afpq_plugins.core.sensitivity`), a second-order estimate of the loss increase, so the
  layers' errors are on one scale; each candidate quantized with the run's own scale search
  (the output search when the run uses it), scored on every :func:`score_row_stride`-th row
  (8; 32 with the output search).
* ``"relative"`` (the first objective): ``sum_j h_j (w - q(w))^2 / sum_j h_j w^2``
  (``h = diag(X^T X)``), min/max scales, every row.

The spec's scale search then quantizes each layer with its chosen setting; the checkpoint
records the per-module settings in ``quantization_config.modules``.
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
from .core.sensitivity import fisher_weights
from .core.spec import QuantSpec
from .model import find_linears, quantize_model_rtn

__all__ = ["run", "allocate_budget", "most_common_spec", "RTN_OUTPUT_CALIBRATION", "output_searches", "budgeted_specs", "layer_errors",
           "calibration_samples", "BUDGET_OBJECTIVES", "DEFAULT_BUDGET_OBJECTIVE"]

#: RTN's calibration for the output search when none is given (nsamples x seqlen tokens).
RTN_OUTPUT_CALIBRATION = (32, 512)

#: What a bits budget minimises (``afpq quantize --budget-objective``), summed over the layers.
BUDGET_OBJECTIVES = ("fisher", "relative")
DEFAULT_BUDGET_OBJECTIVE = "fisher"
#: The fisher objective scores rows 0, k, 2k, ... of each layer (k times cheaper; the sum scaled by k):
#: every 8th row with min/max (or mse) scales, every 32nd with the output search, whose scoring costs
#: ~20x more per row (benchmarks/RESULTS.md: strides 8, 16, 32 measured for accuracy and time).
SCORE_ROW_STRIDE = 8
SCORE_ROW_STRIDE_OUTPUT = 32


def score_row_stride(spec: QuantSpec) -> int:
    """The fisher objective's row stride for a run with ``spec``'s scale search."""
    return SCORE_ROW_STRIDE_OUTPUT if is_output_search(spec.scale_search) else SCORE_ROW_STRIDE
_OBJECTIVE_TEXT = {
    "fisher": "per layer sum_ij F_ij (w - q(w))_ij^2, F_ij = sum_t g_ti^2 x_tj^2 (g: the calibration loss "
              "gradient at the layer output), q with the run's scale search, on every {k}th row "
              "(sum scaled by {k}), summed over layers",
    "relative": "per layer sum_j h_j (w - q(w))^2 / sum_j h_j w^2 (h = diag(X^T X)), min/max scales, "
                "summed over layers",
}


def run(model, tokenizer, spec: QuantSpec, calib, progress: bool = True, fake: bool = False,
        bits_budget: Optional[float] = None, candidates: Optional[Sequence[B.Candidate]] = None,
        budget_objective: str = DEFAULT_BUDGET_OBJECTIVE) -> AFPQConfigDict:
    """RTN of ``model``'s Linears with ``spec``; ``fake=True`` keeps ``nn.Linear`` modules holding
    the decoded weights (what the packed modules decode to, bit for bit; faster to evaluate on CPU).
    ``bits_budget``: per-layer settings under that average bits per weight (module docstring),
    chosen by ``budget_objective`` (:data:`BUDGET_OBJECTIVES`)."""
    spec = spec.resolved("rtn")
    if budget_objective not in BUDGET_OBJECTIVES:
        raise ValueError(f"budget objective {budget_objective!r}: expected one of {', '.join(BUDGET_OBJECTIVES)}")
    linears = find_linears(model, spec.skip)
    energies, layer_specs, extra = None, None, {}
    if bits_budget is not None:
        layer_specs, extra, energies = allocate_budget(model, tokenizer, spec, calib, bits_budget, candidates,
                                                       budget_objective, progress, linears=linears)
        spec = most_common_spec(layer_specs, linears)
    elif is_output_search(spec.scale_search):
        energies = calibration_energies(model, tokenizer, linears, calib, progress)
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


def allocate_budget(model, tokenizer, spec: QuantSpec, calib, bits_budget: float,
                    candidates: Optional[Sequence[B.Candidate]] = None,
                    objective: str = DEFAULT_BUDGET_OBJECTIVE, progress: bool = True, linears=None):
    """The per-layer choice under ``bits_budget`` for a run with ``spec`` (its scale search scores
    the candidates): ``({layer: spec}, extra config keys, {layer: input energies})``.

    Shared by RTN and the calibrated methods (:func:`afpq_plugins.methods.quantize` hands the
    choice to the engine as ``layer_specs``); the calibration windows are ``calib``'s
    (default size :data:`RTN_OUTPUT_CALIBRATION`)."""
    if objective not in BUDGET_OBJECTIVES:
        raise ValueError(f"budget objective {objective!r}: expected one of {', '.join(BUDGET_OBJECTIVES)}")
    if tokenizer is None:
        raise ValueError("a bits budget needs calibration activations: pass the tokenizer")
    linears = find_linears(model, spec.skip) if linears is None else linears
    sens = None
    if objective == "fisher":  # one forward + backward pass gives the sensitivities and the input energies
        energies = {}
        sens = fisher_weights(model, linears, _resolved(calib).samples(tokenizer),
                              row_stride=score_row_stride(spec), energies=energies)
    else:
        energies = calibration_energies(model, tokenizer, linears, calib, progress)
    layer_specs, extra = budgeted_specs(linears, energies, spec, bits_budget, candidates, progress,
                                        objective=objective, sensitivities=sens)
    return layer_specs, extra, energies


def calibration_samples(tokenizer, calib) -> list:
    """RTN's calibration windows (token-id tensors; default size :data:`RTN_OUTPUT_CALIBRATION`)."""
    if tokenizer is None:
        raise ValueError("RTN with scale search 'output' or a bits budget needs calibration activations: "
                         "pass the tokenizer")
    return list(_resolved(calib).samples(tokenizer))


def _resolved(calib):
    return replace(calib, nsamples=calib.nsamples or RTN_OUTPUT_CALIBRATION[0],
                   seqlen=calib.seqlen or RTN_OUTPUT_CALIBRATION[1])


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


def layer_errors(weight: torch.Tensor, energies: torch.Tensor, specs: Sequence[QuantSpec], name: str = "weight",
                 sensitivities: Optional[torch.Tensor] = None, row_stride: int = 1, search=None):
    """``sum_j h_j (w_ij - q(w)_ij)^2`` of one ``[out, in]`` weight under each spec (``inf`` where
    the spec's group size does not divide the layer); with ``sensitivities`` (``F``:
    :func:`~afpq_plugins.core.sensitivity.fisher_weights`) ``sum_ij F_ij (w - q)_ij^2``.

    ``q`` uses ``search`` (``None``: min/max scales; an unbound output search is bound to
    ``energies`` at each spec's group size). ``row_stride=k`` scores rows ``0, k, 2k, ...`` only
    (``sensitivities`` then holds those rows) and scales the sum by ``out / rows scored``: the
    scale choice is per row and group, so the scored rows' errors are exact."""
    w = weight.detach().float()[::row_stride]
    scale = weight.shape[0] / w.shape[0]
    h = energies.float().reshape(1, -1) if sensitivities is None else sensitivities.float()
    if sensitivities is not None and tuple(h.shape) != tuple(w.shape):
        raise ValueError(f"{name}: sensitivities of shape {tuple(h.shape)} for rows [::{row_stride}] of a "
                         f"{tuple(weight.shape)} weight (expected {tuple(w.shape)})")
    out = []
    for s in specs:
        try:
            s.groups(w.shape[1], name)
        except ValueError:
            out.append(math.inf)
            continue
        sr = (BoundOutputSearch(search, grouped_energies(energies, s.group_size), name=name)
              if is_output_search(search) else search)
        q = fake_quantize(w, s.format, s.group_size, s.mode, s.torch_scale_dtype, name=name, search=sr)
        out.append(scale * float(((w - q.float()) ** 2 * h).sum(dtype=torch.float64)))
    return out


def budgeted_specs(linears, energies, spec: QuantSpec, bits_budget: float,
                   candidates: Optional[Sequence[B.Candidate]] = None, progress: bool = True,
                   objective: str = "relative", sensitivities: Optional[Dict[str, torch.Tensor]] = None):
    """``({layer: spec}, extra config keys)``: the per-layer choice under ``bits_budget``.

    ``objective="relative"``: each layer's ``sum h e^2 / sum h w^2``; ``"fisher"``: each layer's
    ``sum F e^2`` with ``sensitivities[layer] = F`` (a second-order estimate of the calibration
    loss increase, on one scale across layers)."""
    if objective == "fisher" and sensitivities is None:
        raise ValueError("budget objective 'fisher' needs the layers' sensitivities (fisher_weights)")
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
        if objective == "fisher":  # the run's own scale search, on every score_row_stride(spec)-th row
            errs[n] = layer_errors(lin.weight, energies[n], specs, n, sensitivities=sensitivities[n],
                                   row_stride=score_row_stride(spec), search=spec.scale_search)
            continue
        # each layer's error relative to its output energy sum_j h_j ||w_:j||^2: the fraction of the
        # layer's output signal the candidate loses (raw h-weighted errors are dominated by the few
        # layers with the largest activations, which then take the bits every other layer needs)
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
                            "objective": objective,
                            "error": _OBJECTIVE_TEXT[objective].format(k=score_row_stride(spec)),
                            "exact": alloc.exact, "seconds": round(time.perf_counter() - t0, 2),
                            "shares": {k: round(v, 4) for k, v in B.summary(chosen, shapes).items()}}}
    return chosen, extra


def most_common_spec(layer_specs: Dict[str, QuantSpec], linears) -> QuantSpec:
    """The spec covering the most weights (the checkpoint's top-level keys; the rest go to ``modules``)."""
    weight: Dict[QuantSpec, int] = {}
    for n, s in layer_specs.items():
        weight[s] = weight.get(s, 0) + linears[n].in_features * linears[n].out_features
    return max(weight, key=weight.get)
