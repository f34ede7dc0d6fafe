"""What the engines need from the environment, set by us rather than by the user's shell.

GPTQModel 7.6 sizes its CPU worker pool when the pool is first built (at the first
quantize, not at import) from ``GPTQMODEL_CPU_WORKERS``, else from ``os.cpu_count()``:
``min(12, max(1, (cpus + 1) // 2))``, i.e. **1** on a 1- or 2-core machine. Its loader pool
(``model_loader:cpu``) always asks for 2 workers of that parent, so on such a machine every
GPTQModel quantize stops with "Virtual pool 'model_loader:cpu' requests 2 workers but parent
'cpu' only has 1". The Makefile and the test conftests exported ``GPTQMODEL_CPU_WORKERS=2``,
which hid it from everyone but a user in a plain shell.

:func:`configure` (called by ``import afpq_plugins``, hence by the CLI and every adapter)
sets ``GPTQMODEL_CPU_WORKERS`` when it is unset, from the cores this process may run on
(``os.sched_getaffinity``: a ``taskset`` or a container's cpuset counts, ``os.cpu_count()``
does not see those), never below the 2 GPTQModel's loader pool needs. A value the user set is
kept; one below 2 is refused by name (:func:`check`) before GPTQModel's own message.
Stdlib only; imports nothing.
"""

from __future__ import annotations

import os

__all__ = ["configure", "check", "allowed_cores", "gptqmodel_workers", "VAR", "MIN_WORKERS"]

VAR = "GPTQMODEL_CPU_WORKERS"
#: GPTQModel 7.6's ``model_loader:cpu`` virtual pool takes 2 workers from the ``cpu`` pool.
MIN_WORKERS = 2


def allowed_cores() -> int:
    """Cores this process may run on (affinity mask), else ``os.cpu_count()``, at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # macOS, Windows
        return max(1, os.cpu_count() or 1)


def gptqmodel_workers(cores: int) -> int:
    """GPTQModel's own default (half the cores, at most 12), raised to the loader pool's 2."""
    return max(MIN_WORKERS, min(12, (cores + 1) // 2))


def configure(environ=None) -> None:
    """Set the engines' variables that are unset (never overrides a value the user chose)."""
    env = os.environ if environ is None else environ
    if not env.get(VAR):
        env[VAR] = str(gptqmodel_workers(allowed_cores()))


def check(environ=None) -> None:
    """Raise ValueError naming ``GPTQMODEL_CPU_WORKERS`` when it is set to a value GPTQModel 7.6 cannot run with."""
    env = os.environ if environ is None else environ
    raw = env.get(VAR)
    if not raw:
        return
    try:
        n = int(raw)
    except ValueError:
        raise ValueError(f"{VAR}={raw!r} is not an integer (unset it: afpq_plugins then picks one from the "
                         f"{allowed_cores()} allowed cores)") from None
    if n < MIN_WORKERS:
        raise ValueError(f"{VAR}={raw}: GPTQModel 7.6 needs at least {MIN_WORKERS} CPU workers (its model_loader "
                         f"pool takes {MIN_WORKERS}); unset it or set {VAR}={MIN_WORKERS}")
