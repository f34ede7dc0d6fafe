"""GPU kernel benchmark: the fused AFPQ Triton kernels next to fp16, torch's INT4 and the torch reference.

    python benchmarks/bench_kernels.py [--quick] [--fmt nf4] [--layout gptq] [--act-order]
                                       [--sweep] [--no-flush] [--json benchmarks/out/kernels.json]

For every M in {1, 4, 16, 128, 2048} and every layer shape (in x out) 4096x4096,
4096x11008, 11008x4096, 5120x13824 at group size 128, the median time (CUDA events, L2
flushed before every repeat, as in ``triton.testing.do_bench``) of

* ``afpq``      AFPQ Triton kernel (``afpq_plugins.kernels.triton.linear``), fp16 activations
* ``afpq_bf16`` the same with bf16 activations (the INT4 kernel below takes bf16 only)
* ``fp16``      torch fp16 ``F.linear`` with the dequantized weight (cuBLAS)
* ``int4``      torch's built-in INT4 kernel (tinygemm): ``aten._weight_int4pack_mm(x_bf16,
                aten._convert_weight_to_int4pack(w_uint8[n, k/2], innerKTiles=8), 128,
                scales_and_zeros[k/128, n, 2] bf16)``, random codes (its speed does not
                depend on them)
* ``torch_ref`` the AFPQ torch reference (LUT dequantize, then matmul, every call)

and the ratios ``fp16 / afpq`` and ``int4 / afpq_bf16`` (> 1: AFPQ faster), plus the
AFPQ kernel's achieved memory bandwidth (packed codes + scales + activations + output)
against the device copy bandwidth measured in the same run.

Targets (issue 6): M = 1: ``fp16 / afpq >= 3`` and ``int4 / afpq_bf16 >= 0.9``;
M = 2048: ``fp16 / afpq >= 0.8``.

``--sweep`` also times a grid of kernel configurations (paths, tiles, split-K) per row
and reports the best next to the planner's default: the data to retune
``afpq_plugins.kernels.triton.plan_matmul``. Results go to ``--json`` and a markdown table on stdout.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import platform
import statistics
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

MS = (1, 4, 16, 128, 2048)
SHAPES = ((4096, 4096), (4096, 11008), (11008, 4096), (5120, 13824))  # (in, out)
GROUP = 128
TARGETS = {1: {"fp16": 3.0, "int4": 0.9}, 2048: {"fp16": 0.8}}
DEVICE = "cuda"


def _require_gpu():
    if not torch.cuda.is_available():
        sys.exit("bench_kernels.py needs a CUDA GPU: torch.cuda.is_available() is False here, nothing measured.")
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        sys.exit("bench_kernels.py: unset TRITON_INTERPRET (the interpreter's timings mean nothing).")
    try:
        from afpq_plugins.kernels import triton as triton_kernels
    except ImportError as exc:
        sys.exit(f"bench_kernels.py needs triton: {exc}")
    return triton_kernels


class Timer:
    """Median of CUDA-event times, L2 flushed before each repeat (cold weights, as in decoding)."""

    def __init__(self, reps: int, flush: bool):
        self.reps = reps
        self.cache = torch.empty(256 * 1024 * 1024, dtype=torch.int8, device="cuda") if flush else None

    def __call__(self, fn, reps=None) -> float:
        reps = reps or self.reps
        fn()  # compile / warm up
        torch.cuda.synchronize()
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        for s, e in zip(starts, ends):
            if self.cache is not None:
                self.cache.zero_()  # also gives the CPU time to queue the launch ahead of the GPU
            s.record()
            fn()
            e.record()
        torch.cuda.synchronize()
        return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends)) * 1e3  # us


def copy_bandwidth(timer: Timer) -> float:
    """Device-to-device copy bandwidth in GB/s (read + write), 1 GiB buffers."""
    a = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    t = timer(lambda: b.copy_(a), reps=20)
    return 2 * (1 << 30) / (t * 1e-6) / 1e9


def int4_baseline(K: int, N: int, device):
    """torch's tinygemm INT4 kernel on random codes; None where this torch/GPU lacks it."""
    try:
        codes = torch.randint(0, 16, (N, K), dtype=torch.int32, device=device)
        w_uint8 = (codes[:, ::2] << 4 | codes[:, 1::2]).to(torch.uint8)  # [n, k/2], high nibble first
        packed = torch.ops.aten._convert_weight_to_int4pack(w_uint8, 8)
        sz = torch.empty(K // GROUP, N, 2, dtype=torch.bfloat16, device=device)
        sz[..., 0].uniform_(0.005, 0.02)
        sz[..., 1].zero_()

        def run(x):
            return torch.ops.aten._weight_int4pack_mm(x, packed, GROUP, sz)

        run(torch.randn(1, K, device=device, dtype=torch.bfloat16))
        return run
    except Exception as exc:  # pragma: no cover - depends on the torch build and GPU
        print(f"  (torch INT4 kernel unavailable: {type(exc).__name__}: {exc})", file=sys.stderr)
        return None


def afpq_bytes(layer, M: int, act_bytes: int) -> int:
    n = layer.qweight.numel() * 4 + layer.scales.numel() * layer.scales.element_size()
    if layer.second is not None:
        n += layer.second.numel() * layer.second.element_size()
    if layer.g_idx is not None and not layer.has_default_order():
        n += layer.g_idx.numel() * 4
    if layer.bias is not None:
        n += layer.bias.numel() * layer.bias.element_size()
    return n + M * (layer.in_features + layer.out_features) * act_bytes


def sweep_configs(M: int):
    """Kernel configurations tried by --sweep (overrides for afpq_plugins.kernels.triton.linear)."""
    if M <= 16:
        for bn, split in itertools.product((32, 64, 128), (1, 2, 4, 8, 16)):
            yield {"path": "gemv", "block_m": 16, "block_n": bn, "split_k": split}  # tensor cores
            if M <= 4:  # CUDA-core FMAs
                yield {"path": "gemv", "block_m": 1 << (M - 1).bit_length(), "block_n": bn, "split_k": split}
    else:
        for bm, bn, split in itertools.product((32, 64, 128), (64, 128), (1, 2, 4)):
            if bm <= max(32, M):
                yield {"path": "gemm", "block_m": bm, "block_n": bn, "split_k": split}
        if M >= 128:
            yield {"path": "dequant"}


def bench_row(tk, timer, K, N, M, args, int4_fn):
    from afpq_plugins.kernels import torch_ref
    from afpq_plugins.nn import AFPQLinear

    dev = torch.device(DEVICE)
    torch.manual_seed(0)
    lin = nn.Linear(K, N, bias=False, device=dev, dtype=torch.float32)
    layer = AFPQLinear.from_linear(lin, args.fmt, GROUP, layout=args.layout)
    if args.act_order:
        g = torch.arange(K, device=dev, dtype=torch.int32) // GROUP
        layer.g_idx.copy_(g[torch.randperm(K, device=dev)])
    w16 = layer.dequantize(torch.float16)  # [out, in]
    x16 = torch.randn(M, K, device=dev, dtype=torch.float16)
    xbf = x16.to(torch.bfloat16)

    # Correctness first: a fast wrong kernel is not a result.
    y = tk.linear(x16, layer).float()
    ref = x16.float() @ layer.dequantize(torch.float32).t()
    rel_err = ((y - ref).norm() / ref.norm()).item()

    row = {"in": K, "out": N, "M": M, "fmt": args.fmt, "mode": layer.mode, "layout": args.layout,
           "act_order": args.act_order, "group": GROUP, "rel_err_vs_fp32": rel_err}
    sms, cap = tk._device_info(dev)
    plan = tk.plan_matmul(M, N, K, bits=layer.bits, layout=args.layout, group_size=GROUP, act_order=args.act_order,
                          dtype=torch.float16, on_cuda=dev.type == "cuda", sms=sms, capability=cap)
    row["plan"] = dataclasses.asdict(plan)
    row["afpq_us"] = timer(lambda: tk.linear(x16, layer))
    row["afpq_bf16_us"] = timer(lambda: tk.linear(xbf, layer))
    row["fp16_us"] = timer(lambda: torch.nn.functional.linear(x16, w16))
    row["int4_us"] = timer(lambda: int4_fn(xbf)) if int4_fn is not None else None
    row["torch_ref_us"] = timer(lambda: torch_ref.linear(x16, layer), reps=max(5, args.reps // 4))
    row["fp16_over_afpq"] = row["fp16_us"] / row["afpq_us"]
    row["int4_over_afpq"] = row["int4_us"] / row["afpq_bf16_us"] if row["int4_us"] else None
    row["ref_over_afpq"] = row["torch_ref_us"] / row["afpq_us"]
    nbytes = afpq_bytes(layer, M, 2)
    row["afpq_bytes"] = nbytes
    row["afpq_GBps"] = nbytes / (row["afpq_us"] * 1e-6) / 1e9
    row["fp16_GBps"] = (w16.numel() * 2 + M * (K + N) * 2) / (row["fp16_us"] * 1e-6) / 1e9
    if args.sweep:
        best = None
        for cfg in sweep_configs(M):
            try:
                t = timer(lambda: tk.linear(x16, layer, **cfg), reps=max(10, args.reps // 3))
            except Exception as exc:  # out of resources etc.
                print(f"  sweep {cfg}: {type(exc).__name__}", file=sys.stderr)
                continue
            if best is None or t < best[0]:
                best = (t, cfg)
        if best:
            row["sweep_best_us"], row["sweep_best_cfg"] = best
    return row


def check_targets(row) -> list:
    out = []
    for key, need in TARGETS.get(row["M"], {}).items():
        got = row["fp16_over_afpq"] if key == "fp16" else row["int4_over_afpq"]
        if got is not None:
            out.append(f"{key}>={need}:{'PASS' if got >= need else 'MISS'}")
    return out


def fmt_us(v):
    return "-" if v is None else f"{v:.1f}"


def fmt_x(v):
    return "-" if v is None else f"{v:.2f}x"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--fmt", default="nf4", help="AFPQ format (default nf4, mode afpq: the paper's NF4-asym)")
    ap.add_argument("--layout", default="gptq", choices=("gptq", "awq"))
    ap.add_argument("--act-order", action="store_true", help="random act-order g_idx (gptq layout)")
    ap.add_argument("--ms", default=",".join(map(str, MS)), help="comma-separated batch sizes M")
    ap.add_argument("--shapes", default=",".join(f"{k}x{n}" for k, n in SHAPES), help="in x out, comma-separated")
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--quick", action="store_true", help="first shape only, 15 repeats")
    ap.add_argument("--sweep", action="store_true", help="also time a grid of kernel configurations")
    ap.add_argument("--no-flush", action="store_true", help="keep L2 warm between repeats")
    ap.add_argument("--json", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "out", "kernels.json"))
    args = ap.parse_args(argv)
    if args.act_order and args.layout != "gptq":
        ap.error("--act-order needs --layout gptq")
    tk = _require_gpu()
    import triton

    ms = [int(m) for m in args.ms.split(",")]
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    if args.quick:
        shapes, args.reps = shapes[:1], 15
    timer = Timer(args.reps, flush=not args.no_flush)
    bw = copy_bandwidth(timer)
    props = torch.cuda.get_device_properties(0)
    print(f"# {props.name}, {props.multi_processor_count} SMs; torch {torch.__version__}, triton {triton.__version__}")
    print(f"# device copy bandwidth {bw:.0f} GB/s; {args.fmt} afpq, {args.layout} layout, group {GROUP}"
          f"{', act-order' if args.act_order else ''}; L2 {'warm' if args.no_flush else 'flushed'}; times in us\n")

    rows = []
    for K, N in shapes:
        int4_fn = int4_baseline(K, N, torch.device(DEVICE))
        for M in ms:
            t0 = time.time()
            row = bench_row(tk, timer, K, N, M, args, int4_fn)
            row["bw_fraction"] = row["afpq_GBps"] / bw
            row["targets"] = check_targets(row)
            rows.append(row)
            print(f"  {K}x{N} M={M}: afpq {row['afpq_us']:.1f} us, fp16 {row['fp16_us']:.1f} us "
                  f"({time.time() - t0:.0f} s)", file=sys.stderr)
        del int4_fn
        torch.cuda.empty_cache()

    head = ("| in x out | M | path | AFPQ fp16 | fp16 | fp16/AFPQ | AFPQ bf16 | INT4 | INT4/AFPQ | torch ref "
            "| AFPQ GB/s | of copy BW | rel err | targets |")
    print(head)
    print("|" + "|".join(["---"] * (head.count("|") - 1)) + "|")
    for r in rows:
        print(f"| {r['in']}x{r['out']} | {r['M']} | {r['plan']['path']} s{r['plan']['split_k']} | {fmt_us(r['afpq_us'])} "
              f"| {fmt_us(r['fp16_us'])} | {fmt_x(r['fp16_over_afpq'])} | {fmt_us(r['afpq_bf16_us'])} "
              f"| {fmt_us(r['int4_us'])} | {fmt_x(r['int4_over_afpq'])} | {fmt_us(r['torch_ref_us'])} "
              f"| {r['afpq_GBps']:.0f} | {100 * r['bw_fraction']:.0f}% | {r['rel_err_vs_fp32']:.1e} "
              f"| {' '.join(r['targets']) or '-'} |")
    if args.sweep:
        print("\n| in x out | M | default us | best us | best config |\n|---|---|---|---|---|")
        for r in rows:
            if "sweep_best_us" in r:
                print(f"| {r['in']}x{r['out']} | {r['M']} | {r['afpq_us']:.1f} | {r['sweep_best_us']:.1f} "
                      f"| {r['sweep_best_cfg']} |")
    print("\nTargets: M=1: fp16/AFPQ >= 3x and INT4/AFPQ(bf16) >= 0.9x; M=2048: fp16/AFPQ >= 0.8x.")

    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    meta = {
        "device": props.name, "sms": props.multi_processor_count, "torch": torch.__version__,
        "triton": triton.__version__, "python": platform.python_version(), "copy_GBps": bw,
        "l2_flushed": not args.no_flush, "reps": args.reps, "targets": {str(k): v for k, v in TARGETS.items()},
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    with open(args.json, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
