"""One prepared GPU check of the Triton kernels and the CUDA GEMV: correctness, speed, decode.

    make gpu-check                 # on a CUDA machine: python3 benchmarks/gpu_check.py
    make gpu-check DRY=1           # CPU dry run: Triton's interpreter, tiny shapes, seconds

Runs from the source tree (``PYTHONPATH=.``) with nothing installed beyond torch, Triton
and pytest, and writes everything under ``--out`` (default ``$OUT``, else
``benchmarks/out/gpu_check``): ``gpu_check.json`` (every figure), ``gpu_check.md`` (the
tables) and ``gpu_check.log``. Steps, within ``--budget`` seconds overall:

1. the kernel tests that CI skips without a GPU (``tests/test_triton_kernels.py -k
   compiled``: fp16/bf16/fp32, gptq and awq layouts, 3 and 4 bits, act-order, the
   split-K reduction; and all of ``tests/test_cuda_gemv.py``, whose GPU tests compare the
   CUDA GEMV with its bit-exact numpy model), in a pytest subprocess; meanwhile worker
   processes compile every kernel configuration the later steps time, into Triton's cache,
   so that timing does not wait on compilers;
1b. the CUDA GEMV (``afpq_plugins.kernels.cuda``, :mod:`cuda_bench` in this folder):
   correctness for every layout, bits, mode, act-order, padded / single groups, fp16 and
   bf16, M = 1..8, outputs NaN-poisoned before each call (all written), within the stated
   bound of float64, bit-exact to the numpy model (M = 1, 3, 8), CUDA-graph replay == eager
   bit for bit (M = 1, 8); then its table at M = 1, 2, 4, 8, 16 on 4096x4096, 4096x11008,
   11008x4096, 8192x28672 (group 128; fp4 and nf3 at M = 1): CUDA GEMV, current Triton path,
   fp16 cuBLAS, tinygemm INT4, ratios and bandwidth against the copy of the same run;
2. ``bench_kernels``: M in {1, 4, 16, 128, 2048} x the LLaMA-7B/13B/70B-class shapes
   (nf4; fp4 and nf3 at M = 1 and 16), group 128, against fp16 cuBLAS, torch's INT4
   kernel and the torch reference, with achieved bandwidth against a measured copy;
3. ``bench_decode``: 8 LLaMA-2-7B-shaped decoder layers, batch 1, 128-token prompt, 128
   new tokens, fp16 vs AFPQ nf4 g128 vs INT4, eager and CUDA graphs; then the AFPQ model
   again with the CUDA GEMV registered (decode steps on the GEMV, prefill on Triton), eager
   and graphs, per-step graph-vs-eager difference, ratios to the fp16 / INT4 runs above;
4. a sweep (unless ``--no-sweep``): variations around the planner's choice per row
   (``--full-sweep``: the wide grid the defaults were tuned from), until the budget runs out.

On a GPU, steps 2 and 4 (the Triton tuning tables) run only when asked for
(``--triton-table``, ``--sweep`` / ``--full-sweep``): the CUDA GEMV table times the current
Triton path next to the new kernel, and one default run must leave device time for a second
(the default budget, 480 s, fits one 600-s device command). The dry run runs every step.

Partial results are written after every step, so a run stopped by a time limit still
leaves its figures. The dry run executes the same code on tiny shapes with the
interpreter (and only collects the CUDA tests): it proves the script runs, not speed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from typing import Dict, List

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for p in (ROOT, HERE):
    if p not in sys.path:
        sys.path.insert(0, p)

#: ``--cuda-only``: the CUDA GEMV's tests alone (a quick second run).
CUDA_GEMV_TESTS = ["tests/test_cuda_gemv.py"]
#: Longest wait for the test subprocess (it is stopped then, its log kept).
TESTS_MAX_S = 240
CUDA_TESTS = ["tests/test_triton_kernels.py", "tests/test_cuda_gemv.py", "-k", "compiled or test_cuda_gemv"]


class Log:
    def __init__(self, path: str):
        self.f = open(path, "a", buffering=1)

    def __call__(self, msg: str):
        print(msg, flush=True)
        self.f.write(msg + "\n")


def atomic_write(path: str, text: str):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def environment(dev) -> Dict:
    import torch
    import triton

    env = {"python": platform.python_version(), "torch": torch.__version__, "triton": triton.__version__,
           "machine": platform.machine(), "cpus": os.cpu_count(), "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "command": " ".join([os.path.basename(sys.executable)] + sys.argv)}
    if dev.type == "cuda":
        p = torch.cuda.get_device_properties(dev)
        env.update(device=p.name, sms=p.multi_processor_count, capability=f"{p.major}.{p.minor}",
                   memory_GiB=round(p.total_memory / 2**30, 1), l2_MB=round(p.L2_cache_size / 1e6, 1))
        try:
            env["nvidia_smi"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,power.limit",
                 "--format=csv,noheader"], capture_output=True, text=True, timeout=20).stdout.strip()
        except Exception as exc:
            env["nvidia_smi"] = f"unavailable: {exc}"
    else:
        env["device"] = "cpu (dry run: Triton interpreter)"
    return env


# -- step 1: tests + compile workers ------------------------------------------------------------

def start_tests(dry: bool, workers: int, log_path: str, tests=None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *(tests or CUDA_TESTS)]
    if dry:
        cmd.append("--collect-only")
    elif workers > 1:
        import importlib.util

        if importlib.util.find_spec("xdist") is not None:  # pytest-xdist, where installed
            cmd += ["-n", str(workers)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p))
    if dry:
        env.update(TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=open(log_path, "w"), stderr=subprocess.STDOUT)


def plan_items(dry: bool, sweep: bool, full: bool = False) -> List[Dict]:
    """Every (fmt, shape, M, activation dtype, config) the timing steps call."""
    import bench_kernels as bk

    shapes = bk.DRY_SHAPES if dry else bk.SHAPES
    ms = bk.DRY_MS if dry else bk.MS
    items = []
    for K, N in shapes:
        for M in ms:
            for dt in ("fp16", "bf16"):
                items.append({"fmt": "nf4", "K": K, "N": N, "M": M, "dt": dt, "cfg": {}})
        for fmt in ("fp4", "nf3"):
            for M in other_ms(dry):
                for dt in ("fp16", "bf16"):
                    items.append({"fmt": fmt, "K": K, "N": N, "M": M, "dt": dt, "cfg": {}})
    if sweep:
        for K, N in shapes:
            for fmt, M in sweep_rows(dry):
                for cfg in bk.sweep_configs(M, fmt, not dry, full):
                    items.append({"fmt": fmt, "K": K, "N": N, "M": M, "dt": "fp16", "cfg": cfg})
    return items


def other_ms(dry: bool):
    """M timed for fp4 and nf3 (nf4 gets every M)."""
    return (1,) if dry else (1, 16)


def sweep_rows(dry: bool):
    if dry:
        return [("nf4", 1)]
    return [("nf4", 1), ("nf4", 4), ("nf4", 16), ("nf3", 1), ("nf4", 128)]


def warm_worker(index: int, count: int, dry: bool, sweep: bool, full: bool = False) -> int:
    """Compile (by calling once) every item ``index::count`` into Triton's cache."""
    import torch
    import bench_kernels as bk
    from afpq_plugins.nn import AFPQLinear

    tk = bk.kernels_for(dry)
    dev = torch.device("cpu" if dry else "cuda")
    # Items that compile the same kernel (shape aside) go to the same worker.
    everything = plan_items(dry, sweep, full)
    keys = sorted({json.dumps([it["fmt"], it["M"], it["dt"], it["cfg"]], sort_keys=True) for it in everything})
    mine = set(keys[index::count])
    items = [it for it in everything if json.dumps([it["fmt"], it["M"], it["dt"], it["cfg"]], sort_keys=True) in mine]
    layers = {}
    fails = 0
    for it in items:
        key = (it["fmt"], it["K"], it["N"])
        if key not in layers:
            layers[key] = AFPQLinear(it["K"], it["N"], False, fmt=it["fmt"], group_size=bk.GROUP, device=dev)
        dt = torch.float16 if it["dt"] == "fp16" else torch.bfloat16
        x = torch.randn(it["M"], it["K"], device=dev, dtype=dt)
        try:
            tk.linear(x, layers[key], **it["cfg"])
        except Exception as exc:
            fails += 1
            print(f"warm {it}: {type(exc).__name__}: {str(exc)[:200]}", file=sys.stderr)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    print(f"worker {index}/{count}: {len(items)} items, {fails} failed")
    return 0


