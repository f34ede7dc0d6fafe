"""The one skeleton builder (afpq_plugins.nn.skeleton), the shared constants and the
import side-effect report."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from torch import nn

from afpq_plugins._patching import patched
from afpq_plugins.core.checkpoint import AFPQConfigDict, CheckpointError, is_afpq_checkpoint
from afpq_plugins.core.constants import SCALE_DTYPES, scale_dtype, scale_dtype_name
from afpq_plugins.nn import AFPQLinear
from afpq_plugins.nn.skeleton import build_skeleton, linear_dims, plan_skeleton


class Conv1D(nn.Module):
    """transformers' GPT-2 Conv1D, re-typed here (name and weight layout are the rule)."""

    def __init__(self, nf, nx):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(nx, nf))
        self.bias = nn.Parameter(torch.zeros(nf))

    def forward(self, x):
        return x @ self.weight + self.bias


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(64, 32)
        self.b = Conv1D(48, 64)  # in 64, out 48
        self.norm = nn.LayerNorm(64)


def _qc(names, **kw):
    return AFPQConfigDict(format="nf4", bits=4, group_size=32, mode="afpq", quantized_modules=list(names), **kw)


def test_linear_and_conv1d_follow_one_rule():
    net = Net()
    assert linear_dims(net.a, "a") == (64, 32)
    assert linear_dims(net.b, "b") == (64, 48)  # Conv1D weight is [in, out]
    with pytest.raises(CheckpointError, match="'norm' is a LayerNorm"):
        linear_dims(net.norm, "norm")
    plan = build_skeleton(net, _qc(["a", "b"]))
    assert isinstance(net.a, AFPQLinear) and (net.a.in_features, net.a.out_features) == (64, 32)
    assert isinstance(net.b, AFPQLinear) and (net.b.in_features, net.b.out_features) == (64, 48)
    assert plan["b"].has_bias and net.b.bias.dtype == torch.float32
    assert not list(net.a.parameters()) and not list(net.b.parameters())  # buffers only
    again = build_skeleton(net, _qc(["a", "b"]))  # a repeated call describes what is there
    assert again == plan


@pytest.mark.parametrize("names, pattern", [
    (["a", "nope"], "'nope'.*does not exist"),
    (["a", "norm"], "'norm' is a LayerNorm"),
    (["a", "a"], "'a' (twice|more than once)"),
    (["a", 3], "holds 3"),
    ([], "empty"),
])
def test_bad_config_leaves_the_model_untouched(names, pattern):
    net = Net()
    before = {n: type(m) for n, m in net.named_modules()}
    with pytest.raises(CheckpointError, match=pattern):
        build_skeleton(net, _qc(names) if all(isinstance(n, str) for n in names) else _qc([]), names=names)
    assert {n: type(m) for n, m in net.named_modules()} == before


def test_group_size_that_does_not_divide_is_named_before_any_change():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(64, 8)
            self.z = nn.Linear(48, 8)  # 48 % 32 != 0

    net = Odd()
    with pytest.raises(CheckpointError, match="'z'"):
        plan_skeleton(net, _qc(["a", "z"]), ["a", "z"])
    with pytest.raises(CheckpointError, match="'z'"):
        build_skeleton(net, _qc(["a", "z"]))
    assert type(net.a) is nn.Linear


def test_scale_dtype_table():
    assert scale_dtype("bfloat16") is torch.bfloat16 and scale_dtype(torch.float32) is torch.float32
    assert scale_dtype_name(torch.float16) == "float16"
    assert sorted(SCALE_DTYPES) == ["bfloat16", "float16", "float32"]
    for bad in ("float64", torch.int8, 16, None):
        with pytest.raises(ValueError, match="scale_dtype"):
            scale_dtype(bad)


def test_patched_restores_and_removes():
    class Obj:
        x = 1

    with patched(Obj, "x", 2):
        assert Obj.x == 2
    assert Obj.x == 1
    with pytest.raises(RuntimeError):
        with patched(Obj, "y", 3):
            assert Obj.y == 3
            raise RuntimeError
    assert not hasattr(Obj, "y")


@pytest.mark.parametrize("content, expect", [
    ({"quantization_config": {"quant_method": "afpq"}}, True),
    ({"quantization_config": {"quant_method": "gptq"}}, False),
    ({"quantization_config": "afpq"}, False),
    ([1, 2], False),
    ("{not json", False),
    ({}, False),
])
def test_is_afpq_checkpoint_never_raises(tmp_path, content, expect):
    (tmp_path / "config.json").write_text(content if isinstance(content, str) else json.dumps(content))
    assert is_afpq_checkpoint(str(tmp_path)) is expect
    assert is_afpq_checkpoint(str(tmp_path / "missing")) is False


def test_side_effects_report_in_a_fresh_process():
    code = (
        "import json, sys\n"
        "import afpq_plugins\n"
        "first = afpq_plugins.side_effects()\n"
        "assert 'transformers' not in sys.modules\n"
        "import transformers.quantizers.auto\n"
        "print(json.dumps([first, afpq_plugins.side_effects()]))\n"
    )
    pytest.importorskip("transformers")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    first, after = json.loads(out.stdout.strip().splitlines()[-1])
    assert first == {"transformers": "pending import hook", "autogptq": "off", "custom_formats": []}
    assert after["transformers"] == "registered" and after["autogptq"] == "off"
