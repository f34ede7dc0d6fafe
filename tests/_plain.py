"""Run things the way a user runs them: a fresh process, a plain environment (no variable the
Makefile or a conftest exports), outside the source tree."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
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


#: What a wheel is built from (the rest of the checkout is not the package's).
PACKAGE_FILES = ("pyproject.toml", "setup.py", "README.md", "LICENSE", "_afpq_autoload.py", "afpq_plugins")


def build_wheel(workdir: str) -> str:
    """``pip wheel`` (the PEP 517 build ``python -m build`` runs) of a copy of the package files, so the
    checkout gets no build/ or egg-info; no network, this interpreter's setuptools. Returns the wheel."""
    src = os.path.join(workdir, "src")
    os.makedirs(src)
    for name in PACKAGE_FILES:
        path = os.path.join(REPO, name)
        if os.path.isdir(path):
            shutil.copytree(path, os.path.join(src, name), ignore=shutil.ignore_patterns("__pycache__", "*.so"))
        elif os.path.exists(path):
            shutil.copy2(path, src)
    dist = os.path.join(workdir, "dist")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                    "-w", dist, src], check=True, capture_output=True, text=True, env=plain_env(None))
    (wheel,) = [os.path.join(dist, f) for f in os.listdir(dist) if f.endswith(".whl")]
    return wheel


def venv_with_wheel(path: str, wheel: str) -> str:
    """A fresh venv holding only ``wheel`` (installed --no-deps), which sees this interpreter's
    site-packages for the dependencies (torch, transformers, ...) through a path line added after the
    install (so pip installs into an empty environment, and this venv's editable afpq-plugins, reached
    only through setuptools' finder .pth that a path line does not run, stays invisible). Returns its python."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", path], check=True)
    py = os.path.join(path, "bin", "python")
    subprocess.run([sys.executable, "-m", "pip", "--python", py, "install", "-q", "--no-deps", "--no-index", wheel],
                   check=True, capture_output=True, text=True, env=plain_env(None))
    site = subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], check=True,
                          capture_output=True, text=True, env=plain_env(None)).stdout.strip()
    deps = [sysconfig.get_paths()["purelib"]] + [p for p in sys.path if os.path.basename(p) == "site-packages"]
    with open(os.path.join(site, "_afpq_test_deps.pth"), "w") as f:
        f.write("".join(p + "\n" for p in dict.fromkeys(deps)))
    return py