def start_workers(n: int, dry: bool, sweep: bool, full: bool, log_path: str) -> List[subprocess.Popen]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p))
    out = open(log_path, "w")
    return [subprocess.Popen([sys.executable, __file__, "--warm", f"{i}/{n}"] + (["--dry-run"] if dry else [])
                             + (["--sweep"] if sweep else ["--no-sweep"]) + (["--full-sweep"] if full else []),
                             cwd=ROOT, env=env, stdout=out,
                             stderr=subprocess.STDOUT) for i in range(n)]


def test_summary(log_path: str, rc) -> Dict:
    text = open(log_path).read() if os.path.exists(log_path) else ""
    tail = [ln for ln in text.strip().splitlines() if ln.strip()][-1:] or [""]
    return {"returncode": rc, "summary": tail[0], "log_tail": text[-4000:]}


# -- report ---------------------------------------------------------------------------------------

def targets_summary(result: Dict) -> List[Dict]:
    import bench_kernels as bk

    out = []
    rows = result.get("kernels", {}).get("rows", [])
    shapes = sorted({(r["in"], r["out"]) for r in rows}, key=lambda s: -s[0] * s[1])
    big = {s for s in shapes if s[0] * s[1] >= (shapes[1][0] * shapes[1][1] if len(shapes) > 1 else 0)}
    for r in rows:
        for key, need in bk.TARGETS.get((r["fmt"], r["M"]), {}).items():
            got = r.get("fp16_over_afpq") if key == "fp16" else r.get("int4_over_afpq")
            out.append({"target": f"{r['fmt']} M={r['M']} {r['in']}x{r['out']}: {key}/AFPQ >= {need}",
                        "value": got, "pass": got is not None and got >= need})
        if r["M"] == 1 and r["fmt"] in ("nf4", "fp4") and (r["in"], r["out"]) in big:
            got = r.get("bw_fraction")
            out.append({"target": f"{r['fmt']} M=1 {r['in']}x{r['out']}: bandwidth >= {bk.BW_TARGET:.0%} of copy",
                        "value": got, "pass": got is not None and got >= bk.BW_TARGET})
    chk = result.get("decode", {}).get("checks", {})
    for key, need in (("graph_afpq_over_fp16", 2.5), ("graph_afpq_over_int4", 0.9)):
        if key in chk:
            got = chk[key]
            out.append({"target": f"decode, CUDA graphs: {key.replace('graph_', '').replace('_over_', ' / ')} >= {need}",
                        "value": got, "pass": isinstance(got, float) and got >= need})
    return out


