"""Kernel benchmark: the fused AFPQ Triton kernels next to fp16 cuBLAS, torch's INT4 kernel
and the torch reference path. Used by ``benchmarks/gpu_check.py`` (which also runs the
CUDA tests and the end-to-end decode); runnable alone:

    PYTHONPATH=. python3 benchmarks/bench_kernels.py [--ms 1,16] [--shapes 4096x4096] [--fmts nf4,fp4]
                                                      [--sweep] [--json out.json]

Each row is one (layer shape in x out, M, format) at group size 128, layout gptq, mode afpq:

* ``afpq``      the Triton kernel (``afpq_plugins.kernels.triton.linear``), fp16 activations
* ``afpq_bf16`` the same with bf16 activations (what torch's INT4 kernel takes)
* ``fp16``      ``F.linear`` with the dequantized weight in fp16 (cuBLAS)
* ``int4``      ``aten._weight_int4pack_mm`` (tinygemm), group 128, bf16, random codes
* ``torch_ref`` the AFPQ torch reference (LUT dequantize, then matmul, every call)

Timing (CUDA): every candidate runs inside a CUDA graph that calls it once per weight copy,
with enough copies (2.5x the L2 cache, at least 2) that the weights stream from device
memory as in decoding; the replay is timed with CUDA events and the median over repeats is
divided by the number of copies. Capture failing is reported as an error of that row (the
decode path must be capturable). ``torch_ref`` is timed eagerly. Achieved bandwidth = bytes
the AFPQ kernel must read and write (codes, scales, activations, output) over its time,
against a device-to-device copy measured in the same run (bytes read + written).

``--sweep`` also times a grid of kernel configurations per row (see :func:`sweep_configs`):
the data the planner's defaults (``afpq_plugins/kernels/triton/planning.py``) are tuned from.
On CPU (``--dry-run``: Triton's interpreter, tiny shapes) the same code runs with wall-clock
timing; its figures mean nothing, it only keeps the script alive.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import itertools
import json
import math
import os
import statistics
import sys
import time
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

MS = (1, 4, 16, 128, 2048)
SHAPES = ((4096, 4096), (4096, 11008), (11008, 4096), (8192, 28672))  # (in, out)
DRY_MS = (1, 17)
DRY_SHAPES = ((128, 64),)
GROUP = 128
#: Issue targets, ratios measured side by side: {(fmt, M): {baseline: ratio}}.
TARGETS = {
    ("nf4", 1): {"fp16": 3.0, "int4": 0.9}, ("fp4", 1): {"fp16": 3.0, "int4": 0.9}, ("nf3", 1): {"fp16": 3.5},
    ("nf4", 16): {"fp16": 2.5}, ("nf4", 2048): {"fp16": 0.8},
}
BW_TARGET = 0.6  # M = 1, the two largest shapes: achieved / copy bandwidth


# -- timing ---------------------------------------------------------------------------------

class Bench:
    """Times lists of calls (one per weight copy); CUDA graphs + events on CUDA, wall clock on CPU."""

    def __init__(self, device: torch.device, reps: int = 30):
        self.device = device
        self.cuda = device.type == "cuda"
        self.reps = reps
        self.l2 = torch.cuda.get_device_properties(device).L2_cache_size if self.cuda else 0

    def copies(self, nbytes: int, cap: int = 32) -> int:
        """Weight copies for one graph so that the set is 2.5x the L2 cache (at least 2)."""
        if not self.cuda:
            return 1
        return int(min(cap, max(2, math.ceil(2.5 * self.l2 / max(nbytes, 1)))))

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def eager(self, calls: Sequence[Callable], reps: Optional[int] = None) -> float:
        """Median us per call, each repeat running every call once, no graph."""
        reps = reps or self.reps
        if self.cuda:  # warm-up (the interpreter has nothing to warm)
            for f in calls:
                f()
            self.sync()
        times = []
        for _ in range(reps):
            if self.cuda:
                s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                s.record()
                for f in calls:
                    f()
                e.record()
                e.synchronize()
                times.append(s.elapsed_time(e) * 1e3 / len(calls))
            else:
                t0 = time.perf_counter()
                for f in calls:
                    f()
                times.append((time.perf_counter() - t0) * 1e6 / len(calls))
        return statistics.median(times)

    def graph(self, calls: Sequence[Callable], reps: Optional[int] = None) -> float:
        """Median us per call over replays of one CUDA graph holding every call once.
        Raises when capture fails. On CPU: :meth:`eager`."""
        if not self.cuda:
            return self.eager(calls, reps)
        reps = reps or self.reps
        for f in calls:  # warm-up: compilation, workspaces, cached checks
            f()
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for f in calls:
                f()
        torch.cuda.current_stream(self.device).wait_stream(side)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for f in calls:
                f()
        g.replay()
        self.sync()
        ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
        for s, e in ev:
            s.record()
            g.replay()
            e.record()
        self.sync()
        del g
        return statistics.median(s.elapsed_time(e) for s, e in ev) * 1e3 / len(calls)


def copy_bandwidth(bench: Bench) -> Optional[float]:
    """Device-to-device copy bandwidth in GB/s (bytes read + written), 1 GiB buffers."""
    if not bench.cuda:
        return None
    a = torch.empty(1 << 30, dtype=torch.uint8, device=bench.device).random_()
    b = torch.empty_like(a)
    t = bench.eager([lambda: b.copy_(a)], reps=20)
    del a, b
    return 2 * (1 << 30) / (t * 1e-6) / 1e9


# -- the things timed -----------------------------------------------------------------------

def make_layer(K: int, N: int, fmt: str, device, seed: int = 0):
    """An AFPQLinear (mode afpq, layout gptq, group 128, no bias) quantized from a random Linear."""
    from afpq_plugins.nn import AFPQLinear

    torch.manual_seed(seed)
    w = torch.randn(N, K, device=device) * 0.02
    lin = torch.nn.Linear(K, N, bias=False, device=device)
    with torch.no_grad():
        lin.weight.copy_(w)
    del w
    return AFPQLinear.from_linear(lin, fmt, GROUP, layout="gptq")


def afpq_bytes(layer, M: int, act_bytes: int = 2) -> int:
    n = layer.qweight.numel() * 4 + layer.scales.numel() * layer.scales.element_size()
    if layer.second is not None:
        n += layer.second.numel() * layer.second.element_size()
    return n + M * (layer.in_features + layer.out_features) * act_bytes


def int4_weight(K: int, N: int, device):
    """(packed weight, scales_and_zeros) for torch's tinygemm INT4 kernel, random codes;
    (None, reason) where this torch/device lacks it."""
    try:
        codes = torch.randint(0, 16, (N, K), dtype=torch.int32, device=device)
        sz = torch.empty(K // GROUP, N, 2, dtype=torch.bfloat16, device=device)
        sz[..., 0].uniform_(0.001, 0.004)
        sz[..., 1].uniform_(-0.01, 0.01)
        if device.type == "cuda":
            w_uint8 = (codes[:, ::2] << 4 | codes[:, 1::2]).to(torch.uint8)  # [n, k/2]
            packed = torch.ops.aten._convert_weight_to_int4pack(w_uint8, 8)
            mm = torch.ops.aten._weight_int4pack_mm
        else:
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 8)
            mm = torch.ops.aten._weight_int4pack_mm_for_cpu
        x = torch.randn(1, K, device=device, dtype=torch.bfloat16)
        mm(x, packed, GROUP, sz)
        return (packed, sz, mm), ""
    except Exception as exc:  # depends on the torch build and the device
        return None, f"{type(exc).__name__}: {str(exc)[:200]}"


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    y = y.double()
    if not torch.isfinite(y).all():
        return float("inf")
    return ((y - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def sweep_configs(M: int, fmt: str, cuda: bool, full: bool = False) -> List[Dict]:
    """Kernel configurations timed by the sweep (keyword overrides of ``linear``): around
    the planner's choice by default, the wide grid the defaults were tuned from with ``full``."""
    cpb = 32 if fmt.endswith("3") else 8  # codes per block along K (gptq)
    if not cuda:  # dry run: two configurations, enough to exercise the plumbing
        return [{"path": "gemv" if M <= 16 else "gemm", "block_n": 32, "split_k": 2},
                {"path": "gemv" if M <= 16 else "gemm", "block_n": 64, "split_k": 1}]
    if not full:
        if M == 1 and cpb == 8:
            return [{}, {"prefetch": False}, {"block_n": 32}, {"block_n": 64}, {"block_n": 32, "prefetch": False},
                    {"block_n": 64, "prefetch": False}, {"split_k": 1}, {"num_warps": 8}, {"block_r": 32},
                    {"path": "gemv", "block_m": 16}]
        if M == 1:
            return [{}, {"prefetch": False}, {"block_n": 64}, {"split_k": 8}]
        if M <= 16:
            return [{}, {"path": "gemv"}, {"path": "gemv", "num_warps": 8}, {"path": "gemv", "block_n": 64},
                    {"path": "gemv", "num_stages": 3}, {"path": "gemv", "fold": False}, {"path": "gemv", "split_k": 1}]
        return [{}, {"path": "gemm"}, {"path": "gemm", "block_m": 64}, {"path": "gemm", "block_m": 128}]
    out = []
    if M == 1 and cpb == 8:
        for bn, br, w, s, split in itertools.product((32, 64, 128), (16, 32, 64), (4, 8), (1, 3), (None, 1)):
            cfg = {"path": "gemv", "block_m": 1, "block_n": bn, "block_r": br, "num_warps": w, "num_stages": s}
            if split:
                cfg["split_k"] = split
            out.append(cfg)
        for bn, br, s in itertools.product((32, 64, 128), (16, 32), (1, 2)):
            out.append({"path": "gemv", "block_m": 16, "block_n": bn, "block_r": br, "num_warps": 4, "num_stages": s})
        out += [{"fold": False}, {"fold": False, "num_warps": 8}, {"fold": False, "block_n": 128}]
    elif M == 1:  # 3 bits: 32 codes per block
        for bn, br, w, s in itertools.product((64, 128), (4, 8), (4, 8), (1, 2)):
            out.append({"path": "gemv", "block_m": 1, "block_n": bn, "block_r": br, "num_warps": w, "num_stages": s})
    elif M <= 16:
        for bn, br, w, s, split in itertools.product((32, 64, 128), (16, 32), (4, 8), (1, 2, 3), (None, 1)):
            cfg = {"path": "gemv", "block_m": 16, "block_n": bn, "block_r": br, "num_warps": w, "num_stages": s}
            if split:
                cfg["split_k"] = split
            out.append(cfg)
        out += [{"fold": False}, {"fold": False, "num_stages": 1}]
    elif M < 1024:
        for bm, bn, br, w in itertools.product((32, 64, 128), (64, 128), (16, 32), (4, 8)):
            if bm <= max(32, M):
                out.append({"path": "gemm", "block_m": bm, "block_n": bn, "block_r": br, "num_warps": w,
                            "num_stages": 3})
    else:
        for bn, br in itertools.product((64, 128), (16, 32)):
            out.append({"path": "dequant", "block_n": bn, "block_r": br})
        for bm, bn, br in ((128, 128, 16), (128, 128, 32), (128, 256, 16)):
            out.append({"path": "gemm", "block_m": bm, "block_n": bn, "block_r": br, "num_warps": 8, "num_stages": 3})
    return out


