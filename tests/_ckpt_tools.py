"""Helpers for tests that take a saved checkpoint apart and put it back together."""

from __future__ import annotations

import json
import os
import struct

import torch


def tiny_llama_checkpoint(path: str, fmt: str = "nf4", group_size: int = 32, tie: bool = True, seed: int = 0,
                          lm_head_dtype=None):
    """(folder, in-memory quantized model) of a tiny random Llama, RTN-quantized and saved."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from afpq_plugins.model import quantize_model_rtn, save_quantized

    cfg = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=128, tie_word_embeddings=tie, max_position_embeddings=64, pad_token_id=0,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).eval()
    qc = quantize_model_rtn(model, fmt, group_size, progress=False)
    if lm_head_dtype is not None:
        model.lm_head.to(lm_head_dtype)
    return save_quantized(model, str(path), qc), model


def ids(vocab: int = 128) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randint(1, vocab, (2, 9), generator=g)


def logits(model, x=None) -> torch.Tensor:
    x = ids() if x is None else x
    with torch.no_grad():
        return model(input_ids=x, attention_mask=torch.ones_like(x)).logits.float()


def split(path: str):
    """(header dict, header text, data bytes) of a safetensors file."""
    raw = open(path, "rb").read()
    (n,) = struct.unpack("<Q", raw[:8])
    text = raw[8:8 + n].decode("utf-8")
    return json.loads(text), text, raw[8 + n:]


def join(path: str, header, data: bytes, raw_text: str = None) -> None:
    """Write a safetensors file from a header (dict, or raw JSON text) and a data section."""
    hb = (raw_text if raw_text is not None else json.dumps(header)).encode("utf-8")
    hb += b" " * (-len(hb) % 8)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(hb)) + hb + data)


def read_config(folder: str) -> dict:
    with open(os.path.join(folder, "config.json"), encoding="utf-8") as fh:
        return json.load(fh)


def write_config(folder: str, cfg) -> None:
    with open(os.path.join(folder, "config.json"), "w", encoding="utf-8") as fh:
        fh.write(cfg if isinstance(cfg, str) else json.dumps(cfg))
