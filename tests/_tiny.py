"""Tiny offline models and tokenizers for tests (no hub, no network)."""

from __future__ import annotations

import os

import torch

TEXT = (
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, "
    "must be in want of a wife. However little known the feelings or views of such a man may be "
    "on his first entering a neighbourhood, this truth is so well fixed in the minds of the "
    "surrounding families, that he is considered the rightful property of some one or other of "
    "their daughters. "
) * 8


def tiny_tokenizer(vocab_size: int = 256):
    """A byte-level BPE tokenizer trained on a paragraph, wrapped for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator([TEXT], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")


def tiny_llama(vocab_size: int = 320, seed: int = 0, tie: bool = True, hidden: int = 64):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=vocab_size, tie_word_embeddings=tie, max_position_embeddings=512,
    )
    return LlamaForCausalLM(cfg).eval()


def tiny_qwen2(vocab_size: int = 320, seed: int = 1):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=vocab_size, max_position_embeddings=512,
                      tie_word_embeddings=True)
    return Qwen2ForCausalLM(cfg).eval()


def tiny_llama_folder(path: str, seed: int = 0) -> str:
    """Save a tiny random Llama and a matching tokenizer as a local model folder."""
    tok = tiny_tokenizer()
    model = tiny_llama(vocab_size=len(tok), seed=seed)
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def random_quantized_layer(layout, fmt, mode, gs, act, in_f, out_f, seed=0, bias=True):
    """``(AFPQLinear, QuantizedWeight)`` with random codes and group parameters (act-order
    ``g_idx`` when ``act``), for the kernel tests."""
    import numpy as np

    from afpq_plugins.core.formats import get_format
    from afpq_plugins.core.quantize import QuantizedWeight, default_g_idx
    from afpq_plugins.nn import AFPQLinear

    g = np.random.default_rng(seed)
    f = get_format(fmt)
    codes = torch.from_numpy(g.integers(0, 2**f.bits, (out_f, in_f))).to(torch.uint8)
    g_idx = default_g_idx(in_f, gs)
    if act:
        g_idx = g_idx[torch.from_numpy(g.permutation(in_f))]
    groups = 1 if gs == -1 else in_f // gs
    scales = torch.from_numpy(g.uniform(0.01, 0.2, (groups, out_f))).half()
    if mode == "afpq":
        scales2 = torch.from_numpy(g.uniform(0.01, 0.2, (groups, out_f))).half()
    elif mode == "zp":
        scales2 = torch.from_numpy(g.integers(0, 2**f.bits, (groups, out_f)).astype(np.float64)).half()
    else:
        scales2 = None
    qw = QuantizedWeight(codes, scales, scales2, g_idx, f, mode, gs)
    b = torch.from_numpy(g.normal(0, 0.1, out_f)).float() if bias else None
    return AFPQLinear.from_quantized(qw, bias=b, layout=layout), qw


def benchmark_module(name: str):
    """Context manager: ``benchmarks/<name>.py`` imported as a module (registered in sys.modules
    while in use, so dataclasses can look it up), for tests of a benchmark's helpers."""
    import contextlib
    import importlib.util
    import sys
    from pathlib import Path

    @contextlib.contextmanager
    def loaded():
        path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
        spec = importlib.util.spec_from_file_location(f"_{name}", path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod
        try:
            spec.loader.exec_module(mod)
            yield mod
        finally:
            sys.modules.pop(spec.name, None)

    return loaded()