def split_configs(base: Dict) -> List[Dict]:
    """Split-K variants of a (best) configuration."""
    return [dict(base, split_k=s) for s in (1, 2, 4, 8, 16, 32)]


@dataclasses.dataclass
class Subject:
    """Everything built once per (shape, fmt): the layer, copies, baselines."""

    K: int
    N: int
    fmt: str
    layer: object
    copies: List[object]
    w16: Optional[List[torch.Tensor]] = None
    int4: Optional[List[tuple]] = None
    int4_error: str = ""


def build_subject(bench: Bench, K: int, N: int, fmt: str, baselines: bool) -> Subject:
    layer = make_layer(K, N, fmt, bench.device)
    c = bench.copies(afpq_bytes(layer, 0))
    copies = [layer] + [copy.deepcopy(layer) for _ in range(c - 1)]
    sub = Subject(K, N, fmt, layer, copies)
    if baselines:
        w16 = layer.dequantize(torch.float16)
        sub.w16 = [w16] + [w16.clone() for _ in range(bench.copies(w16.numel() * 2) - 1)]
        i4, sub.int4_error = int4_weight(K, N, bench.device)
        if i4 is not None:
            packed, sz, mm = i4
            n = bench.copies(packed.numel() * packed.element_size())
            sub.int4 = [(packed, sz, mm)] + [(packed.clone(), sz.clone(), mm) for _ in range(n - 1)]
    return sub


