"""Per-weight loss sensitivities for the bits budget: the diagonal Fisher of each Linear.

A weight error ``E`` (``[out, in]``) of one Linear changes the layer output by ``E x_t`` at each
token ``t``; to second order the calibration loss grows by about
``1/2 sum_t (g_t^T E x_t)^2`` (``g_t`` the loss gradient at the layer's output, the
Gauss-Newton / empirical-Fisher approximation). Keeping the diagonal terms::

    dL ~ 1/2 sum_ij F_ij E_ij^2,    F_ij = sum_t g_ti^2 x_tj^2

``F`` is ``(G * G)^T (X * X)`` over the calibration tokens: one forward and backward pass per
sample. Unlike ``diag(X^T X)`` alone it weighs each layer by how much its output matters to
the loss, so errors of different layers are on one scale (an absolute, not a per-layer relative,
objective) and a budget can trade bits between them.

The loss is next-token cross entropy summed over each sample's tokens (so every token weighs
alike whatever the sample count).
"""

from __future__ import annotations

from typing import Dict, Iterable, Optional

import torch

__all__ = ["fisher_weights"]


def fisher_weights(model: torch.nn.Module, modules: Dict[str, torch.nn.Module],
                   samples: Iterable[torch.Tensor], row_stride: int = 1,
                   energies: Optional[Dict[str, torch.Tensor]] = None) -> Dict[str, torch.Tensor]:
    """``{name: F}`` with ``F[i, j] = sum_t g_ti^2 x_tj^2`` (float32 ``[out, in]``) for each module
    of ``modules`` (``nn.Linear``), over ``samples`` (token-id tensors) through ``model`` (a causal
    LM returning ``.logits``). ``row_stride=k``: only rows ``0, k, 2k, ...`` (``F[::k]``, ``k``
    times cheaper; what the budget's row-sampled scoring needs). ``energies``: a dict filled, in
    the same pass, with each module's ``diag(X^T X)`` (float32 ``[in]``, as
    :func:`~afpq_plugins.core.output_search.input_energies` returns). Hooks are removed and parameter
    gradients cleared afterwards, even on error; the model's ``requires_grad`` flags and training
    mode are restored."""
    if not isinstance(row_stride, int) or row_stride < 1:
        raise ValueError(f"fisher_weights: row_stride must be a positive integer, got {row_stride!r}")
    acc: Dict[str, torch.Tensor] = {}
    xs: Dict[str, torch.Tensor] = {}
    if energies is not None:
        energies.clear()

    def fwd(name):
        def hook(mod, args, out):
            xs[name] = x2 = args[0].detach().reshape(-1, args[0].shape[-1]).float() ** 2
            if energies is not None:
                h = x2.sum(0)
                if name in energies:
                    energies[name] += h
                else:
                    energies[name] = h
            if out.requires_grad:
                def grad_hook(g, name=name):
                    g2 = g.detach().reshape(-1, g.shape[-1])[:, ::row_stride].float() ** 2
                    v = g2.t() @ xs.pop(name)
                    if name in acc:
                        acc[name] += v
                    else:
                        acc[name] = v
                out.register_hook(grad_hook)
        return hook

    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    training = model.training
    handles = [m.register_forward_hook(fwd(n)) for n, m in modules.items()]
    try:
        model.eval()
        for p in params:
            p.requires_grad_(False)
        emb = model.get_input_embeddings()
        dev = next(model.parameters()).device
        for s in samples:
            s = torch.as_tensor(s).reshape(1, -1).to(dev)
            with torch.enable_grad():
                e = emb(s).detach().requires_grad_(True)  # the graph starts here: no parameter gradients
                logits = model(inputs_embeds=e).logits.float()
                loss = torch.nn.functional.cross_entropy(logits[0, :-1], s[0, 1:], reduction="sum")
                loss.backward()
            xs.clear()
    finally:
        for h in handles:
            h.remove()
        for p, f in zip(params, flags):
            p.requires_grad_(f)
            p.grad = None
        model.train(training)
    missing = [n for n in modules if n not in acc]
    if missing:
        raise ValueError(f"no loss gradient reached module(s) {missing[:3]} (not called in the forward pass)")
    return acc
