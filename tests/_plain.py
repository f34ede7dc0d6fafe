"""Run things the way a user runs them: a fresh process, a plain environment (no variable the
Makefile or a conftest exports), outside the source tree."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Dict, List, Optional, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def plain_env(pythonpath: Optional[str] = REPO, **extra: str) -> Dict[str, str]:
    """PATH, HOME and LANG only (plus ``PYTHONPATH`` pointing at this checkout, so the child runs the
    code under test even where the venv's editable install points at another checkout)."""
    env = {k: os.environ[k] for k in ("PATH", "HOME", "LANG", "TMPDIR") if k in os.environ}
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    env.update(extra)
    return env


def run(argv: Sequence[str], cwd: str, env: Optional[Dict[str, str]] = None, cores: Optional[str] = None,
        timeout: int = 600) -> subprocess.CompletedProcess:
    """``argv`` in a fresh process (``taskset -c cores`` when given); text output; never raises on rc."""
    cmd: List[str] = list(argv)
    if cores is not None:
        cmd = ["taskset", "-c", cores] + cmd
    return subprocess.run(cmd, cwd=cwd, env=plain_env() if env is None else env, capture_output=True, text=True,
                          timeout=timeout)


def afpq(args: Sequence[str], cwd: str, **kw) -> subprocess.CompletedProcess:
    """``python -m afpq_plugins.cli ARGS`` with this interpreter, in a plain environment."""
    return run([sys.executable, "-m", "afpq_plugins.cli", *args], cwd, **kw)