def _time(bench: Bench, calls, reps=None) -> Tuple[Optional[float], str]:
    try:
        return bench.graph(calls, reps), ""
    except Exception as exc:  # capture failure, out of resources...
        return None, f"{type(exc).__name__}: {str(exc)[:300]}"


def bench_row(bench: Bench, tk, sub: Subject, M: int, copy_bw: Optional[float], baselines: bool,
              ref_reps: int = 3) -> Dict:
    from afpq_plugins.kernels import torch_ref

    dev = bench.device
    torch.manual_seed(M)
    x16 = torch.randn(M, sub.K, device=dev, dtype=torch.float16)
    xbf = x16.to(torch.bfloat16)
    layer = sub.layer
    ref = x16.double() @ layer.dequantize(torch.float32).double().t()
    row = {"in": sub.K, "out": sub.N, "M": M, "fmt": sub.fmt, "group": GROUP, "errors": {}}
    sms, cap = tk.device_info(dev)
    plan = tk.plan_matmul(M, sub.N, sub.K, bits=layer.bits, layout="gptq", group_size=GROUP, dtype=torch.float16,
                          on_cuda=bench.cuda, sms=sms, capability=cap)
    row["plan"] = {k: v for k, v in dataclasses.asdict(plan).items() if k != "grid"}
    row["rel_err"] = rel_err(tk.linear(x16, layer), ref)
    row["rel_err_bf16"] = rel_err(tk.linear(xbf, layer), ref)
    row["copies"] = len(sub.copies)
    if bench.cuda:  # the same call replayed from a CUDA graph must give the same result
        try:
            tk.linear(x16, layer)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                y_graph = tk.linear(x16, layer)
            y_graph.fill_(float("nan"))
            g.replay()
            bench.sync()
            row["rel_err_graph"] = rel_err(y_graph, ref)
            del g
        except Exception as exc:
            row["errors"]["graph"] = f"{type(exc).__name__}: {str(exc)[:200]}"
    row["afpq_us"], e = _time(bench, [lambda L=L: tk.linear(x16, L) for L in sub.copies])
    if e:
        row["errors"]["afpq"] = e
    if baselines:
        row["afpq_bf16_us"], e = _time(bench, [lambda L=L: tk.linear(xbf, L) for L in sub.copies])
        if e:
            row["errors"]["afpq_bf16"] = e
        row["fp16_us"], e = _time(bench, [lambda w=w: torch.nn.functional.linear(x16, w) for w in sub.w16])
        if e:
            row["errors"]["fp16"] = e
        if sub.int4 is not None:
            row["int4_us"], e = _time(bench, [lambda p=p: p[2](xbf, p[0], GROUP, p[1]) for p in sub.int4])
            if e:
                row["errors"]["int4"] = e
        else:
            row["int4_us"] = None
            row["errors"]["int4"] = sub.int4_error
        try:
            row["torch_ref_us"] = bench.eager([lambda: torch_ref.linear(x16, layer)], reps=ref_reps)
        except Exception as exc:  # out of memory at large M, say
            row["torch_ref_us"] = None
            row["errors"]["torch_ref"] = f"{type(exc).__name__}: {str(exc)[:200]}"

        def ratio(a, b):
            return a / b if a and b else None

        row["fp16_over_afpq"] = ratio(row["fp16_us"], row["afpq_us"])
        row["int4_over_afpq"] = ratio(row["int4_us"], row["afpq_bf16_us"])
        row["ref_over_afpq"] = ratio(row["torch_ref_us"], row["afpq_us"])
    nbytes = afpq_bytes(layer, M)
    row["afpq_bytes"] = nbytes
    if row["afpq_us"]:
        row["afpq_GBps"] = nbytes / (row["afpq_us"] * 1e-6) / 1e9
        row["bw_fraction"] = row["afpq_GBps"] / copy_bw if copy_bw else None
    row["targets"] = check_targets(row)
    return row