def markdown(result: Dict) -> str:
    import bench_kernels as bk

    env = result["env"]
    lines = [f"# GPU check: {env.get('device')}", "",
             f"torch {env['torch']}, triton {env['triton']}, python {env['python']}; `{env['command']}`; {env['time']}",
             f"nvidia-smi: {env.get('nvidia_smi', '-')}", ""]
    t = result.get("tests")
    if t:
        lines += [f"**CUDA tests** (`pytest {' '.join(t.get('selection', CUDA_TESTS))}`): rc {t['returncode']}, "
                  f"`{t['summary']}`", ""]
    k = result.get("kernels")
    if k:
        bw = k.get("copy_GBps")
        lines += [f"## Kernels (group 128, gptq layout, mode afpq; us per call, CUDA-graph replays over "
                  f"weight copies > L2; copy bandwidth {bw:.0f} GB/s)" if bw else "## Kernels (dry run)", "",
                  bk.kernel_table(k["rows"]), ""]
    ts = result.get("targets")
    if ts:
        lines += ["## Targets", "", "| target | value | |", "|---|---|---|"]
        for x in ts:
            v = x["value"]
            v = "-" if v is None else (f"{v:.2f}" if isinstance(v, float) else str(v))
            lines.append(f"| {x['target']} | {v} | {'PASS' if x['pass'] else 'MISS'} |")
        lines.append("")
    d = result.get("decode")
    if d:
        s = d["shape"]
        lines += [f"## Decode: {s['layers']} layers, hidden {s['hidden']}, MLP {s['inter']}, {s['heads']} heads; "
                  f"batch 1, prompt {s['prompt']}, {s['new']} new tokens", "",
                  "| model | weights GB | prefill ms | eager tok/s | graph tok/s | graph = eager (max rel err) |",
                  "|---|---|---|---|---|---|"]
        for name, v in d["variants"].items():
            if "error" in v:
                lines.append(f"| {name} | error: {v['error'][:120]} | | | | |")
                continue
            e, g = v.get("eager", {}), v.get("graph", {})
            ge = v.get("graph_vs_eager_rel_err")
            lines.append(f"| {name} | {v['weight_GB']:.2f} | {e.get('prefill_ms', 0):.1f} | "
                         f"{e.get('tokens_per_s', 0):.1f} | {g.get('tokens_per_s', 0):.1f}{' ' + g['error'][:80] if 'error' in g else ''} "
                         f"| {'-' if ge is None else f'{ge:.1e}'} |")
        lines += ["", "Checks: " + ", ".join(f"{a} = {b:.3g}" if isinstance(b, float) else f"{a} = {b}"
                                             for a, b in d["checks"].items()), ""]
    cu = result.get("cuda")
    if cu:
        import cuda_bench as cb

        lines += [cb.markdown(cu)]
    sw = result.get("sweeps")
    if sw:
        lines += ["## Sweep (best configuration per row)", "", bk.sweep_table(sw), ""]
    errs = [(f"{r['fmt']} {r['in']}x{r['out']} M={r['M']}", r["errors"]) for r in (k or {}).get("rows", []) if r["errors"]]
    if errs:
        lines += ["## Errors", ""] + [f"- {w}: {e}" for w, e in errs] + [""]
    return "\n".join(lines)


