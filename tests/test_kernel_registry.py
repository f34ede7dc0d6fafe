"""The kernel registry: priority order, reasons for the kernels passed over, forcing by name."""

from __future__ import annotations

import pytest
import torch

import afpq_plugins.kernels as K
from afpq_plugins.nn import AFPQLinear


@pytest.fixture
def layer():
    torch.manual_seed(0)
    return AFPQLinear.from_linear(torch.nn.Linear(64, 16), "nf4", 32)


@pytest.fixture
def extra_kernels():
    """Register test kernels and remove them afterwards (the registry is process-global)."""
    added = []

    def add(kernel):
        added.append(kernel.name)
        return K.register_kernel(kernel)

    yield add
    for name in added:
        K._KERNELS.pop(name, None)
    K.kernels.cache_clear()


def _scaled(factor):
    return lambda x, layer: K.torch_ref.linear(x, layer) * factor


def test_highest_priority_that_can_run_wins_and_reasons_are_reported(layer, extra_kernels, monkeypatch):
    monkeypatch.delenv("AFPQ_KERNEL", raising=False)
    extra_kernels(K.Kernel("never", 1000, lambda x, l: (False, "refuses everything"), _scaled(0)))
    extra_kernels(K.Kernel("double", 999, lambda x, l: (True, ""), _scaled(2)))
    x = torch.randn(3, 64)
    k, skipped = K.choose_kernel(x, layer)
    assert k.name == "double"
    assert skipped == [("never", "refuses everything")]
    assert "never passed over: refuses everything" in K.explain(x, layer)
    # the forward goes through the chosen kernel: twice the reference result
    torch.testing.assert_close(layer(x), 2 * K.torch_ref.linear(x, layer))


def test_forcing_by_layer_or_environment(layer, extra_kernels, monkeypatch):
    extra_kernels(K.Kernel("double", 999, lambda x, l: (True, ""), _scaled(2)))
    x = torch.randn(2, 64)
    monkeypatch.setenv("AFPQ_KERNEL", "torch")
    assert K.choose_kernel(x, layer)[0].name == "torch"
    torch.testing.assert_close(layer(x), K.torch_ref.linear(x, layer))
    layer.backend = "double"  # the layer's own choice wins over the environment
    assert K.select_backend(x, layer) == "double"


def test_forced_kernel_that_cannot_run_says_why(layer, extra_kernels, monkeypatch):
    extra_kernels(K.Kernel("never", 1000, lambda x, l: (False, "refuses everything"), _scaled(0)))
    monkeypatch.setenv("AFPQ_KERNEL", "never")
    with pytest.raises(RuntimeError, match="'never' was requested but cannot run this layer: refuses everything"):
        layer(torch.randn(1, 64))


def test_unknown_kernel_name_lists_the_choices(layer, monkeypatch):
    monkeypatch.setenv("AFPQ_KERNEL", "no-such-kernel")
    with pytest.raises(ValueError, match="unknown AFPQ kernel 'no-such-kernel'.*torch"):
        layer(torch.randn(1, 64))


def test_triton_is_never_chosen_automatically_for_cpu_inputs(layer, monkeypatch):
    monkeypatch.delenv("AFPQ_KERNEL", raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # even with the interpreter on, auto stays off Triton on CPU
    ok, why = [k for k in K.kernels() if k.name == "triton"][0].can_implement(torch.randn(1, 64), layer)
    assert not ok and "CUDA" in why
    assert K.choose_kernel(torch.randn(1, 64), layer)[0].name != "triton"


def test_torch_is_last_and_runs_everything(layer):
    names = [k.name for k in K.kernels()]
    assert names[-1] == "torch" and {"triton", "cpu"} <= set(names)
    assert K.kernels()[-1].can_implement(torch.randn(1, 64), layer) == (True, "")
