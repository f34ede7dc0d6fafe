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
    assert K.choose_kernel(x, layer)[0].name == "double"


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


# -- chosen once per layer -------------------------------------------------------------------------
def test_choice_is_made_once_per_kind_of_call(layer, extra_kernels, monkeypatch):
    monkeypatch.delenv("AFPQ_KERNEL", raising=False)
    asked = []

    def can(x, l):
        asked.append(x.dtype)
        return True, ""

    extra_kernels(K.Kernel("counting", 999, can, _scaled(1)))
    x = torch.randn(2, 64)
    with torch.no_grad():
        for _ in range(3):
            layer(x)
        assert asked == [torch.float32]  # one choice for three forwards
        layer(x.to(torch.bfloat16))  # another activation dtype: another choice
        layer(x.to(torch.bfloat16))
    assert asked == [torch.float32, torch.bfloat16]


def test_choice_is_dropped_on_to_buffer_change_and_registry_change(layer, extra_kernels, monkeypatch):
    monkeypatch.delenv("AFPQ_KERNEL", raising=False)
    asked = []
    extra_kernels(K.Kernel("counting", 999, lambda x, l: (asked.append(1) or True, ""), _scaled(1)))
    x = torch.randn(1, 64)
    with torch.no_grad():
        layer(x)
        layer.to(torch.device("cpu"))  # .to() drops the cache (device and dtype of buffers may change)
        layer(x)
        layer.scales = layer.scales.clone()  # a new buffer
        layer(x)
    assert len(asked) == 3
    extra_kernels(K.Kernel("double", 1000, lambda x, l: (True, ""), _scaled(2)))  # registry changed
    with torch.no_grad():
        torch.testing.assert_close(layer(x), 2 * K.torch_ref.linear(x, layer))


def test_act_order_flag_follows_in_place_edits(layer):
    assert layer.has_default_order()
    with torch.no_grad():
        layer.g_idx.copy_(layer.g_idx.flip(0))
    assert not layer.has_default_order()  # the cached answer noticed the edit (tensor version)
    with torch.no_grad():
        layer.g_idx.copy_(layer.g_idx.flip(0))
    assert layer.has_default_order()


def test_compiled_model_traces_one_op_per_layer():
    """AFPQLinear under torch.compile(fullgraph=True): one opaque op (torch.ops.afpq.linear) per
    layer, no graph break, the same output as eager (the transformers plugin reports the model
    as compileable)."""
    import torch._dynamo

    torch.manual_seed(0)
    net = torch.nn.Sequential(
        AFPQLinear.from_linear(torch.nn.Linear(64, 32), "nf4", 32), torch.nn.ReLU(),
        AFPQLinear.from_linear(torch.nn.Linear(32, 16), "fp3", -1),
    ).eval()
    for m in net:
        if isinstance(m, AFPQLinear):
            m.prepare()
    x = torch.randn(3, 64)
    seen = []

    def backend(gm, example_inputs):
        seen.extend(n.target for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        eager = net(x)
        compiled = torch.compile(net, backend=backend, fullgraph=True)(x)
    assert sum(t is torch.ops.afpq.linear.default for t in seen) == 2
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)


def test_transformers_quantizer_says_compileable():
    pytest.importorskip("transformers")
    from afpq_plugins.hf.config import AFPQConfig
    from afpq_plugins.hf.quantizer import AFPQHfQuantizer

    q = AFPQHfQuantizer(AFPQConfig(fmt="nf4", group_size=32, quantized_modules=["a"]))
    assert q.is_compileable is True
