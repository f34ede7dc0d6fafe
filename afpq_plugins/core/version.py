"""The package version (the one place: pyproject reads it) and the check of the version a
checkpoint was written by.

Every ``quantization_config`` we write carries ``afpq_version`` (the afpq-plugins release that
wrote it). On load, a checkpoint written by a *newer major* release than this one is refused
with :class:`CheckpointVersionError` (a later major may change the on-disk format in ways this
release cannot see; the structural ``version`` key covers the format itself). Checkpoints
without the key (written before 0.1.0 recorded it) load as before. Stdlib only.
"""

from __future__ import annotations

from typing import Optional

from .errors import CheckpointError

#: The package version (pyproject.toml reads it here; ``afpq_plugins.__version__`` re-exports it).
VERSION = "0.1.0"

__all__ = ["VERSION", "CheckpointVersionError", "check_writer_version"]


class CheckpointVersionError(CheckpointError):
    """The checkpoint was written by an afpq-plugins release this one cannot promise to read."""


def _major(version: str) -> int:
    return int(version.split(".", 1)[0])


def check_writer_version(written: Optional[object], source: str = "quantization_config") -> None:
    """Raise :class:`CheckpointVersionError` when ``written`` (``afpq_version``) has a newer major than ours."""
    if written is None:
        return
    try:
        major = _major(str(written)) if isinstance(written, str) else None
    except ValueError:
        major = None
    if major is None:
        raise CheckpointVersionError(f"{source}.afpq_version must be a version string like \"0.1.0\", got {written!r:.80}")
    if major > _major(VERSION):
        raise CheckpointVersionError(
            f"{source}: written by afpq-plugins {written}, a newer major release than the installed {VERSION}; "
            "upgrade afpq-plugins (pip install -U afpq-plugins) to load it")