# -- main -------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="CPU, Triton interpreter, tiny shapes")
    ap.add_argument("--out", default=os.environ.get("OUT") or os.path.join(HERE, "out", "gpu_check"))
    ap.add_argument("--budget", type=float, default=480.0, help="seconds for the whole run (sweeps stop first, "
                    "then the CUDA GEMV table's last rows)")
    ap.add_argument("--no-sweep", action="store_true")
    ap.add_argument("--full-sweep", action="store_true", help="the wide tuning grid (minutes) instead of "
                    "variations around the planner's choices")
    ap.add_argument("--skip-tests", action="store_true")
    ap.add_argument("--triton-table", action="store_true", help="on a GPU, also step 2 (the Triton table; the "
                    "CUDA GEMV table times the Triton path too); always on in a dry run")
    ap.add_argument("--sweep", action="store_true", help="on a GPU, also step 4 (always on in a dry run)")
    ap.add_argument("--skip-cuda", action="store_true", help="skip the CUDA GEMV steps")
    ap.add_argument("--cuda-only", action="store_true", help="a quick second run: of the tests only "
                    "tests/test_cuda_gemv.py, no Triton table or sweep (the decode baselines still run)")
    ap.add_argument("--workers", type=int, default=0, help="compile workers (default: CPUs - 6, at most 10)")
    ap.add_argument("--reps", type=int, default=0)
    ap.add_argument("--warm", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    dry = args.dry_run
    triton_table = (dry or args.triton_table) and not args.cuda_only
    sweep = (dry or args.sweep or args.full_sweep) and not args.no_sweep and not args.cuda_only
    if args.warm:
        i, n = (int(v) for v in args.warm.split("/"))
        return warm_worker(i, n, dry, sweep, args.full_sweep)

    t_start = time.time()
    deadline = t_start + args.budget
    os.makedirs(args.out, exist_ok=True)
    log = Log(os.path.join(args.out, "gpu_check.log"))
    import torch
    import bench_kernels as bk

    if not dry and not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device (torch.cuda.is_available() is False); use --dry-run on CPU")
    tk = bk.kernels_for(dry)
    dev = torch.device("cpu" if dry else "cuda")
    result: Dict = {"env": environment(dev), "dry_run": dry}
    json_path, md_path = os.path.join(args.out, "gpu_check.json"), os.path.join(args.out, "gpu_check.md")

    def save():
        result["elapsed_s"] = round(time.time() - t_start, 1)
        if "kernels" in result:
            result["targets"] = targets_summary(result)
        atomic_write(json_path, json.dumps(result, indent=1, default=str))
        atomic_write(md_path, markdown(result))

    log(f"gpu_check: {result['env'].get('device')}; torch {torch.__version__}; budget {args.budget:.0f} s")

    # 1. tests and compile workers, side by side
    ncpu = os.cpu_count() or 2
    nw = args.workers or (0 if dry or not triton_table else max(1, min(6, ncpu - 10)))
    test_log, warm_log = os.path.join(args.out, "tests.log"), os.path.join(args.out, "warm.log")
    tests = None if args.skip_tests else start_tests(dry, 0 if dry else max(2, min(8, ncpu // 2)), test_log,
                                                     CUDA_GEMV_TESTS if args.cuda_only else None)
    workers = start_workers(nw, dry, sweep, args.full_sweep, warm_log) if nw else []
    pre = None
    if not args.skip_cuda:
        import cuda_bench as cb
    if not args.skip_cuda and dev.type == "cuda":  # compile the CUDA GEMV's sources meanwhile (threads)
        import threading

        pre_result: Dict = {}
        pre = threading.Thread(target=lambda: pre_result.update(
            cb.precompile(torch.cuda.get_device_capability(dev), log, dry, max(2, min(8, ncpu // 2)))), daemon=True)
        pre.start()
    for w in workers:
        try:
            w.wait(timeout=max(10.0, deadline - 170 - time.time()))
        except subprocess.TimeoutExpired:
            w.kill()
    log(f"compile workers done ({nw}) at {time.time() - t_start:.0f} s")
    if tests is not None:
        try:
            # at most TESTS_MAX_S: the CUDA GEMV steps come next and must keep their time
            tests.wait(timeout=max(10.0, min(deadline - 120, t_start + TESTS_MAX_S) - time.time()))
        except subprocess.TimeoutExpired:
            tests.kill()
            tests.wait()
        result["tests"] = test_summary(test_log, tests.returncode)
        result["tests"]["selection"] = CUDA_GEMV_TESTS if args.cuda_only else CUDA_TESTS
        log(f"tests: rc {tests.returncode}: {result['tests']['summary']} ({time.time() - t_start:.0f} s)")
    save()

    bench = bk.Bench(dev, args.reps or (1 if dry else 30))
    bw = bk.copy_bandwidth(bench)
    log(f"copy bandwidth: {bw} GB/s")

    # 1b. the CUDA GEMV: correctness matrix, then its kernel table
    if not args.skip_cuda:
        t0 = time.time()
        result["cuda"] = {"copy_GBps": bw}
        if pre is not None:
            pre.join(timeout=max(10.0, deadline - 300 - time.time()))
            result["cuda"]["precompile"] = dict(pre_result) or {"error": "not finished"}
        try:
            result["cuda"]["correctness"] = cb.correctness(dev, log, dry)
            log(f"cuda correctness: {result['cuda']['correctness']['failures']} failures of "
                f"{result['cuda']['correctness']['checked']} ({time.time() - t0:.0f} s)")
        except Exception as exc:
            result["cuda"]["correctness_error"] = f"{type(exc).__name__}: {str(exc)[:500]}"
            log(f"cuda correctness error: {result['cuda']['correctness_error']}")
        save()
        t0 = time.time()
        result["cuda"]["table"] = cb.kernel_table(bench, bk, tk, bw, log, deadline - 100, dry,
                                                  ms=(1, 16) if dry else cb.TABLE_MS, fmts=("nf4",) if dry else
                                                  ("nf4", "fp4", "nf3"))
        result["cuda"]["targets"] = cb.targets(result["cuda"]["table"], None)
        log(f"cuda table done ({time.time() - t0:.0f} s)")
        save()
        if dev.type == "cuda":
            torch.cuda.empty_cache()

    # 2. kernel table
    result["kernels"] = {"copy_GBps": bw, "rows": []}
    shapes = bk.DRY_SHAPES if dry else bk.SHAPES
    ms = bk.DRY_MS if dry else bk.MS
    subjects = {}
    for K, N in (shapes if triton_table else []):
        for fmt in ("nf4", "fp4", "nf3"):
            sub = bk.build_subject(bench, K, N, fmt, True)
            for M in (ms if fmt == "nf4" else other_ms(dry)):
                t0 = time.time()
                row = bk.bench_row(bench, tk, sub, M, bw, True)
                result["kernels"]["rows"].append(row)
                log(f"  {fmt} {K}x{N} M={M}: afpq {row.get('afpq_us')} fp16 {row.get('fp16_us')} "
                    f"int4 {row.get('int4_us')} err {row['rel_err']:.1e} {row['targets']} "
                    f"{row['errors'] or ''} ({time.time() - t0:.1f} s)")
            subjects[(K, N, fmt)] = sub if sweep else None
            if not sweep:
                del sub
        save()
        if dev.type == "cuda" and not sweep:
            torch.cuda.empty_cache()

    # 3. end-to-end decode
    import bench_decode as bd

    shape = bd.Shape(hidden=128, heads=2, inter=256, layers=1, prompt=2, new=1) if dry else bd.Shape()
    t0 = time.time()
    keep = {k: v for k, v in subjects.items()}
    subjects.clear()
    if dev.type == "cuda":  # room for the three models
        for v in keep.values():
            if v is not None:
                v.copies[1:] = []
                v.w16, v.int4 = None, None
        torch.cuda.empty_cache()
    result["decode"] = bd.decode_suite(dev, shape, log, afpq_backend="triton" if dry else "auto")
    log(f"decode done ({time.time() - t0:.0f} s): {result['decode']['checks']}")
    save()
    if "cuda" in result:
        if dev.type == "cuda":
            t0 = time.time()
            try:
                result["cuda"]["decode"] = cb.decode(dev, bd, shape, log, result["decode"]["variants"])
            except Exception as exc:
                result["cuda"]["decode"] = {"variants": {}, "checks": {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}}
            log(f"cuda decode done ({time.time() - t0:.0f} s): {result['cuda']['decode']['checks']}")
        else:
            result["cuda"]["decode_skipped"] = "dry run: no CUDA device"
        result["cuda"]["targets"] = cb.targets(result["cuda"].get("table", []), result["cuda"].get("decode"))
        save()

    # 4. sweeps
    if sweep:
        result["sweeps"] = []
        for (fmt, M) in sweep_rows(dry):
            for K, N in shapes:
                sub = keep.get((K, N, fmt)) or bk.build_subject(bench, K, N, fmt, False)
                if dev.type == "cuda" and len(sub.copies) == 1:
                    import copy as _copy
                    sub.copies += [_copy.deepcopy(sub.layer) for _ in range(bench.copies(bk.afpq_bytes(sub.layer, 0)) - 1)]
                default = next((r.get("afpq_us") for r in result["kernels"]["rows"]
                                if (r["fmt"], r["in"], r["out"], r["M"]) == (fmt, K, N, M)), None)
                cfgs = bk.sweep_configs(M, fmt, not dry, args.full_sweep)
                res = bk.sweep_row(bench, tk, sub, M, cfgs, 1 if dry else 10, deadline - 25)
                ok = [c for c in res if c.get("us")]
                if ok and M <= 16 and args.full_sweep and time.time() < deadline - 40:  # split-K variants of the best
                    best = min(ok, key=lambda c: c["us"])["cfg"]
                    res += bk.sweep_row(bench, tk, sub, M, bk.split_configs(best), 2 if dry else 10, deadline - 25)
                result["sweeps"].append({"fmt": fmt, "in": K, "out": N, "M": M, "default_us": default, "results": res})
                log(f"  sweep {fmt} {K}x{N} M={M}: {len(ok)} timed; "
                    f"best {min((c['us'] for c in ok), default=None)} vs default {default}")
                sub.copies[1:] = []
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
            save()
    save()
    log(f"done in {time.time() - t_start:.0f} s; wrote {json_path}, {md_path}")
    print("\n" + markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
