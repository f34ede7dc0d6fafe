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

A second gap, for models with one rotary embedding per attention type (Gemma 3 in
transformers 5: ``Gemma3RotaryEmbedding.forward(x, position_ids, layer_type)``):
gptqmodel 7.6 recomputes the position embeddings for its AWQ forwards as
``rotary(x, position_ids)``, a ``TypeError`` there, stock INT included.
:func:`rotary_for_layer` wraps such a rotary so that it is called with the layer type of
the attention module being run (its ``layer_type``).

A third: gptqmodel 7.6 folds AWQ's scales into a preceding norm by dividing its weight,
and knows only Gemma and Gemma 2's norms as ``x_hat * (1 + weight)``; Gemma 3's norm has
the same form, so its folded gain becomes ``1 + w/s`` instead of ``(1 + w)/s`` and the
model drifts (a tiny Gemma 3 at NF4 g32: output error 0.58 against GPTQ's 0.1).
:func:`fixed_norm_folding` folds into any norm whose weight is an offset from one (found by
running the norm with a zero weight) correctly, and hands every other norm to gptqmodel.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
from typing import Dict, Iterator, List, Tuple

import torch
from torch import nn

__all__ = ["compute_best_scale", "candidate_scales", "fixed_scale_search", "N_GRID", "LayerTypedRotary",
           "rotary_for_layer", "fold_into_offset_norm", "is_offset_norm", "fixed_norm_folding"]

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


def is_offset_norm(ln: nn.Module) -> bool:
    """True when ``ln`` multiplies by ``1 + weight`` (a zero weight leaves the normalised input as is)."""
    w = getattr(ln, "weight", None)
    if not isinstance(w, torch.Tensor) or w.dim() != 1:
        return False
    probe = copy.deepcopy(ln).float()
    with torch.no_grad():
        probe.weight.zero_()
        if getattr(probe, "bias", None) is not None:
            probe.bias.zero_()
        out = probe(torch.linspace(-1.0, 1.0, w.numel()).view(1, -1))
    return bool(out.abs().max() > 0.5)


#: norms of the ``1 + weight`` form that gptqmodel 7.6 already folds correctly
_HANDLED_UPSTREAM = ("GemmaRMSNorm", "Gemma2RMSNorm")


def fold_into_offset_norm(ln: nn.Module, fcs, scales: torch.Tensor) -> None:
    """AWQ's fold for a ``x_hat * (1 + weight)`` norm: gain ``(1 + w) / s``, Linears' columns times ``s``."""
    fcs = fcs if isinstance(fcs, (list, tuple)) else [fcs]
    with torch.no_grad():
        s = scales.to(ln.weight.device)
        ln.weight.add_(1).div_(s).sub_(1)
        if getattr(ln, "bias", None) is not None:
            ln.bias.div_(s)
        for fc in fcs:
            fc.weight.mul_(s.view(1, -1).to(fc.weight.dtype))


@contextlib.contextmanager
def fixed_norm_folding() -> Iterator[None]:
    """gptqmodel's ``scale_ln_fcs`` with :func:`fold_into_offset_norm` for the ``1 + weight`` norms it does
    not know, for the duration (restored on exit)."""
    from gptqmodel.quantization.awq.quantize import scale as upstream

    from .._patching import patched

    stock = upstream.scale_ln_fcs

    def scale_ln_fcs(ln, fcs, scales):
        if type(ln).__name__ not in _HANDLED_UPSTREAM and is_offset_norm(ln):
            fold_into_offset_norm(ln, fcs, scales)
        else:
            stock(ln, fcs, scales)

    with patched(upstream, "scale_ln_fcs", scale_ln_fcs):
        yield


@contextlib.contextmanager
def fixed_scale_search() -> Iterator[None]:
    """gptqmodel's stock ``AWQProcessor`` with :func:`compute_best_scale` for the duration (restored on exit)."""
    from gptqmodel.looper.awq_processor import AWQProcessor

    from .._patching import patched

    with patched(AWQProcessor, "_compute_best_scale", compute_best_scale):
        yield


class LayerTypedRotary(nn.Module):
    """``rotary(x, position_ids)`` for a rotary that also wants the attention type of the layer."""

    def __init__(self, rotary: nn.Module, layer_type: str):
        super().__init__()
        self.rotary = rotary
        self.layer_type = layer_type

    def forward(self, x, position_ids):
        return self.rotary(x, position_ids, layer_type=self.layer_type)


def rotary_for_layer(rotary, layer_type):
    """``rotary`` itself, or a :class:`LayerTypedRotary` when its forward takes ``layer_type`` and the
    module being run has one (else gptqmodel's own call and its own error handling stay as they are)."""
    if rotary is None or layer_type is None or "layer_type" not in inspect.signature(rotary.forward).parameters:
        return rotary
    return LayerTypedRotary(rotary, layer_type)


def fix_mlp_input_norm(qmodel) -> bool:
    """Point AWQ's MLP scaling at ``pre_feedforward_layernorm`` where a model has one (Gemma 3).

    gptqmodel 7.6 describes Gemma 3 text models with Llama's layer tree, in which the norm
    before the MLP is ``post_attention_layernorm``; in Gemma 3 that norm is applied to the
    attention output, and the MLP's input norm is ``pre_feedforward_layernorm``. AWQ folds
    the gate/up scales into the norm before them, so with Llama's tree it folds them into
    the wrong one. This swaps the entry on ``qmodel``'s own tree (the class is untouched).
    Returns whether it changed anything.
    """
    from gptqmodel.models import base

    layers = None
    for name, mod in qmodel.model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) and hasattr(mod[0], "pre_feedforward_layernorm"):
            layers = mod
            break
    if layers is None or not hasattr(layers[0], "post_attention_layernorm"):
        return False
    tree = base._thaw_module_tree(qmodel.effective_module_tree)
    changed = False
    for node in tree:
        if isinstance(node, dict) and "pre_feedforward_layernorm" not in node and tuple(
                node.get("post_attention_layernorm", ())) == ("post_attention_layernorm:!",):
            node["post_attention_layernorm"] = ("pre_feedforward_layernorm:!",)
            changed = True
    if changed:
        qmodel.effective_module_tree = base._freeze_module_tree(tree)
        qmodel.module_tree = qmodel.effective_module_tree
    return changed
