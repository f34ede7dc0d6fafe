"""Fixtures for the modern-stack integration tests (transformers 5.17.0, optimum 2.3.0,
gptqmodel 7.6.0, llmcompressor 0.14.0.1), run in the modern venv (``make test``).

GPTQModel sizes its CPU worker pool from ``GPTQMODEL_CPU_WORKERS`` when it is
imported; a small default keeps the tests from oversubscribing a shared machine.
"""

from __future__ import annotations

import os

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
