"""GPTQ (or AWQ) with an AFPQ grid in an llm-compressor 0.14 ``oneshot`` recipe (modern venv):
the AFPQ modifiers are drop-ins for GPTQModifier / AWQModifier.

    python examples/llmcompressor_quickstart.py [--model default] [--method gptq|awq] [--out out/llmc-nf3-g64]
"""

import argparse

from datasets import Dataset
from llmcompressor import oneshot

from afpq_plugins.data import calibration_samples, load_model_and_tokenizer, resolve_model
from afpq_plugins.llmcompressor import AFPQAWQModifier, AFPQGPTQModifier, save


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="default")
    ap.add_argument("--method", default="gptq", choices=["gptq", "awq"])
    ap.add_argument("--format", default="nf3")
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--out", default="out/llmc-nf3-g64")
    args = ap.parse_args(argv)

    model, tok = load_model_and_tokenizer(resolve_model(args.model))
    samples = calibration_samples(tok, args.nsamples, args.seqlen)
    ds = Dataset.from_dict({"input_ids": [s.tolist() for s in samples],
                            "attention_mask": [[1] * s.numel() for s in samples]})
    if args.method == "gptq":
        recipe = [AFPQGPTQModifier(fmt=args.format, group_size=args.group_size, ignore=["lm_head"])]
    else:
        recipe = AFPQAWQModifier(fmt=args.format, group_size=args.group_size, ignore=["lm_head"])
    oneshot(model=model, dataset=ds, recipe=recipe, num_calibration_samples=len(samples),
            max_seq_length=args.seqlen, tokenizer=tok)
    out = save(model, args.out, tokenizer=tok, overwrite=True)
    print(f"llm-compressor {args.method} {args.format} g{args.group_size} -> {out}")


if __name__ == "__main__":
    main()
