"""A checkpoint written on the modern stack (transformers 5) loads on the legacy stack
(transformers 4.53) with identical logits: transformers 5 writes RoPE settings only as
``rope_parameters``, which 4.53 ignores (falling back to rope_theta 10000 without an
error); save_quantized writes ``rope_theta`` beside it."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MODERN_PY = os.environ.get("AFPQ_MODERN_PYTHON", os.path.join(ROOT, ".venv-modern", "bin", "python"))

_SAVE = r"""
import sys, torch
from transformers import LlamaConfig, LlamaForCausalLM
from afpq_plugins.model import quantize_model_rtn, save_quantized
torch.manual_seed(0)
cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=256, rope_theta=100000.0)
m = LlamaForCausalLM(cfg).eval()
qc = quantize_model_rtn(m, "nf3", 32, progress=False)
save_quantized(m, sys.argv[1], qc)
with torch.no_grad():
    torch.save(m(torch.arange(24).view(1, -1)).logits, sys.argv[2])
"""


def test_add_legacy_rope_keys():
    from afpq_plugins.model import _add_legacy_rope_keys

    cfg = {"rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"}}
    _add_legacy_rope_keys(cfg)
    assert cfg["rope_theta"] == 100000.0 and "rope_scaling" not in cfg
    cfg = {"rope_parameters": {"rope_theta": 5e5, "rope_type": "llama3", "factor": 8.0}, "rope_theta": 1.0}
    _add_legacy_rope_keys(cfg)
    assert cfg["rope_theta"] == 1.0  # an explicit value is kept
    assert cfg["rope_scaling"] == {"rope_type": "llama3", "factor": 8.0}


@pytest.mark.skipif(not os.path.exists(MODERN_PY), reason="needs .venv-modern (make test creates it)")
def test_modern_checkpoint_loads_on_legacy_stack(tmp_path):
    import transformers

    assert transformers.__version__.startswith("4."), "run this test in the legacy venv"
    from afpq_plugins.model import load_quantized

    ck, logits = str(tmp_path / "ck"), str(tmp_path / "logits.pt")
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.run([MODERN_PY, "-c", _SAVE, ck, logits], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    model = load_quantized(ck)
    assert model.config.rope_theta == 100000.0
    with torch.no_grad():
        got = model(torch.arange(24).view(1, -1)).logits
    assert torch.equal(got, torch.load(logits))
