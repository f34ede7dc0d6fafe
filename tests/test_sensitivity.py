"""The bits budget's loss sensitivities (afpq_plugins.core.sensitivity.fisher_weights) against an
independent float64 route: a per-token copy of each weight whose gradient is g_t x_t^T exactly."""

from __future__ import annotations

import pytest
import torch

from afpq_plugins.core.sensitivity import fisher_weights


def _reference(model, name, samples):
    """F[i, j] = sum_t (dL/dW_t[i, j])^2 with W_t a per-token copy of the layer's weight (float64)."""
    lin = dict(model.named_modules())[name]
    total = torch.zeros_like(lin.weight, dtype=torch.float64)
    orig = lin.forward
    for s in samples:
        T = s.numel()
        delta = torch.zeros(T, *lin.weight.shape, dtype=torch.float64, requires_grad=True)

        def per_token(x, lin=lin, delta=delta):  # y_t = (W + delta_t) x_t: same value, per-token gradient
            return torch.nn.functional.linear(x, lin.weight, lin.bias) + torch.einsum("btj,tij->bti", x, delta)

        lin.forward = per_token
        try:
            logits = model(s.reshape(1, -1)).logits
            loss = torch.nn.functional.cross_entropy(logits[0, :-1], s[1:], reduction="sum")
            (g,) = torch.autograd.grad(loss, delta)
        finally:
            lin.forward = orig
        total += (g ** 2).sum(0)
    return total


def test_fisher_weights_match_a_per_token_float64_reference():
    pytest.importorskip("transformers")
    from _tiny import tiny_llama

    model = tiny_llama(vocab_size=96, hidden=32).double()
    names = ["model.layers.0.self_attn.k_proj", "model.layers.1.mlp.down_proj", "model.layers.0.mlp.up_proj"]
    mods = {n: dict(model.named_modules())[n] for n in names}
    gen = torch.Generator().manual_seed(0)
    samples = [torch.randint(0, 96, (n,), generator=gen) for n in (9, 13)]
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    F = fisher_weights(model, mods, samples)
    assert set(F) == set(names)
    for n in names:
        assert F[n].shape == mods[n].weight.shape and F[n].dtype == torch.float32
        ref = _reference(model, n, samples)
        assert float(ref.abs().max()) > 0
        torch.testing.assert_close(F[n].double(), ref, rtol=1e-4, atol=1e-9 * float(ref.abs().max()))
    # the model is left as it was: flags, no gradients, no hooks
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())
    assert all(not m._forward_hooks for m in mods.values())


def test_fisher_weights_name_a_module_the_forward_pass_skips():
    pytest.importorskip("transformers")
    from _tiny import tiny_llama

    model = tiny_llama(vocab_size=96, hidden=32)
    stray = torch.nn.Linear(4, 4)
    with pytest.raises(ValueError, match="stray"):
        fisher_weights(model, {"stray": stray, "model.layers.0.mlp.up_proj": model.model.layers[0].mlp.up_proj},
                       [torch.arange(8)])


def test_row_stride_gives_those_rows():
    pytest.importorskip("transformers")
    from _tiny import tiny_llama

    model = tiny_llama(vocab_size=96, hidden=32)
    mods = {n: dict(model.named_modules())[n] for n in ("model.layers.0.self_attn.v_proj", "model.layers.1.mlp.gate_proj")}
    samples = [torch.arange(10) % 96, (torch.arange(7) * 5) % 96]
    full = fisher_weights(model, mods, samples)
    part = fisher_weights(model, mods, samples, row_stride=3)
    for n in mods:
        torch.testing.assert_close(part[n], full[n][::3], rtol=1e-5, atol=1e-12)
    with pytest.raises(ValueError, match="row_stride"):
        fisher_weights(model, mods, samples, row_stride=0)


def test_the_same_pass_gives_the_input_energies():
    """energies= is filled with diag(X^T X), as the output search's own hook pass computes it."""
    pytest.importorskip("transformers")
    from _tiny import tiny_llama

    from afpq_plugins.core.output_search import input_energies
    from afpq_plugins.model import find_linears

    model = tiny_llama(vocab_size=96, hidden=32)
    mods = find_linears(model)
    samples = [torch.arange(11) % 96, (torch.arange(6) * 7) % 96]
    h = {"stale": torch.zeros(1)}
    fisher_weights(model, mods, samples, row_stride=2, energies=h)
    want = input_energies(model, mods, samples)
    assert set(h) == set(want)
    for n in want:
        torch.testing.assert_close(h[n], want[n], rtol=1e-5, atol=1e-6)
