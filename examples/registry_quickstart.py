"""The Python registry: one settings value (QuantSpec), one call for every method and engine.

    python examples/registry_quickstart.py [--model default] [--method rtn|gptq|awq] [--backend ENGINE]
        [--dataset FILE] [--out out/registry]

``quantize(model, tokenizer, method, spec, calibration, backend=...)`` quantizes in place and
returns the checkpoint config; ``save_quantized`` writes the folder (config, tensors, model
card); ``load_quantized`` (or transformers' from_pretrained) reads it back.
"""

import argparse

import torch

from afpq_plugins.core import QuantSpec
from afpq_plugins.data import load_model_and_tokenizer, resolve_model
from afpq_plugins.evaluate import perplexity
from afpq_plugins.methods import Calibration, engines_for, quantize
from afpq_plugins.model import load_quantized, save_quantized


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="default")
    ap.add_argument("--method", default="rtn", choices=["rtn", "gptq", "awq"])
    ap.add_argument("--backend", default=None, help="engine; default: the first installed (" +
                    "; ".join(f"{m}: {', '.join(engines_for(m))}" for m in ("rtn", "gptq", "awq")) + ")")
    ap.add_argument("--format", default="nf3")
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--scale-search", default=None, choices=["minmax", "mse", "output"],
                    help="default: output for rtn (the best we have), minmax otherwise (GPTQModel and "
                         "llm-compressor do not take the output search yet)")
    ap.add_argument("--nsamples", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--dataset", default=None, help="calibration text/JSONL/datasets folder (default: Austen)")
    ap.add_argument("--out", default="out/registry")
    args = ap.parse_args(argv)

    model, tok = load_model_and_tokenizer(resolve_model(args.model))
    search = args.scale_search or ("output" if args.method == "rtn" else "minmax")
    spec = QuantSpec(args.format, args.group_size, scale_search=search)
    calib = Calibration(args.nsamples, args.seqlen, dataset=args.dataset)
    qc = quantize(model, tok, args.method, spec, calib, backend=args.backend)
    out = save_quantized(model, args.out, qc, tokenizer=tok, overwrite=True)
    reloaded = load_quantized(out)
    ids = tok("It is a truth universally acknowledged", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reloaded(ids).logits)
    ppl = perplexity(reloaded, tok, seqlen=args.seqlen, windows=2, progress=False)
    print(f"{args.method} {spec.describe()} -> {out}: {len(qc.quantized_modules)} layers, "
          f"perplexity {ppl.ppl:.2f} on 2 windows of Pride and Prejudice")


if __name__ == "__main__":
    main()
