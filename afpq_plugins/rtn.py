"""Round to nearest, the registry's ``rtn`` method (engine ``core``): no calibration unless the
scale search asks for it (``scale_search="output"`` collects each Linear's input energies).
"""

from __future__ import annotations

from dataclasses import replace

import torch

from .core.checkpoint import AFPQConfigDict
from .core.output_search import bind_layers, input_energies, is_output_search
from .core.quantize import fake_quantize
from .core.spec import QuantSpec
from .model import find_linears, quantize_model_rtn

__all__ = ["run", "RTN_OUTPUT_CALIBRATION", "output_searches"]

#: RTN's calibration for the output search when none is given (nsamples x seqlen tokens).
RTN_OUTPUT_CALIBRATION = (32, 512)


def run(model, tokenizer, spec: QuantSpec, calib, progress: bool = True, fake: bool = False) -> AFPQConfigDict:
    """RTN of ``model``'s Linears with ``spec``; ``fake=True`` keeps ``nn.Linear`` modules holding
    the decoded weights (what the packed modules decode to, bit for bit; faster to evaluate on CPU)."""
    spec = spec.resolved("rtn")
    layer_searches = output_searches(model, tokenizer, spec, calib, progress)
    if not fake:
        return quantize_model_rtn(model, progress=progress, layer_searches=layer_searches, spec=spec)
    linears = find_linears(model, spec.skip)
    with torch.no_grad():
        for name, lin in linears.items():
            lin.weight.copy_(fake_quantize(lin.weight, spec.format, spec.group_size, spec.mode,
                                           scale_dtype=spec.torch_scale_dtype, name=name,
                                           search=(layer_searches or {}).get(name, spec.scale_search)))
    return AFPQConfigDict.from_spec(spec, "rtn", quantized_modules=list(linears), extra={"fake": True})


def output_searches(model, tokenizer, spec: QuantSpec, calib, progress: bool):
    """For the output search: the search bound to each Linear's input energies ``diag(X^T X)``
    over the calibration samples (forward hooks); None for other searches."""
    if not is_output_search(spec.scale_search):
        return None
    if tokenizer is None:
        raise ValueError("RTN with scale search 'output' needs calibration activations: pass the tokenizer")
    calib = replace(calib, nsamples=calib.nsamples or RTN_OUTPUT_CALIBRATION[0],
                    seqlen=calib.seqlen or RTN_OUTPUT_CALIBRATION[1])
    linears = find_linears(model, spec.skip)
    energies = input_energies(model, linears, calib.samples(tokenizer), progress=progress)
    return bind_layers(spec.scale_search, energies, spec.group_size)
