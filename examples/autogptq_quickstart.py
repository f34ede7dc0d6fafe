"""GPTQ with an AFPQ grid in a plain AutoGPTQ script (CPU or GPU).

    PYTHONPATH=. python examples/autogptq_quickstart.py [MODEL] [OUT] [--fmt nf3] [--group-size 64]

MODEL is a local Llama/GPT-2-style folder or ``default`` (the embedded SmolLM2-135M-Instruct).
The only AFPQ-specific lines are the import and the config object.
"""

import argparse

import torch

import afpq_plugins.autogptq  # noqa: F401  registers the adapter with AutoGPTQ
from afpq_plugins.autogptq import AFPQQuantizeConfig
from afpq_plugins.data import calibration_samples, resolve_model
from auto_gptq import AutoGPTQForCausalLM
from transformers import AutoTokenizer

p = argparse.ArgumentParser()
p.add_argument("model", nargs="?", default="default")
p.add_argument("out", nargs="?", default="out/gptq-nf3-g64")
p.add_argument("--fmt", default="nf3")
p.add_argument("--group-size", type=int, default=64)
p.add_argument("--nsamples", type=int, default=16)
p.add_argument("--seqlen", type=int, default=256)
args = p.parse_args()

path = str(resolve_model(args.model))
tok = AutoTokenizer.from_pretrained(path)
examples = [{"input_ids": ids[None], "attention_mask": torch.ones_like(ids)[None]}
            for ids in calibration_samples(tok, args.nsamples, args.seqlen)]

bits = int(args.fmt[-1])
cfg = AFPQQuantizeConfig(bits=bits, group_size=args.group_size, fmt=args.fmt, desc_act=False)
model = AutoGPTQForCausalLM.from_pretrained(path, cfg, torch_dtype=torch.float32)
model.quantize(examples)
model.save_quantized(args.out)          # AFPQ checkpoint: quant_method "afpq", layout "gptq"

model = AutoGPTQForCausalLM.from_quantized(args.out, device="cpu")
ids = tok("It is a truth universally acknowledged", return_tensors="pt")
out = model.generate(input_ids=ids.input_ids, attention_mask=ids.attention_mask, max_new_tokens=20, do_sample=False)
print(tok.decode(out[0], skip_special_tokens=True))
print(f"afpq eval {args.out}  # perplexity on Pride and Prejudice")
