"""GPTQ with an AFPQ grid through optimum's API, export, reload; and quantize-on-load.

    python examples/hf_optimum_export.py [--format nf3] [--group-size 64] [--nsamples 16]
        [--out out/smollm2-gptq-nf3-g64] [--on-load]

Uses the embedded SmolLM2-135M and the embedded Austen calibration texts, on CPU.
optimum 2.0.0 (legacy stack) runs GPTQ through auto-gptq and the AutoGPTQ adapter;
optimum 2.3.0 (modern stack) through gptqmodel. Takes a few minutes on CPU.
"""

import argparse

import torch

import afpq_plugins  # noqa: F401
from afpq_plugins.data import (calibration_samples, default_model_path, eval_text_path,
                               load_model_and_tokenizer, load_text)
from afpq_plugins.evaluate import perplexity
from afpq_plugins.hf import AFPQConfig, AFPQGPTQQuantizer


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--format", default="nf3")
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--out", default="out/smollm2-gptq-nf3-g64")
    ap.add_argument("--on-load", action="store_true", help="quantize while loading, via AFPQConfig(dataset=...)")
    args = ap.parse_args()

    from transformers import AutoModelForCausalLM

    path = default_model_path()
    model, tok = load_model_and_tokenizer(path)
    samples = calibration_samples(tok, args.nsamples, 512, seed=0)
    dataset = [{"input_ids": [s.tolist()], "attention_mask": [[1] * s.numel()]} for s in samples]

    if args.on_load:
        texts = [tok.decode(s) for s in samples]  # a list of strings works too
        cfg = AFPQConfig(fmt=args.format, group_size=args.group_size, dataset=texts, tokenizer=tok, model_seqlen=512)
        model = AutoModelForCausalLM.from_pretrained(str(path), quantization_config=cfg, torch_dtype=torch.float32)
        model.save_pretrained(args.out)
        tok.save_pretrained(args.out)
    else:
        quantizer = AFPQGPTQQuantizer(fmt=args.format, group_size=args.group_size, dataset=dataset,
                                      damp_percent=0.01, model_seqlen=512)
        quantizer.quantize_model(model, tok)
        quantizer.save(model, args.out, tokenizer=tok)

    model = AutoModelForCausalLM.from_pretrained(args.out)
    res = perplexity(model, tok, load_text(eval_text_path()), seqlen=512, windows=8)
    print(f"{args.out}: perplexity {res.ppl:.3f} on Pride and Prejudice (8 windows of 512)")


if __name__ == "__main__":
    main()
