"""examples/vllm_quickstart.py runs (a fresh process, vLLM's own entry-point plugin loading, a tiny AFPQ checkpoint)."""

from __future__ import annotations

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_vllm_quickstart(checkpoints):
    path = next(iter(checkpoints.values()))
    env = dict(os.environ, PYTHONPATH=REPO)  # the entry point resolves afpq_plugins from this checkout
    proc = subprocess.run([sys.executable, os.path.join(REPO, "examples", "vllm_quickstart.py"), path,
                           "--max-tokens", "4", "--max-model-len", "256"],
                          capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "afpq" in (proc.stdout + proc.stderr).lower()  # vLLM logs the quantization method it uses
