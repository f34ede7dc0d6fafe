"""CPU benchmark: the native AFPQ kernel next to float F.linear, torch's INT4 CPU kernel and the torch path.

    python benchmarks/bench_cpu.py [--quick] [--part layers|threads|load|e2e|all] [--threads N]
                                   [--e2e-rounds R] [--layer-budget S] [--json benchmarks/out/cpu.json]

Layers (``--part layers``): shapes (out x in) 4096x4096, 11008x4096, 4096x11008 at group 128 and
SmolLM2's 576x1536, 1536x576 at group 64; M in {1, 4, 16, 64, 512}. Per (shape, M), the median
wall time of, run interleaved (one call of each per round, so load changes hit all alike):

* ``fp32`` / ``bf16``  ``F.linear`` with the float weight in that dtype
* ``int4``    ``aten._weight_int4pack_mm_for_cpu`` (bf16 activations, same group size,
              weights from ``_convert_weight_to_int4pack_for_cpu``, random codes)
* ``torch``   the AFPQ torch reference path (``AFPQ_KERNEL=torch``), nf4 (M <= 16 only)
* ``nf4`` / ``nf4_bf16``  the AFPQ layer (registry -> native kernel), fp32 / bf16 activations;
  at M in {1, 16} also ``fp4`` and ``nf3`` (3-bit, spilled gptq words), fp32 activations

and the ratios ``int4 / nf4_bf16`` etc. (> 1: AFPQ faster), with the kernel path each M takes.

Threads (``--part threads``): the large shapes at M in {1, 16, 512}, AFPQ (bf16 activations)
and bf16 ``F.linear`` at one thread and at the default count, interleaved: the speed-up.

Load (``--part load``): M in {16, 512} on 4096x4096 and 576x1536, every candidate timed on an
otherwise idle machine and then with one competing CPU-bound process (a pure-Python busy loop),
interleaved in one run: each candidate's slowdown, and AFPQ's slowdown over torch's own.

End to end (``--part e2e``): SmolLM2-135M-Instruct (the embedded GGUF's Q4_1 weights,
dequantized), greedy ``generate`` of 128 new tokens through transformers: float32 model vs
its nf4 g64 AFPQ checkpoint (saved, reloaded) on the native kernel and on the torch path;
then ``afpq eval`` (CLI, 4 windows of 1024 tokens) of both, wall and perplexity-loop time.

Targets (issue "CPU kernel, part two"): M = 1 >= 1.0x INT4 (fp32 and bf16 activations);
M = 4, 16, 64 >= 1.0x INT4; M = 512 >= 1.0x float32 F.linear, >= 0.8x bf16 F.linear where the
CPU has native bf16; threads 1 -> 2 >= 1.7x at M = 1, 16, 512 on the large shapes; under one
competing process AFPQ's slowdown <= 1.5x torch's; generate 128 tokens >= 3x float32; afpq
eval <= 0.8x the float model's time.
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
    """Median wall time (seconds) of each callable, calls interleaved round by round in a shuffled
    order (so no candidate always runs right after the one whose weights it shares, or right after
    a large one that evicted its weights from the caches)."""
    import random

    rng = random.Random(0)
    for f in fns.values():  # warm-up (builds, repacks, caches)
        f()
    first = {}
    for k, f in fns.items():
        t = time.perf_counter()
        f()
        first[k] = time.perf_counter() - t
    rounds = int(max(3, min(max_rounds, budget_s / max(sum(first.values()), 1e-9))))
    times = {k: [first[k]] for k in fns}
    order = list(fns)
    for _ in range(rounds):
        rng.shuffle(order)
        for k in order:
            f = fns[k]
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
                "nf4": lambda: nf4(x),
                "nf4_bf16": lambda: nf4(xb),
            }
            if m <= 16:
                fns["torch"] = lambda: torch_ref.linear(x, nf4)
            if m in EXTRA_FMTS_AT:
                for f, layer in extra.items():
                    fns[f] = (lambda layer=layer: layer(x))
            kernel = choose_kernel(x, nf4)[0].name
            t = _interleaved(fns, budget_s=budget if m < 512 else 2.5 * budget)
            row = {"out": out_f, "in": in_f, "group": gs, "M": m, "kernel": kernel,
                   "path": f"{path_of(m, torch.float32)} / {path_of(m, torch.bfloat16)}",
                   **{k: v * 1e6 for k, v in t.items()}}
            row["int4/nf4_bf16"] = t["int4"] / t["nf4_bf16"]
            row["int4/nf4"] = t["int4"] / t["nf4"]
            row["bf16/nf4_bf16"] = t["bf16"] / t["nf4_bf16"]
            row["fp32/nf4"] = t["fp32"] / t["nf4"]
            row["bf16/nf4"] = t["bf16"] / t["nf4"]
            if "torch" in t:
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
    print(f"{r['out']}x{r['in']} g{r['group']} M={r['M']} [{r['kernel']}: {r['path']}] us: {us} | {ratios}", flush=True)


def path_of(m: int, dtype) -> str:
    """The native kernel's path for M rows of ``dtype`` activations (see afpq_plugins.kernels.cpu)."""
    from afpq_plugins.kernels import cpu

    ok, _ = cpu.available()
    if not ok:
        return "torch"
    reg, flags = cpu.settings(dtype, cpu.ISAS[cpu.isa()[0]])
    if m <= reg:
        return "gemv"
    if m <= cpu.SMALL_ROWS:
        return "amx" if flags & 2 else "small"
    return "mm-bf16" if flags & 1 else "mm-fp32"