def sweep_row(bench: Bench, tk, sub: Subject, M: int, configs: Iterable[Dict], reps: int,
              deadline: float) -> List[Dict]:
    """Each configuration's time (us per call) or error; stops at ``deadline`` (time.time())."""
    torch.manual_seed(M)
    x16 = torch.randn(M, sub.K, device=bench.device, dtype=torch.float16)
    ref = x16.double() @ sub.layer.dequantize(torch.float32).double().t()
    out = []
    for cfg in configs:
        if time.time() > deadline:
            out.append({"cfg": cfg, "us": None, "error": "skipped: time budget"})
            continue
        try:
            err = rel_err(tk.linear(x16, sub.layer, **cfg), ref)
        except Exception as exc:
            out.append({"cfg": cfg, "us": None, "error": f"{type(exc).__name__}: {str(exc)[:200]}"})
            continue
        us, e = _time(bench, [lambda L=L: tk.linear(x16, L, **cfg) for L in sub.copies], reps)
        out.append({"cfg": cfg, "us": us, "rel_err": err, **({"error": e} if e else {})})
    return out


def check_targets(row: Dict) -> List[str]:
    out = []
    for key, need in TARGETS.get((row["fmt"], row["M"]), {}).items():
        got = row.get("fp16_over_afpq") if key == "fp16" else row.get("int4_over_afpq")
        if got is not None:
            out.append(f"{key}>={need}:{'PASS' if got >= need else 'MISS'}")
    return out


