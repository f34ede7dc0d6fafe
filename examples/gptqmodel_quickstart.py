"""GPTQ (or AWQ) with an AFPQ grid in a GPTQModel 7.6 script (modern venv): change the import,
add ``fmt=`` to the config.

    python examples/gptqmodel_quickstart.py [--model default] [--method gptq|awq] [--out out/gptqmodel-nf3-g64]

GPTQModel's worker count: ``import afpq_plugins`` sets GPTQMODEL_CPU_WORKERS from the cores
this process may use (at least 2) when it is unset.
"""

import argparse

from afpq_plugins.data import calibration_samples, load_model_and_tokenizer, resolve_model
from afpq_plugins.gptqmodel import GPTQModel, QuantizeConfig  # was: from gptqmodel import GPTQModel, QuantizeConfig


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="default")
    ap.add_argument("--method", default="gptq", choices=["gptq", "awq"])
    ap.add_argument("--format", default="nf3")
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--out", default="out/gptqmodel-nf3-g64")
    args = ap.parse_args(argv)

    path = str(resolve_model(args.model))
    _, tok = load_model_and_tokenizer(path)
    rows = [{"input_ids": s.tolist(), "attention_mask": [1] * s.numel()}
            for s in calibration_samples(tok, args.nsamples, args.seqlen)]
    bits = 3 if args.format.endswith("3") else 4
    cfg = QuantizeConfig(bits=bits, group_size=args.group_size, fmt=args.format, method=args.method)
    model = GPTQModel.load(path, cfg)
    model.quantize(rows, tokenizer=tok, batch_size=1)
    model.save(args.out)
    print(f"GPTQModel {args.method} {args.format} g{args.group_size} -> {args.out}")


if __name__ == "__main__":
    main()
