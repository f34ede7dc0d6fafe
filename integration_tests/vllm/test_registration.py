"""Registration of "afpq" with vLLM: entry point, idempotence, laziness."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import entry_points

import pytest

pytest.importorskip("vllm")


def test_entry_point_is_declared():
    eps = {ep.name: ep.value for ep in entry_points(group="vllm.general_plugins")}
    assert eps.get("afpq") == "afpq_plugins.vllm:register"


def test_register_is_idempotent_and_selects_the_config():
    from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS, get_quantization_config

    import afpq_plugins.vllm as plugin
    from afpq_plugins.vllm.config import AFPQVllmConfig

    first = plugin.register()
    assert first in ("registered", "already")
    assert plugin.register() == "already"
    assert QUANTIZATION_METHODS.count("afpq") == 1
    assert get_quantization_config("afpq") is AFPQVllmConfig
    assert plugin.is_registered()


def test_vllm_loads_the_plugin_through_its_entry_point():
    code = (
        "import vllm.plugins as p; p.load_general_plugins();"
        "from vllm.model_executor.layers.quantization import get_quantization_config as g;"
        "print(g('afpq').__module__)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "afpq_plugins.vllm.config"


def test_importing_the_adapter_does_not_import_vllm():
    code = "import sys, afpq_plugins.vllm; print('vllm' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "False"


def test_fused_layers_with_different_settings_are_refused_by_name():
    """vLLM fuses q/k/v (and gate/up) into one layer: a checkpoint whose parts have different
    per-module settings cannot be served, and the error names the layer and each part's setting."""
    from afpq_plugins.core.checkpoint import AFPQConfigDict, CheckpointError
    from afpq_plugins.vllm.config import AFPQVllmConfig

    p = "model.layers.0.self_attn"
    names = [f"{p}.{x}_proj" for x in "qkvo"]
    qc = AFPQConfigDict(format="nf4", bits=4, group_size=32, mode="afpq", quantized_modules=names,
                        modules={f"{p}.k_proj": {"format": "nf3", "group_size": 64, "mode": "sym"},
                                 f"{p}.o_proj": {"format": "fp4", "group_size": 64, "mode": "afpq"}})
    cfg = AFPQVllmConfig(qc)
    cfg.packed_modules_mapping = {"qkv_proj": ["q_proj", "k_proj", "v_proj"]}
    with pytest.raises(CheckpointError, match=r"qkv_proj.*different settings.*k_proj=nf3/sym g64"):
        cfg.layer_spec(f"{p}.qkv_proj")
    assert cfg.layer_spec(f"{p}.o_proj") == qc.spec_for(f"{p}.o_proj")
    assert cfg.layer_spec(f"{p}.o_proj").fmt == "fp4"