# -- tables -----------------------------------------------------------------------------------

def _us(v):
    return "-" if v is None else f"{v:.1f}"


def _x(v):
    return "-" if v is None else f"{v:.2f}x"


def kernel_table(rows: List[Dict]) -> str:
    head = ("| fmt | in x out | M | plan | AFPQ fp16 us | fp16 us | fp16/AFPQ | AFPQ bf16 us | INT4 us | INT4/AFPQ "
            "| torch ref us | AFPQ GB/s | of copy | rel err | targets |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        p = r["plan"]
        plan = f"{p['path']} {p['block_m']}x{p['block_n']}x{p['block_r']} w{p['num_warps']} s{p['num_stages']} k{p['split_k']}"
        bw = r.get("bw_fraction")
        lines.append(
            f"| {r['fmt']} | {r['in']}x{r['out']} | {r['M']} | {plan} | {_us(r.get('afpq_us'))} | {_us(r.get('fp16_us'))} "
            f"| {_x(r.get('fp16_over_afpq'))} | {_us(r.get('afpq_bf16_us'))} | {_us(r.get('int4_us'))} "
            f"| {_x(r.get('int4_over_afpq'))} | {_us(r.get('torch_ref_us'))} | {r.get('afpq_GBps', 0):.0f} "
            f"| {'-' if bw is None else f'{100 * bw:.0f}%'} | {r['rel_err']:.1e} | {' '.join(r['targets']) or '-'} |")
    return "\n".join(lines)


def sweep_table(sweeps: List[Dict]) -> str:
    lines = ["| fmt | in x out | M | default us | best us | best config | configs timed |", "|---|---|---|---|---|---|---|"]
    for s in sweeps:
        ok = [c for c in s["results"] if c.get("us")]
        best = min(ok, key=lambda c: c["us"]) if ok else None
        lines.append(f"| {s['fmt']} | {s['in']}x{s['out']} | {s['M']} | {_us(s.get('default_us'))} "
                     f"| {_us(best['us'] if best else None)} | {best['cfg'] if best else '-'} | {len(ok)} |")
    return "\n".join(lines)


def kernels_for(dry: bool):
    """The Triton kernels package, built for the interpreter on CPU (dry run)."""
    if dry:
        os.environ["TRITON_INTERPRET"] = "1"
    elif os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        sys.exit("unset TRITON_INTERPRET for a GPU run (the interpreter's timings mean nothing)")
    from afpq_plugins.kernels import triton as tk

    if dry and not tk.INTERPRET:
        sys.exit("dry run: triton was imported before TRITON_INTERPRET=1 could be set")
    if dry:  # the interpreter multiplies bf16 dot operands as raw bits: shim for this process
        import triton_dev

        global _BF16_SHIM
        _BF16_SHIM = triton_dev.patch_interpreter_bf16()
    return tk


_BF16_SHIM = None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ms", default=",".join(map(str, MS)))
    ap.add_argument("--shapes", default=",".join(f"{k}x{n}" for k, n in SHAPES), help="in x out, comma-separated")
    ap.add_argument("--fmts", default="nf4")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--json", default=os.path.join(ROOT, "benchmarks", "out", "kernels.json"))
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_kernels.py needs a CUDA GPU (the CPU dry run is benchmarks/gpu_check.py --dry-run)")
    tk = kernels_for(False)
    bench = Bench(torch.device("cuda"), args.reps)
    bw = copy_bandwidth(bench)
    rows, sweeps = [], []
    for fmt in args.fmts.split(","):
        for K, N in (tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")):
            sub = build_subject(bench, K, N, fmt, True)
            for M in (int(m) for m in args.ms.split(",")):
                rows.append(bench_row(bench, tk, sub, M, bw, True))
                if args.sweep:
                    res = sweep_row(bench, tk, sub, M, sweep_configs(M, fmt, True), 10, float("inf"))
                    sweeps.append({"fmt": fmt, "in": K, "out": N, "M": M, "default_us": rows[-1]["afpq_us"],
                                   "results": res})
            del sub
            torch.cuda.empty_cache()
    print(f"# {torch.cuda.get_device_name()}, copy {bw:.0f} GB/s\n")
    print(kernel_table(rows))
    if sweeps:
        print("\n" + sweep_table(sweeps))
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json + ".tmp", "w") as f:
        json.dump({"copy_GBps": bw, "rows": rows, "sweeps": sweeps}, f, indent=1)
    os.replace(args.json + ".tmp", args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
