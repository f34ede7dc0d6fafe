"""CPU benchmark: the native AFPQ kernel next to float F.linear, torch's INT4 CPU kernel and the torch path.

    python benchmarks/bench_cpu.py [--quick] [--part layers|e2e|all] [--threads N] [--e2e-rounds R]
                                   [--layer-budget S] [--json benchmarks/out/cpu.json]

Layers: shapes (out x in) 4096x4096, 11008x4096, 4096x11008 at group 128 and SmolLM2's
576x1536, 1536x576 at group 64; M in {1, 4, 16, 64, 512}. Per (shape, M), the median wall
time of, run interleaved (one call of each per round, so load changes hit all alike):

* ``fp32`` / ``bf16``  ``F.linear`` with the float weight in that dtype
* ``int4``    ``aten._weight_int4pack_mm_for_cpu`` (bf16 activations, same group size,
              weights from ``_convert_weight_to_int4pack_for_cpu``, random codes)
* ``torch``   the AFPQ torch reference path (``AFPQ_KERNEL=torch``), nf4
* ``nf4`` / ``nf4_bf16``  the AFPQ layer (registry -> native kernel), fp32 / bf16 activations;
  at M in {1, 16} also ``fp4`` and ``nf3`` (3-bit, spilled gptq words)

and the ratios ``int4 / nf4_bf16`` etc. (> 1: AFPQ faster). For M = 1 the achieved bandwidth
(packed codes + group parameters + activations + output read or written once) is printed
next to a copy bandwidth measured in the same run.

End to end (``--part e2e``): SmolLM2-135M-Instruct (the embedded GGUF's Q4_1 weights,
dequantized), greedy ``generate`` of 128 new tokens through transformers: float32 model vs
its nf4 g64 AFPQ checkpoint (saved, reloaded) on the native kernel and on the torch path;
then ``afpq eval`` (CLI, 4 windows of 1024 tokens) of both, wall and perplexity-loop time.

Targets (issue "Fast CPU inference"): 4-bit M=1 >= 0.8x INT4 speed on the large shapes and
0.7x on SmolLM2's, M=16 >= 0.7x; nf3 M=1 >= 0.6x; M=512 time <= 1.3x bf16 F.linear; generate
at least as fast as float32; ``afpq eval`` <= 1.3x the float model's time.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from afpq_plugins.kernels import choose_kernel, torch_ref  # noqa: E402
from afpq_plugins.nn import AFPQLinear  # noqa: E402

SHAPES = ((4096, 4096, 128), (11008, 4096, 128), (4096, 11008, 128), (576, 1536, 64), (1536, 576, 64))
MS = (1, 4, 16, 64, 512)
EXTRA_FMTS_AT = (1, 16)


def _interleaved(fns: dict, budget_s: float, max_rounds: int = 25) -> dict:
    """Median wall time (seconds) of each callable, calls interleaved round by round."""
    for f in fns.values():  # warm-up (builds, repacks, caches)
        f()
    first = {}
    for k, f in fns.items():
        t = time.perf_counter()
        f()
        first[k] = time.perf_counter() - t
    rounds = int(max(1, min(max_rounds, budget_s / max(sum(first.values()), 1e-9))))
    times = {k: [first[k]] for k in fns}
    for _ in range(rounds):
        for k, f in fns.items():
            t = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def copy_bandwidth() -> float:
    """GB/s of a large tensor copy (bytes read + written), same threads."""
    src = torch.ones(64 << 20)  # 256 MiB of float32, well past the last-level cache
    dst = torch.empty_like(src)
    t = _interleaved({"copy": lambda: dst.copy_(src)}, 2.0)["copy"]
    return 2 * src.numel() * 4 / t / 1e9


def _layer(out_f, in_f, gs, fmt):
    torch.manual_seed(0)
    lin = torch.nn.Linear(in_f, out_f, bias=False)
    return lin, AFPQLinear.from_linear(lin, fmt, gs)


def _int4(out_f, in_f, gs):
    q = torch.randint(0, 16, (out_f, in_f), dtype=torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    sz = (torch.rand(in_f // gs, out_f, 2) * 0.01).bfloat16()
    return lambda xb: torch.ops.aten._weight_int4pack_mm_for_cpu(xb, packed, gs, sz)


def _bytes_m1(layer, x) -> int:
    pack = getattr(layer, "_afpq_cpu_pack", None)
    if pack is None:
        return 0
    return 4 * (pack.codes.numel() + pack.p1.numel() + (pack.p2.numel() if pack.p2 is not pack.p1 else 0)) \
        + x.numel() * x.element_size() + layer.out_features * 4


def bench_layers(quick: bool, budget: float = 3.0) -> dict:
    torch.set_grad_enabled(False)
    shapes = SHAPES[:1] + SHAPES[3:] if quick else SHAPES
    ms = (1, 16, 512) if quick else MS
    rows = []
    bw = copy_bandwidth()
    print(f"copy bandwidth: {bw:.1f} GB/s; threads {torch.get_num_threads()}", flush=True)
    for out_f, in_f, gs in shapes:
        lin, nf4 = _layer(out_f, in_f, gs, "nf4")
        extra = {f: _layer(out_f, in_f, gs, f)[1] for f in ("fp4", "nf3")}
        w32, wb = lin.weight.detach(), lin.weight.detach().bfloat16()
        int4 = _int4(out_f, in_f, gs)
        for m in ms:
            x = torch.randn(m, in_f)
            xb = x.bfloat16()
            fns = {
                "fp32": lambda: F.linear(x, w32),
                "bf16": lambda: F.linear(xb, wb),
                "int4": lambda: int4(xb),
                "torch": lambda: torch_ref.linear(x, nf4),
                "nf4": lambda: nf4(x),
                "nf4_bf16": lambda: nf4(xb),
            }
            if m in EXTRA_FMTS_AT:
                for f, layer in extra.items():
                    fns[f] = (lambda layer=layer: layer(x))
            kernel = choose_kernel(x, nf4)[0].name
            t = _interleaved(fns, budget_s=budget if m < 512 else 2.5 * budget)
            row = {"out": out_f, "in": in_f, "group": gs, "M": m, "kernel": kernel,
                   **{k: v * 1e6 for k, v in t.items()}}
            row["int4/nf4_bf16"] = t["int4"] / t["nf4_bf16"]
            row["int4/nf4"] = t["int4"] / t["nf4"]
            row["bf16/nf4"] = t["bf16"] / t["nf4"]
            row["fp32/nf4"] = t["fp32"] / t["nf4"]
            row["torch/nf4"] = t["torch"] / t["nf4"]
            for f in extra:
                if f in t:
                    row[f"int4/{f}"] = t["int4"] / t[f]
            if m == 1:
                row["GB/s nf4"] = _bytes_m1(nf4, x) / t["nf4"] / 1e9
                row["GB/s nf3"] = _bytes_m1(extra["nf3"], x) / t["nf3"] / 1e9
                row["copy GB/s"] = bw
            rows.append(row)
            _print_row(row)
    return {"copy_GBps": bw, "rows": rows}


def _print_row(r) -> None:
    us = " ".join(f"{k} {r[k]:.0f}" for k in ("fp32", "bf16", "int4", "torch", "nf4", "nf4_bf16", "fp4", "nf3") if k in r)
    ratios = " ".join(f"{k} {v:.2f}" for k, v in r.items() if "/" in k or "GB/s" in k)
    print(f"{r['out']}x{r['in']} g{r['group']} M={r['M']} [{r['kernel']}] us: {us} | {ratios}", flush=True)


# -- end to end -------------------------------------------------------------------------------------

def _generate_time(model, ids, new_tokens: int) -> float:
    t = time.perf_counter()
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                         min_new_tokens=new_tokens, do_sample=False)
    dt = time.perf_counter() - t
    assert out.shape[1] == ids.shape[1] + new_tokens
    return dt


def _cli_eval(model: str, windows: int) -> dict:
    t = time.perf_counter()
    res = subprocess.run(
        [sys.executable, "-m", "afpq_plugins.cli", "eval", model, "--windows", str(windows), "--json", "--quiet"],
        check=True, capture_output=True, text=True,
        env={**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())},  # the same threads as the rest
    )
    wall = time.perf_counter() - t
    out = json.loads(res.stdout.strip().splitlines()[-1])
    return {"wall_s": wall, "eval_s": out.get("seconds"), "ppl": out.get("ppl", out.get("perplexity"))}


def bench_e2e(quick: bool, rounds: int = 2) -> dict:
    import copy

    from afpq_plugins.data import default_model_path, load_model_and_tokenizer
    from afpq_plugins.model import load_quantized, quantize_model_rtn, save_quantized

    torch.set_grad_enabled(False)
    new_tokens = 32 if quick else 128
    path = default_model_path()
    model, tok = load_model_and_tokenizer(path)
    ckpt = tempfile.mkdtemp(prefix="afpq_bench_cpu_")
    qmodel = copy.deepcopy(model)
    qc = quantize_model_rtn(qmodel, "nf4", 64, progress=False)
    save_quantized(qmodel, ckpt, qc, tokenizer=tok, overwrite=True)
    del qmodel
    qmodel = load_quantized(ckpt)
    msgs = [{"role": "user", "content": "Write a short story about a lighthouse keeper."}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt")
    if not isinstance(ids, torch.Tensor):
        ids = ids["input_ids"]
    _generate_time(model, ids, 4)
    _generate_time(qmodel, ids, 4)
    res = {"new_tokens": new_tokens, "threads": torch.get_num_threads()}
    t_f, t_q, t_t = [], [], []
    torch_tokens = min(new_tokens, 32)  # the torch path is slow: fewer tokens, same tok/s measure
    for _ in range(rounds):  # interleaved rounds; the faster of each is kept
        t_f.append(_generate_time(model, ids, new_tokens))
        t_q.append(_generate_time(qmodel, ids, new_tokens))
        os.environ["AFPQ_KERNEL"] = "torch"
        try:
            t_t.append(_generate_time(qmodel, ids, torch_tokens))
        finally:
            del os.environ["AFPQ_KERNEL"]
    res.update({
        "rounds": rounds, "float32 tok/s": new_tokens / min(t_f), "afpq nf4 g64 tok/s": new_tokens / min(t_q),
        f"afpq torch path tok/s ({torch_tokens} tokens)": torch_tokens / min(t_t),
        "afpq/float32 speed": min(t_f) / min(t_q),
    })
    print(json.dumps(res), flush=True)
    windows = 2 if quick or rounds < 2 else 4
    ev_f = _cli_eval("default", windows)
    ev_q = _cli_eval(ckpt, windows)
    res["eval"] = {"float32": ev_f, "afpq": ev_q, "windows": windows,
                   "wall ratio afpq/float32": ev_q["wall_s"] / ev_f["wall_s"],
                   "eval-loop ratio afpq/float32": (ev_q["eval_s"] / ev_f["eval_s"]) if ev_f["eval_s"] else None}
    print(json.dumps(res["eval"]), flush=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer shapes and M values, 32 generated tokens")
    ap.add_argument("--part", choices=("layers", "e2e", "all"), default="all")
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--e2e-rounds", type=int, default=2, help="generate rounds (1: also 2 eval windows)")
    ap.add_argument("--layer-budget", type=float, default=3.0, help="seconds of timing per layer case")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, cpu capability "
          f"{torch.backends.cpu.get_cpu_capability()}", flush=True)
    out = {}
    if args.part == "all":  # the end-to-end part first: it is shorter and bounded
        out["e2e"] = bench_e2e(args.quick, args.e2e_rounds)
    if args.part in ("layers", "all"):
        out["layers"] = bench_layers(args.quick, args.layer_budget)
    if args.part == "e2e":
        out["e2e"] = bench_e2e(args.quick, args.e2e_rounds)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        tmp = args.json + ".tmp"
        with open(tmp, "w") as fh:
            json.dump(out, fh, indent=1)
        os.replace(tmp, args.json)


if __name__ == "__main__":
    main()
