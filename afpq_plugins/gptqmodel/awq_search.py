"""AWQ's smoothing-scale search for GPTQModel 7.6, with the float weights kept safe.

Why this exists: gptqmodel 7.6's ``AWQProcessor._compute_best_scale`` keeps "a master
copy" of each weight as ``weight.detach().to(torch.float32).cpu().contiguous()``. For
a float32 model on the CPU every one of those calls returns the weight itself, so the
"copy" is the live tensor: each candidate scale quantizes the weights in place, the
"restore" copies the tensor onto itself, and the next candidate starts from the
previous one's quantized weights. After the 20 candidates the weights are the product
of 20 nested quantizations (on SmolLM2-135M layer 0, ``q_proj``'s largest entry grows
from 5.25 to 339 before the chosen scale is even applied), and the search's losses are
meaningless. The model that comes out is broken (perplexity ~8e7 at INT3 g64), for
gptqmodel's stock INT grid as much as for an AFPQ one. On a GPU, or with fp16/bf16
weights, the ``.cpu()`` or ``.to(float32)`` call copies and the search is correct.

:func:`compute_best_scale` is the same search (for each ratio ``r`` in ``0, 1/n, ...``:
``s = x_mean^r / w_mean^(1-r)`` (``duo_scaling``) or ``x_mean^r``, normalised by
``sqrt(max(s) min(s))``; quantize ``W * s`` with the processor's own
``pseudo_quantize_tensor``, divide by ``s``, run the module on the calibration inputs and
score the mean squared difference to the float output; keep the best ``s``), written
with true clones of the weights. The forward passes and the reference outputs are
gptqmodel's own (``_iter_module_forward_outputs``, ``_iter_reference_output_chunks``), so
attention kwargs, rotary embeddings and micro-batching are unchanged. The AFPQ AWQ
processor uses it always; :func:`fixed_scale_search` puts it under gptqmodel's stock
``AWQProcessor`` for a scoped run (e.g. a fair stock-INT baseline).
"""

from __future__ import annotations

import contextlib
from typing import Dict, Iterator, List, Tuple

import torch
from torch import nn

__all__ = ["compute_best_scale", "candidate_scales", "fixed_scale_search", "N_GRID"]

N_GRID = 20


def candidate_scales(x_mean: torch.Tensor, w_mean: torch.Tensor, ratio: float, duo: bool) -> torch.Tensor:
    """One candidate per-input-channel scale of AWQ's grid (non-finite entries set to 1)."""
    if duo:
        s = x_mean.pow(ratio) / (w_mean.pow(1 - ratio) + 1e-4)
    else:
        s = x_mean.pow(ratio)
    s = s.clamp(min=1e-4)
    s = s / (s.max() * s.min()).sqrt()
    return torch.where(torch.isfinite(s), s, torch.ones_like(s))


@torch.inference_mode()
def compute_best_scale(self, x: torch.Tensor, w_mean: torch.Tensor, x_mean: torch.Tensor,
                       module2inspect: nn.Module, linears2scale: List[nn.Linear], fp16_output,
                       kwargs: Dict = {}) -> Tuple[torch.Tensor, float]:
    """Drop-in for gptqmodel 7.6's ``AWQProcessor._compute_best_scale`` (same arguments and result)."""
    masters = [fc.weight.detach().clone() for fc in linears2scale]  # true copies, whatever device/dtype
    device = masters[0].device
    x_mean = x_mean.reshape(-1).to(device=device, dtype=torch.float32)
    w_mean = w_mean.reshape(-1).to(device=device, dtype=torch.float32)
    hint = getattr(getattr(self, "_scale_context", None), "prev_scale", None)
    if hint is not None:  # gptqmodel's weighting by the previous subset's mean |w|, kept as upstream
        w_mean = w_mean * float(hint)
    duo = bool(getattr(self, "duo_scaling", True))
    best: Tuple[float, torch.Tensor] = (float("inf"), None)
    history = []
    try:
        for i in range(N_GRID):
            s = candidate_scales(x_mean, w_mean, i / N_GRID, duo)
            for fc, w in zip(linears2scale, masters):
                s_row = s.to(w.dtype).view(1, -1)
                wq = self.pseudo_quantize_tensor(w * s_row)[0]
                fc.weight.data.copy_(wq / s_row)
            total, count = 0.0, 0
            for ref, out in zip(self._iter_reference_output_chunks(x, fp16_output),
                                self._iter_module_forward_outputs(x, module2inspect, kwargs)):
                diff = ref.to(device=out.device, dtype=torch.float32) - out.float()
                total += float(diff.pow(2).sum())
                count += diff.numel()
            loss = total / max(count, 1)
            history.append(loss)
            if loss < best[0]:
                best = (loss, s.clone())
    finally:
        for fc, w in zip(linears2scale, masters):
            fc.weight.data.copy_(w)
    if best[1] is None:
        raise RuntimeError(f"AWQ scale search: no finite loss over {N_GRID} candidates (losses: {history})")
    return best[1].detach().cpu(), best[0]


@contextlib.contextmanager
def fixed_scale_search() -> Iterator[None]:
    """gptqmodel's stock ``AWQProcessor`` with :func:`compute_best_scale` for the duration (restored on exit)."""
    from gptqmodel.looper.awq_processor import AWQProcessor

    from .._patching import patched

    with patched(AWQProcessor, "_compute_best_scale", compute_best_scale):
        yield
