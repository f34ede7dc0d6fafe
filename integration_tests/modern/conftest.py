"""Fixtures for the modern-stack integration tests (transformers 5.17.0, optimum 2.3.0,
gptqmodel 7.6.0, llmcompressor 0.14.0.1), run in the modern venv (``make test``).

GPTQModel sizes its CPU worker pool from ``GPTQMODEL_CPU_WORKERS`` when it is
imported; a small default keeps the tests from oversubscribing a shared machine.
"""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")


@pytest.fixture(scope="module")
def tok():
    from _tiny import tiny_tokenizer

    return tiny_tokenizer()


@pytest.fixture(scope="module")
def folders(tmp_path_factory, tok):
    """{"llama", "qwen2"}: folders of tiny random models (two layers) with ``tok``."""
    from _tiny import tiny_llama, tiny_qwen2

    out = {}
    for arch, build in (("llama", tiny_llama), ("qwen2", tiny_qwen2)):
        path = str(tmp_path_factory.mktemp(arch) / "model")
        build(vocab_size=len(tok)).save_pretrained(path)
        tok.save_pretrained(path)
        out[arch] = path
    return out