def machine() -> dict:
    """The CPU behind the figures: model, ISA flags that matter here, threads, load."""
    model, flags = "?", set()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name") and model == "?":
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    isa = [f for f in ("avx2", "fma", "avx512f", "avx512bw", "avx512_bf16", "amx_tile", "amx_bf16") if f in flags]
    from afpq_plugins.kernels import cpu

    ok, why = cpu.available()
    return {"cpu": model, "isa": isa, "cores": os.cpu_count(), "threads": torch.get_num_threads(),
            "loadavg_1m_at_start": os.getloadavg()[0], "torch": torch.__version__,
            "native kernel": cpu.isa()[0] if ok else f"unavailable: {why}",
            "native bf16": bool(ok and cpu.native_bf16()), "amx": bool(ok and cpu.amx_usable())}


# -- threads and load -------------------------------------------------------------------------------

def bench_threads(quick: bool, budget: float = 3.0) -> dict:
    """AFPQ (bf16 x) and bf16 F.linear at one thread and at the default count, interleaved."""
    torch.set_grad_enabled(False)
    default = torch.get_num_threads()
    rows = []
    for out_f, in_f, gs in SHAPES[:1] if quick else SHAPES[:3]:
        lin, nf4 = _layer(out_f, in_f, gs, "nf4")
        wb = lin.weight.detach().bfloat16()
        for m in (1, 16, 512):
            xb = torch.randn(m, in_f).bfloat16()

            def at(n, f):
                def call():
                    torch.set_num_threads(n)
                    try:
                        return f()
                    finally:
                        torch.set_num_threads(default)
                return call

            fns = {"nf4_bf16 1t": at(1, lambda: nf4(xb)), f"nf4_bf16 {default}t": at(default, lambda: nf4(xb)),
                   "bf16 1t": at(1, lambda: F.linear(xb, wb)), f"bf16 {default}t": at(default, lambda: F.linear(xb, wb))}
            t = _interleaved(fns, budget if m < 512 else 2.5 * budget)
            row = {"out": out_f, "in": in_f, "M": m, "threads": default, **{k: v * 1e6 for k, v in t.items()},
                   "afpq speed-up": t["nf4_bf16 1t"] / t[f"nf4_bf16 {default}t"],
                   "bf16 F.linear speed-up": t["bf16 1t"] / t[f"bf16 {default}t"]}
            rows.append(row)
            print(json.dumps(row), flush=True)
    return {"rows": rows}


_BUSY = "while True: pass"


