"""AWQ with an AFPQ grid through AutoAWQ's own API (legacy venv: autoawq 0.2.9).

    PYTHONPATH=. python examples/autoawq_quickstart.py [MODEL_DIR] [OUT_DIR]

MODEL_DIR defaults to the embedded SmolLM2-135M-Instruct. Small calibration (16 x 256
Austen tokens) so it finishes in minutes on a CPU; AutoAWQ's defaults are 128 x 512.
"""

import sys

import torch

from afpq_plugins.autoawq import AFPQAwqQuantizer, load_quantized, save_quantized, wrap_for_awq
from afpq_plugins.data import default_model_path, load_model_and_tokenizer

src = sys.argv[1] if len(sys.argv) > 1 else str(default_model_path())
out = sys.argv[2] if len(sys.argv) > 2 else "out/awq-nf3-g64"

# AutoAWQForCausalLM.from_pretrained(src, torch_dtype=torch.float32) works too; this
# reuses the project's offline loader.
hf, tok = load_model_and_tokenizer(src, dtype=torch.float32)
model = wrap_for_awq(hf)
model.quantize(
    tok,
    quant_config={"w_bit": 3, "q_group_size": 64, "zero_point": True, "version": "gemm"},
    quantizer_cls=AFPQAwqQuantizer,     # AWQ's scale and clip search on the nf3 grid, two scales
    fmt="nf3", clip="two-sided",
    calib_data="austen", max_calib_samples=16, max_calib_seq_len=256,  # no dataset download
)
save_quantized(model, out, overwrite=True)   # quant_method "afpq", method "awq", layout gptq (3-bit)

model = load_quantized(out, device="cpu")    # no IPEX, no CUDA, no layer fusion
ids = tok("It is a truth universally acknowledged", return_tensors="pt").input_ids
print(tok.decode(model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=20, do_sample=False)[0]))
