"""Tiny AFPQ checkpoints and per-layer quantized tensors for the vLLM tests (no hub, no network).

The tiny Llama has head size 32 (the smallest vLLM's CPU attention runs), 6 query heads and 2
KV heads (tensor parallelism 2 divides both), hidden 192 and intermediate 384: with
``group_size`` 64 a row-parallel shard of ``o_proj`` (96 inputs) cuts a group in two, the
case where every rank needs all groups' scales.

Act-order checkpoints are made the way GPTQ's ``desc_act`` lays them out, with RTN in place
of GPTQ's error feedback: the input columns are visited in a permuted order, consecutive
runs of ``group_size`` columns *in that order* form the groups, and ``g_idx[i]`` is the
group of column ``i``. Layers that share an input (q/k/v, gate/up) share the permutation,
as GPTQ's (it is derived from the input's Hessian).
"""

from __future__ import annotations

import os
import sys
import zlib
from typing import Optional

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, os.pardir, "tests"))
from _tiny import tiny_tokenizer  # noqa: E402

from afpq_plugins.core.checkpoint import AFPQConfigDict  # noqa: E402
from afpq_plugins.core.formats import get_format, resolve_mode  # noqa: E402
from afpq_plugins.core.quantize import QuantizedWeight, quantize_weight  # noqa: E402
from afpq_plugins.nn import AFPQLinear  # noqa: E402

HIDDEN, INTER, HEADS, KV_HEADS, HEAD = 192, 384, 6, 2, 32


def tiny_llama(vocab_size: int, seed: int = 0, bias: bool = False):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=2, num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS, head_dim=HEAD, vocab_size=vocab_size, tie_word_embeddings=True,
        max_position_embeddings=512, initializer_range=0.1, attention_bias=bias, mlp_bias=bias,
    )
    model = LlamaForCausalLM(cfg).eval()
    model.config.architectures = ["LlamaForCausalLM"]  # a fresh model has none; vLLM picks the class by it
    if bias:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith(".bias"):
                    p.normal_(0, 0.05)
    return model


def permutation(in_features: int, key: str, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(zlib.crc32(f"{key}/{seed}".encode()))
    return torch.randperm(in_features, generator=g)


def quantize_act_order(w: torch.Tensor, fmt, group_size: int, mode: Optional[str], perm: torch.Tensor,
                       name: str = "weight") -> QuantizedWeight:
    """RTN over the columns taken in ``perm`` order, stored in the original column order with ``g_idx``."""
    f = get_format(fmt)
    qp = quantize_weight(w[:, perm], f, group_size, mode, torch.float16, name=name)
    codes = torch.empty_like(qp.codes)
    codes[:, perm] = qp.codes
    g_idx = torch.empty(w.shape[1], dtype=torch.int32)
    gs = w.shape[1] if group_size == -1 else group_size
    g_idx[perm] = (torch.arange(w.shape[1]) // gs).to(torch.int32)
    return QuantizedWeight(codes, qp.scales, qp.scales2, g_idx, f, qp.mode, group_size)


def _input_key(name: str) -> str:
    """Layers that read the same input share a key (q/k/v; gate/up)."""
    head, _, leaf = name.rpartition(".")
    leaf = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "gate_proj": "gate_up", "up_proj": "gate_up"}.get(leaf, leaf)
    return f"{head}.{leaf}"


def quantize_model(model, fmt: str, group_size: int, mode: Optional[str] = None, layout: str = "gptq",
                   act_order: bool = False) -> AFPQConfigDict:
    """RTN-quantize the model's Linears (lm_head stays float), optionally in act-order."""
    from afpq_plugins.model import find_linears, quantize_model_rtn
    from afpq_plugins.nn.skeleton import set_module

    if not act_order:
        return quantize_model_rtn(model, fmt, group_size, mode, layout, progress=False)
    f = get_format(fmt)
    mode = resolve_mode(f, mode)
    linears = find_linears(model)
    with torch.no_grad():
        for name, lin in linears.items():
            perm = permutation(lin.in_features, _input_key(name))
            qw = quantize_act_order(lin.weight.detach(), f, group_size, mode, perm, name=f"{name}.weight")
            set_module(model, name, AFPQLinear.from_quantized(qw, lin.bias, "gptq", name=name))
    return AFPQConfigDict(
        format=f.name, bits=f.bits, group_size=group_size, mode=mode, layout="gptq", desc_act=True,
        method="rtn", modules_to_not_convert=["lm_head"], quantized_modules=list(linears),
        extra={"act_order": "permuted columns (test checkpoint)"},
    )


def quantize_mixed(model) -> AFPQConfigDict:
    """Per-module settings (``quantization_config.modules``), fused layers alike: q/k/v nf4 afpq
    g32, o_proj fp4 sym g64, gate/up nf3 zp g64, down_proj nf3 afpq g32."""
    from afpq_plugins.core.spec import QuantSpec
    from afpq_plugins.model import find_linears, quantize_model_rtn

    base = QuantSpec("nf4", 32, "afpq")
    by_leaf = {"o_proj": QuantSpec("fp4", 64, "sym"), "gate_proj": QuantSpec("nf3", 64, "zp"),
               "up_proj": QuantSpec("nf3", 64, "zp"), "down_proj": QuantSpec("nf3", 32, "afpq")}
    specs = {n: by_leaf.get(n.rpartition(".")[2], base) for n in find_linears(model)}
    return quantize_model_rtn(model, spec=base, layer_specs=specs, progress=False)


#: name -> (format, group_size, mode, layout, act_order, bias); format "mixed": quantize_mixed
CASES = {
    "nf4_g32": ("nf4", 32, "afpq", "gptq", False, False),
    "fp4_sym_g64": ("fp4", 64, "sym", "gptq", False, False),
    "nf3_zp_g64": ("nf3", 64, "zp", "gptq", False, False),
    "nf4_awq_g32": ("nf4", 32, "afpq", "awq", False, False),
    "nf4_actorder_bias_g32": ("nf4", 32, "afpq", "gptq", True, True),
    "mixed_per_module": ("mixed", None, None, "gptq", False, False),
}


def write_case(root: str, case: str, tok=None) -> str:
    from afpq_plugins.model import save_quantized

    fmt, gs, mode, layout, act_order, bias = CASES[case]
    tok = tok or tiny_tokenizer()
    model = tiny_llama(len(tok), seed=0, bias=bias)
    qc = quantize_mixed(model) if fmt == "mixed" else quantize_model(model, fmt, gs, mode, layout, act_order)
    return save_quantized(model, os.path.join(root, case), qc, tokenizer=tok, overwrite=True)