def bench_load(quick: bool, budget: float = 3.0) -> dict:
    """Slowdown of each candidate when one CPU-bound process competes, idle and loaded interleaved
    per round (the competitor is started and stopped between the halves of each round)."""
    import signal

    torch.set_grad_enabled(False)
    busy = subprocess.Popen([sys.executable, "-c", _BUSY])
    os.kill(busy.pid, signal.SIGSTOP)
    rows = []
    try:
        for out_f, in_f, gs in (SHAPES[0], SHAPES[3]):
            lin, nf4 = _layer(out_f, in_f, gs, "nf4")
            w32, wb = lin.weight.detach(), lin.weight.detach().bfloat16()
            int4 = _int4(out_f, in_f, gs)
            for m in (16, 512):
                x = torch.randn(m, in_f)
                xb = x.bfloat16()
                fns = {"fp32": lambda: F.linear(x, w32), "bf16": lambda: F.linear(xb, wb), "int4": lambda: int4(xb),
                       "nf4": lambda: nf4(x), "nf4_bf16": lambda: nf4(xb)}
                idle, loaded = {k: [] for k in fns}, {k: [] for k in fns}
                for f in fns.values():
                    f()
                rounds = 4 if quick else 8
                for _ in range(rounds):
                    for k, f in fns.items():
                        t0 = time.perf_counter(); f(); idle[k].append(time.perf_counter() - t0)
                    os.kill(busy.pid, signal.SIGCONT)
                    time.sleep(0.05)
                    for k, f in fns.items():
                        t0 = time.perf_counter(); f(); loaded[k].append(time.perf_counter() - t0)
                    os.kill(busy.pid, signal.SIGSTOP)
                med = {k: (statistics.median(idle[k]), statistics.median(loaded[k])) for k in fns}
                slow = {k: lo / id_ for k, (id_, lo) in med.items()}
                row = {"out": out_f, "in": in_f, "M": m, "threads": torch.get_num_threads(),
                       **{f"{k} idle us": v[0] * 1e6 for k, v in med.items()},
                       **{f"{k} loaded us": v[1] * 1e6 for k, v in med.items()},
                       **{f"{k} slowdown": v for k, v in slow.items()},
                       "nf4_bf16 slowdown / bf16 F.linear's": slow["nf4_bf16"] / slow["bf16"],
                       "nf4_bf16 slowdown / int4's": slow["nf4_bf16"] / slow["int4"],
                       "nf4 slowdown / fp32 F.linear's": slow["nf4"] / slow["fp32"]}
                rows.append(row)
                print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)
    finally:
        busy.kill()
        busy.wait()
    return {"rows": rows}


# -- end to end -------------------------------------------------------------------------------------

def _generate_time(model, ids, new_tokens: int) -> float:
    t = time.perf_counter()
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                         min_new_tokens=new_tokens, do_sample=False)
    dt = time.perf_counter() - t
    assert out.shape[1] == ids.shape[1] + new_tokens
    return dt


def _cli_eval(model: str, windows: int, **env) -> dict:
    t = time.perf_counter()
    res = subprocess.run(
        [sys.executable, "-m", "afpq_plugins.cli", "eval", model, "--windows", str(windows), "--json", "--quiet"],
        check=True, capture_output=True, text=True,
        env={**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads()), **env},  # the same threads as the rest
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
    from afpq_plugins.kernels import cpu

    if cpu.available()[0] and cpu.native_bf16():  # the opt-in bf16 products for float32 activations
        ev_b = _cli_eval(ckpt, windows, AFPQ_CPU_PREFILL="bf16")
        res["eval"].update({"afpq bf16 products": ev_b,
                            "eval-loop ratio afpq bf16 products/float32": ev_b["eval_s"] / ev_f["eval_s"]})
    print(json.dumps(res["eval"]), flush=True)
    return res


