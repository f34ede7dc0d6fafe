"""AWQ through GPTQModel 7.6 on a tiny random Llama (hidden 128): relative logit error of
RTN INT3, GPTQModel's stock INT3 AWQ (its own grid; the fake-quantized weights captured
before packing) and the AFPQ processor with the INT3 grid (GPTQModel's clip search and
core's), group 32, 8 x 64 calibration tokens. A diagnostic for the SmolLM2 AWQ problem
in benchmarks/RESULTS.md::

    .venv-modern/bin/python benchmarks/check_awq_gptqmodel.py
"""
import os, sys, copy, contextlib
os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests")); sys.path.insert(0, ROOT)
import torch
from _tiny import tiny_llama, tiny_tokenizer
from gptqmodel import QuantizeConfig
from gptqmodel.models.auto import MODEL_MAP
from gptqmodel.models._const import normalize_device
from gptqmodel.looper import awq_processor as A
from afpq_plugins.gptqmodel.compat import afpq_processors
from afpq_plugins.methods import quantize, FormatSpec, Calibration
tok = tiny_tokenizer()
base = tiny_llama(vocab_size=len(tok), hidden=128)
x = torch.randint(0, 250, (2, 32), generator=torch.Generator().manual_seed(0))
with torch.no_grad(): ref = base(x).logits
rows = [{"input_ids": s.tolist(), "attention_mask": [1]*64} for s in Calibration(8,64).samples(tok)]
def err(m):
    with torch.no_grad(): return float((m(x).logits-ref).norm()/ref.norm())
m = copy.deepcopy(base)
quantize(m, tok, "rtn", FormatSpec("int3", 32), progress=False); print("RES rtn", err(m), flush=True)
from afpq_plugins.gptqmodel.awq_search import fixed_scale_search
cfg = QuantizeConfig(bits=3, group_size=32, method="awq", sym=False, offload_to_disk=False); cfg.device = normalize_device("cpu")
def stock_awq(label, search_ctx):
    """GPTQModel's stock INT3 AWQ; its fake-quantized weights captured before packing."""
    m = copy.deepcopy(base)
    qm = MODEL_MAP["llama"](m, quantized=False, quantize_config=cfg, tokenizer=tok)
    cap = {}
    class P(A.AWQProcessor):
        def pack_module(self, module):
            cap[module.full_name] = module.state.pop("wq").detach().clone().float(); module.state.clear()
    with afpq_processors(awq_processor=P), search_ctx:
        qm.quantize(rows, tokenizer=tok, batch_size=1)
    for n, w in cap.items(): m.get_submodule(n).weight.data = w
    print("RES", label, err(m), flush=True)
stock_awq("stock-awq", contextlib.nullcontext())
stock_awq("stock-awq-fixed-search", fixed_scale_search())
for clip in ("engine", "symmetric"):
    mm = copy.deepcopy(base)
    quantize(mm, tok, "awq", FormatSpec("int3", 32), Calibration(8, 64), backend="gptqmodel", progress=False, clip=clip)
    print("RES afpq-awq", clip, err(mm), flush=True)
