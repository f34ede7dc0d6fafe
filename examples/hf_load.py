"""Load an AFPQ checkpoint with plain transformers (``AutoModelForCausalLM``), generate, re-save.

    python examples/hf_load.py [CHECKPOINT] [--out out/smollm2-nf3-g64-resaved]

Without CHECKPOINT, the embedded SmolLM2-135M is RTN-quantized to nf3, group 64, first
(``out/smollm2-nf3-g64``). Works on transformers 4.53 and 5.x.
"""

import argparse
import os

import torch

import afpq_plugins  # noqa: F401  (registers quant_method "afpq" with transformers)
from afpq_plugins.hf import register


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoint", nargs="?", default=None)
    ap.add_argument("--out", default="out/smollm2-nf3-g64-resaved")
    args = ap.parse_args()
    register()  # idempotent; `import afpq_plugins` already did it (lazily)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from afpq_plugins.model import load_quantized

    path = args.checkpoint
    if path is None:
        from afpq_plugins.data import default_model_path, load_model_and_tokenizer
        from afpq_plugins.model import quantize_model_rtn, save_quantized

        path = "out/smollm2-nf3-g64"
        if not os.path.isdir(path):
            model, tok = load_model_and_tokenizer(default_model_path())
            save_quantized(model, path, quantize_model_rtn(model, "nf3", 64), tokenizer=tok)

    model = AutoModelForCausalLM.from_pretrained(path)  # AFPQLinear modules, validated tensors
    tok = AutoTokenizer.from_pretrained(path)
    print(model.model.layers[0].self_attn.q_proj)

    enc = tok("It is a truth universally acknowledged", return_tensors="pt")
    ids = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    with torch.no_grad():
        same = torch.equal(model(**ids).logits, load_quantized(path)(**ids).logits)
        out = model.generate(**ids, max_new_tokens=20, do_sample=False, pad_token_id=tok.eos_token_id)
    print("same logits as afpq_plugins.model.load_quantized:", same)
    print(tok.decode(out[0], skip_special_tokens=True))

    model.save_pretrained(args.out)  # the same AFPQ checkpoint format
    tok.save_pretrained(args.out)
    print("re-saved to", args.out)


if __name__ == "__main__":
    main()