def report(paths) -> str:
    """Markdown tables of one or more ``--json`` outputs (layers, threads, load, end to end)."""
    lines = []
    for path in paths:
        with open(path) as fh:
            res = json.load(fh)
        m = res.get("machine", {})
        lines += [f"`{path}`: {m.get('cpu')}, {m.get('cores')} cores, ISA {' '.join(m.get('isa', []))}, "
                  f"{m.get('threads')} threads, native bf16 {m.get('native bf16')}, AMX {m.get('amx')}, "
                  f"load average at start {m.get('loadavg_1m_at_start', 0):.2f}", ""]
        if "layers" in res:
            lines += ["| shape (out x in), M | path fp32 / bf16 x | INT4 µs | AFPQ fp32 x µs | AFPQ bf16 x µs | "
                      "INT4 / AFPQ (bf16 x) | INT4 / AFPQ (fp32 x) | fp32 F.linear / AFPQ (fp32 x) | "
                      "bf16 F.linear / AFPQ (bf16 x) |", "|---|---|---|---|---|---|---|---|---|"]
            for r in res["layers"]["rows"]:
                lines.append(f"| {r['out']} x {r['in']}, {r['M']} | {r['path']} | {r['int4']:.0f} | {r['nf4']:.0f} | "
                             f"{r['nf4_bf16']:.0f} | {r['int4/nf4_bf16']:.2f} | {r['int4/nf4']:.2f} | "
                             f"{r['fp32/nf4']:.2f} | {r['bf16/nf4_bf16']:.2f} |")
            lines.append("")
        if "threads" in res:
            lines += ["| shape, M | AFPQ (bf16 x) 1 -> N threads | bf16 F.linear 1 -> N threads |", "|---|---|---|"]
            for r in res["threads"]["rows"]:
                lines.append(f"| {r['out']} x {r['in']}, {r['M']} | {r['afpq speed-up']:.2f}x | "
                             f"{r['bf16 F.linear speed-up']:.2f}x |")
            lines.append("")
        if "load" in res:
            lines += ["| shape, M | slowdown: fp32 / bf16 F.linear, INT4 | AFPQ fp32 x / bf16 x | "
                      "AFPQ bf16 x over bf16 F.linear's | over INT4's | AFPQ fp32 x over fp32 F.linear's |",
                      "|---|---|---|---|---|---|"]
            for r in res["load"]["rows"]:
                over_bf16, over_int4 = r["nf4_bf16 slowdown / bf16 F.linear's"], r["nf4_bf16 slowdown / int4's"]
                over_fp32 = r["nf4 slowdown / fp32 F.linear's"]
                lines.append(f"| {r['out']} x {r['in']}, {r['M']} | {r['fp32 slowdown']:.2f} / {r['bf16 slowdown']:.2f}, "
                             f"{r['int4 slowdown']:.2f} | {r['nf4 slowdown']:.2f} / {r['nf4_bf16 slowdown']:.2f} | "
                             f"{over_bf16:.2f} | {over_int4:.2f} | {over_fp32:.2f} |")
            lines.append("")
        if "e2e" in res:
            e = res["e2e"]
            lines += [f"generate {e['new_tokens']} tokens: float32 {e['float32 tok/s']:.2f} tok/s, AFPQ nf4 g64 "
                      f"{e['afpq nf4 g64 tok/s']:.2f} tok/s ({e['afpq/float32 speed']:.2f}x)"]
            if "eval" in e:
                ev = e["eval"]
                lines += [f"afpq eval ({ev['windows']} x 1024): wall {ev['float32']['wall_s']:.1f} s float32, "
                          f"{ev['afpq']['wall_s']:.1f} s AFPQ ({ev['wall ratio afpq/float32']:.2f}x time); forward loop "
                          f"{ev['float32']['eval_s']:.2f} s / {ev['afpq']['eval_s']:.2f} s "
                          f"({ev['eval-loop ratio afpq/float32']:.2f}x); perplexity {ev['float32']['ppl']:.4f} / "
                          f"{ev['afpq']['ppl']:.4f}"]
                if "afpq bf16 products" in ev:
                    b = ev["afpq bf16 products"]
                    lines += [f"with AFPQ_CPU_PREFILL=bf16: forward loop {b['eval_s']:.2f} s "
                              f"({ev['eval-loop ratio afpq bf16 products/float32']:.2f}x), perplexity {b['ppl']:.4f}"]
            lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer shapes and M values, 32 generated tokens")
    ap.add_argument("--part", choices=("layers", "threads", "load", "e2e", "all"), default="all")
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--e2e-rounds", type=int, default=2, help="generate rounds (1: also 2 eval windows)")
    ap.add_argument("--layer-budget", type=float, default=3.0, help="seconds of timing per layer case")
    ap.add_argument("--report", nargs="+", default=None, metavar="JSON", help="print markdown tables of saved runs")
    args = ap.parse_args()
    if args.report:
        print(report(args.report))
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    out = {"machine": machine()}
    print(json.dumps(out["machine"]), flush=True)
    if args.part == "all":  # the end-to-end part first: it is shorter and bounded
        out["e2e"] = bench_e2e(args.quick, args.e2e_rounds)
    if args.part in ("layers", "all"):
        out["layers"] = bench_layers(args.quick, args.layer_budget)
    if args.part in ("threads", "all"):
        out["threads"] = bench_threads(args.quick, args.layer_budget)
    if args.part in ("load", "all"):
        out["load"] = bench_load(args.quick, args.layer_budget)
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
