"""Build and load the native CPU kernel (``afpq_cpu.cpp``) on first use.

The C++ source ships with the package; the first call in a process compiles it with
``torch.utils.cpp_extension.load`` (ninja + the system C++ compiler, about a minute on two
cores) into a per-user cache folder, ``$AFPQ_CACHE/cpu_ext`` (default ``~/.cache/afpq_plugins/cpu_ext``;
``$XDG_CACHE_HOME`` honoured), one subfolder per source hash, torch installation and Python
version, so later runs only load the library. The ops are registered as ``torch.ops.afpq_cpu``.

:func:`load` never raises: it returns ``(ok, reason)`` and the registry falls back to the
torch kernel with one warning when the kernel cannot be built.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import sys
import sysconfig
from contextlib import contextmanager
from pathlib import Path
from typing import Tuple

import torch

SOURCE = Path(__file__).with_name("afpq_cpu.cpp")
#: Compile flags: no FMA contraction (decoded weights bit-identical to core's float32 decode);
#: ISA-specific code is compiled per function (target attributes), never with -march=native.
CFLAGS = ["-O3", "-ffp-contract=off", "-fno-math-errno"]
if torch.backends.openmp.is_available():
    # at::parallel_for is inline (OpenMP pragmas): without -fopenmp it runs on one thread. The
    # GOMP symbols resolve to the OpenMP runtime torch already loaded (no second runtime).
    CFLAGS.append("-fopenmp")


def cache_root() -> Path:
    env = os.environ.get("AFPQ_CACHE")  # the project's cache folder (see afpq_plugins.data)
    if env:
        return Path(env).expanduser() / "cpu_ext"
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "afpq_plugins" / "cpu_ext"


def build_tag() -> str:
    h = hashlib.sha256(SOURCE.read_bytes())
    h.update(" ".join(CFLAGS).encode())
    # Each torch installation (venv) builds its own copy: the build commands name its include paths.
    h.update(os.path.dirname(torch.__file__).encode())
    py = f"py{sys.version_info[0]}{sys.version_info[1]}"
    torch_v = torch.__version__.replace("+", "_")
    return f"{py}_torch{torch_v}_{h.hexdigest()[:12]}"


def _compiler() -> str:
    cxx = os.environ.get("CXX", "c++")
    return shutil.which(cxx) or ""


@contextmanager
def _ninja_on_path():
    """torch's build calls ``ninja`` by name: add the pip ``ninja`` package's folder (and this
    interpreter's bin folder, where pip puts it in a venv) to PATH for the build only."""
    old = os.environ.get("PATH", "")
    extra = [os.path.dirname(sys.executable), sysconfig.get_path("scripts")]
    try:
        import ninja  # type: ignore

        extra.insert(0, ninja.BIN_DIR)
    except Exception:  # noqa: BLE001 - the pip package is optional when ninja is installed system-wide
        pass
    os.environ["PATH"] = os.pathsep.join([p for p in extra if p] + [old])
    try:
        yield
    finally:
        os.environ["PATH"] = old


@functools.lru_cache(maxsize=None)
def load() -> Tuple[bool, str]:
    """Build (first time) and load the extension: ``(True, "")`` or ``(False, reason)``."""
    if os.environ.get("AFPQ_CPU_NO_BUILD") == "1":
        return False, "native CPU kernel disabled by AFPQ_CPU_NO_BUILD=1"
    if not SOURCE.is_file():
        return False, f"kernel source {SOURCE} is missing from the installed package"
    if not _compiler():
        return False, f"no C++ compiler ({os.environ.get('CXX', 'c++')!r} not found on PATH)"
    try:
        from torch.utils import cpp_extension
    except Exception as e:  # noqa: BLE001
        return False, f"torch.utils.cpp_extension unavailable: {e}"
    build_dir = cache_root() / build_tag()
    try:
        build_dir.mkdir(parents=True, exist_ok=True)
        with _ninja_on_path():
            cpp_extension.load(
                name="afpq_cpu_ext",
                sources=[str(SOURCE)],
                extra_cflags=CFLAGS,
                build_directory=str(build_dir),
                is_python_module=False,
                verbose=os.environ.get("AFPQ_CPU_VERBOSE") == "1",
            )
    except Exception as e:  # noqa: BLE001 - any build or load failure means "use the torch path"
        lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
        detail = lines[-1] if lines else type(e).__name__
        return False, f"build failed: {detail} (build folder {build_dir}; AFPQ_CPU_VERBOSE=1 shows the log)"
    if not hasattr(torch.ops.afpq_cpu, "linear"):
        return False, "build failed: the library loaded but registered no afpq_cpu ops"
    return True, ""
