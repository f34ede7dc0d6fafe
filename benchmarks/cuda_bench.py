"""The CUDA GEMV's part of ``benchmarks/gpu_check.py``: correctness matrix, kernel table, decode.

Called by the GPU check with its timing helpers (``benchmarks/bench_kernels.py`` as ``bk``,
``benchmarks/bench_decode.py`` as ``bd``). In a dry run (CPU) the kernel is replaced by its
bit-exact model (:func:`.prmt_model.emulate`) on a small subset, timings are skipped, and the
code paths still run.
"""

from __future__ import annotations

import time
from typing import Callable, Dict, List, Optional

import numpy as np
import torch

from afpq_plugins.kernels.cuda import planning
from afpq_plugins.kernels.cuda import prmt_model as pm

#: (layout, fmt, mode, group_size, act_order): every layout, bits, mode, act-order, padding, one group
CASES = [
    ("gptq", "nf4", "afpq", 128, False),
    ("gptq", "nf4", "afpq", 128, True),
    ("gptq", "fp4", "afpq", -1, False),
    ("gptq", "fp4", "sym", 64, False),
    ("gptq", "int4", "zp", 128, False),
    ("gptq", "int4", "zp", 128, True),
    ("gptq", "nf4", "afpq", 40, False),
    ("awq", "nf4", "afpq", 128, False),
    ("awq", "int4", "zp", 64, False),
    ("gptq", "nf3", "afpq", 128, False),
    ("gptq", "nf3", "afpq", 128, True),
    ("gptq", "fp3", "sym", 64, False),
    ("gptq", "int3", "zp", 128, False),
]
SHAPE = (1280, 200)  # in, out: every group size above divides 1280; 200 columns leave a partial warp
DRY_SHAPE = (256, 40)
TABLE_SHAPES = ((4096, 4096), (4096, 11008), (11008, 4096), (8192, 28672))
TABLE_MS = (1, 2, 4, 8, 16)
BW_TARGET = 0.6


def _layer(case, K, N, device, seed=0):
    from afpq_plugins.core.formats import get_format
    from afpq_plugins.core.quantize import QuantizedWeight, default_g_idx
    from afpq_plugins.nn import AFPQLinear

    layout, fmt, mode, gs, act = case
    g = np.random.default_rng(seed)
    f = get_format(fmt)
    codes = torch.from_numpy(g.integers(0, 2**f.bits, (N, K))).to(torch.uint8)
    g_idx = default_g_idx(K, gs)
    if act:
        g_idx = g_idx[torch.from_numpy(g.permutation(K))]
    groups = 1 if gs == -1 else K // gs
    scales = torch.from_numpy(g.uniform(0.002, 0.02, (groups, N))).half()
    if mode == "afpq":
        s2 = torch.from_numpy(g.uniform(0.002, 0.02, (groups, N))).half()
    elif mode == "zp":
        s2 = torch.from_numpy(g.integers(0, 2**f.bits, (groups, N)).astype(np.float64)).half()
    else:
        s2 = None
    qw = QuantizedWeight(codes, scales, s2, g_idx, f, mode, gs)
    bias = torch.from_numpy(g.normal(0, 0.1, N)).float()
    return AFPQLinear.from_quantized(qw, bias=bias, layout=layout).to(device)


def _bound(ref, absprod, dtype, K, chain):
    u = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-11
    return 1.01 * ((chain // 2) * u * absprod + K * 2.0**-24 * absprod + u * ref.abs()) + 1e-30


def sources(dry: bool) -> List[str]:
    """Every kernel source the correctness matrix, the table and the decode harness will compile
    (rendered from CPU copies of their layers)."""
    from afpq_plugins.kernels import cuda as ck

    K, N = DRY_SHAPE if dry else SHAPE
    layers = [_layer(c, K, N, "cpu") for c in CASES]
    layers += [_layer(("gptq", f, "afpq", 128, False), 256, 32, "cpu") for f in ("nf4", "fp4", "nf3")]
    out = set()
    for layer in layers:
        prep = ck.prepare(layer)
        for bf16 in (False, True):
            for m in range(1, ck.MAX_M + 1):
                out.add(ck.kernel_source(prep, bf16, m))
    return sorted(out)


def precompile(capability, log: Callable[[str], None], dry: bool, workers: int = 8) -> Dict:
    """Compile :func:`sources` for ``capability`` in parallel threads (NVRTC releases the GIL), into
    the memory and disk caches, so that the timed steps never wait on the compiler."""
    from concurrent.futures import ThreadPoolExecutor

    from afpq_plugins.kernels.cuda import nvrtc

    t0 = time.time()
    srcs = sources(dry)
    errors = []

    def one(src):
        try:
            nvrtc.compile_for_device(src, capability)
        except Exception as exc:  # reported, and raised again at the first call
            errors.append(f"{type(exc).__name__}: {str(exc)[:300]}")

    with ThreadPoolExecutor(max_workers=workers) as ex:
        list(ex.map(one, srcs))
    res = {"sources": len(srcs), "seconds": round(time.time() - t0, 1), "errors": errors[:5]}
    log(f"cuda precompile: {res}")
    return res


def correctness(device: torch.device, log: Callable[[str], None], dry: bool) -> Dict:
    """Every case x fp16/bf16 x M = 1..8: outputs NaN-poisoned before the call; within the stated
    bound of float64; equal to the bit-exact model (M = 1, 3, 8); CUDA-graph replay == eager
    bit for bit (M = 1, 8). Returns {"rows": [...], "failures": n}."""
    from afpq_plugins.kernels import cuda as ck
    from afpq_plugins.kernels import torch_ref

    K, N = DRY_SHAPE if dry else SHAPE
    cases = CASES[:1] + CASES[9:10] if dry else CASES
    ms = (1, 3) if dry else tuple(range(1, 9))
    rows, fails = [], 0
    for case in cases:
        layer = _layer(case, K, N, device)
        cpu_layer = _layer(case, K, N, "cpu")
        prep = ck.prepare(layer)
        for dt in (torch.float16, torch.bfloat16):
            bf = dt == torch.bfloat16
            w = torch_ref.dequantize_t(cpu_layer, dt).double()
            for M in ms:
                t0 = time.time()
                x = torch.randn(M, K, generator=torch.Generator().manual_seed(M)).to(dt)
                ks = ck.launch_config(prep, M, ck._sms(device.index or 0) if device.type == "cuda" else 132)[3]
                row = {"case": "-".join(map(str, case)), "dtype": "bf16" if bf else "fp16", "M": M, "ks": ks}
                try:
                    if device.type == "cuda":
                        xd = x.to(device)
                        out = torch.full((M, N), float("nan"), dtype=dt, device=device)
                        ck.linear(xd, layer, prep, out=out)
                        torch.cuda.synchronize()
                        y = out.cpu()
                        row["nan_outputs"] = int(torch.isnan(y).sum())
                        if M in (1, 8):
                            g = torch.cuda.CUDAGraph()
                            gout = torch.full_like(out, float("nan"))
                            with torch.cuda.graph(g):
                                ck.linear(xd, layer, prep, out=gout)
                            gout.fill_(float("nan"))
                            g.replay()
                            torch.cuda.synchronize()
                            row["graph_equals_eager"] = bool(torch.equal(gout.cpu().view(torch.int16),
                                                                         y.view(torch.int16)))
                            del g
                    else:
                        bits = pm.emulate(prep, x, ks, bf)
                        y = torch.from_numpy(bits.view(np.int16)).view(dt)
                        row["nan_outputs"] = int(torch.isnan(y).sum())
                    if M in (1, 3, 8):
                        model = pm.emulate(prep, x, ks, bf)
                        got = y.view(torch.int16).numpy().view(np.uint16)
                        row["model_mismatches"] = int((got != model).sum())
                    ref = x.double() @ w + cpu_layer.bias.double()
                    absprod = x.double().abs() @ w.abs()
                    chain = planning.chain_codes(layer.bits, bf, prep.plan.ch(M, bf))
                    err = (y.double() - ref).abs()
                    row["within_bound"] = bool((err <= _bound(ref, absprod, dt, K, chain)).all())
                    row["rel_err"] = ((y.double() - ref).norm() / ref.norm()).item()
                except Exception as exc:
                    row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
                ok = ("error" not in row and row.get("nan_outputs") == 0 and row.get("within_bound")
                      and row.get("model_mismatches", 0) == 0 and row.get("graph_equals_eager", True))
                row["ok"] = bool(ok)
                fails += not ok
                rows.append(row)
                if not ok:
                    log(f"  cuda correctness FAIL {row}")
            log(f"  cuda correctness {'-'.join(map(str, case))} {'bf16' if bf else 'fp16'}: "
                f"{sum(r['ok'] for r in rows[-len(ms):])}/{len(ms)} ok ({time.time() - t0:.1f} s last)")
    return {"shape": [K, N], "rows": rows, "failures": fails, "checked": len(rows), "kinds": len(cases),
            "by": "kernel" if device.type == "cuda" else "numpy model (dry run: no CUDA device)"}


def kernel_table(bench, bk, tk, copy_bw: Optional[float], log: Callable[[str], None], deadline: float,
                 dry: bool, ms=TABLE_MS, fmts=("nf4", "fp4", "nf3")) -> List[Dict]:
    """M in TABLE_MS x TABLE_SHAPES (group 128): the CUDA GEMV (M <= 8), the current Triton path,
    fp16 cuBLAS, tinygemm INT4, in us per call (CUDA-graph replays over weight copies > L2), with
    ratios and bandwidth against the copy measured in the same run; fp4 and nf3 at M = 1."""
    from afpq_plugins.kernels import cuda as ck

    shapes = bk.DRY_SHAPES if dry else TABLE_SHAPES
    rows = []
    for K, N in shapes:
        for fmt in fmts:
            if time.time() > deadline:
                rows.append({"in": K, "out": N, "fmt": fmt, "skipped": "time budget"})
                continue
            sub = bk.build_subject(bench, K, N, fmt, True)
            layer = sub.layer
            w64 = layer.dequantize(torch.float32).double().t()
            for M in (ms if fmt == "nf4" else (1,)):
                torch.manual_seed(M)
                x16 = torch.randn(M, K, device=bench.device, dtype=torch.float16)
                xbf = x16.to(torch.bfloat16)
                row = {"in": K, "out": N, "fmt": fmt, "M": M, "errors": {}}
                ref = x16.double() @ w64
                if M <= ck.MAX_M and bench.cuda:
                    try:
                        row["cuda_rel_err"] = bk.rel_err(ck.linear(x16, layer), ref)
                        row["cuda_rel_err_bf16"] = bk.rel_err(ck.linear(xbf, layer), ref)
                    except Exception as exc:
                        row["errors"]["cuda"] = f"{type(exc).__name__}: {str(exc)[:300]}"
                    if "cuda" not in row["errors"]:
                        row["cuda_us"], e = bk._time(bench, [lambda L=L: ck.linear(x16, L) for L in sub.copies])
                        row["cuda_bf16_us"], e2 = bk._time(bench, [lambda L=L: ck.linear(xbf, L) for L in sub.copies])
                        if e or e2:
                            row["errors"]["cuda"] = e or e2
                elif M > ck.MAX_M:
                    row["cuda_us"] = None
                    row["errors"]["cuda"] = "M > 8: not covered (dequantize + cuBLAS path)"
                row["triton_us"], e = bk._time(bench, [lambda L=L: tk.linear(x16, L) for L in sub.copies])
                if e:
                    row["errors"]["triton"] = e
                if sub.w16 is not None:
                    row["fp16_us"], e = bk._time(bench, [lambda w=w: torch.nn.functional.linear(x16, w) for w in sub.w16])
                    if e:
                        row["errors"]["fp16"] = e
                if sub.int4 is not None:
                    row["int4_us"], e = bk._time(bench, [lambda p=p: p[2](xbf, p[0], bk.GROUP, p[1]) for p in sub.int4])
                    if e:
                        row["errors"]["int4"] = e
                else:
                    row["errors"]["int4"] = sub.int4_error

                def ratio(a, b):
                    a, b = row.get(a), row.get(b)
                    return a / b if a and b else None

                row["fp16_over_cuda"] = ratio("fp16_us", "cuda_us")
                row["int4_over_cuda"] = ratio("int4_us", "cuda_bf16_us")
                row["triton_over_cuda"] = ratio("triton_us", "cuda_us")
                nbytes = bk.afpq_bytes(layer, M)
                row["bytes"] = nbytes
                if row.get("cuda_us"):
                    row["cuda_GBps"] = nbytes / (row["cuda_us"] * 1e-6) / 1e9
                    row["bw_fraction"] = row["cuda_GBps"] / copy_bw if copy_bw else None
                rows.append(row)
                log(f"  cuda table {fmt} {K}x{N} M={M}: cuda {row.get('cuda_us')} triton {row.get('triton_us')} "
                    f"fp16 {row.get('fp16_us')} int4 {row.get('int4_us')} {row['errors'] or ''}")
            del sub
            if bench.cuda:
                torch.cuda.empty_cache()
    return rows


def targets(rows: List[Dict], decode: Optional[Dict]) -> List[Dict]:
    """The issue's targets, each with its value and PASS / MISS."""
    out = []
    done = [r for r in rows if "M" in r]
    shapes = sorted({(r["in"], r["out"]) for r in done}, key=lambda s: -s[0] * s[1])
    big = set(shapes[:2])

    def add(what, value, need):
        out.append({"target": what, "value": value, "pass": value is not None and value >= need})

    for r in done:
        tag = f"{r['fmt']} M={r['M']} {r['in']}x{r['out']}"
        if r["M"] == 1 and r["fmt"] in ("nf4", "fp4"):
            add(f"{tag}: INT4/CUDA >= 1.0", r.get("int4_over_cuda"), 1.0)
            add(f"{tag}: fp16/CUDA >= 3.0", r.get("fp16_over_cuda"), 3.0)
            if (r["in"], r["out"]) in big:
                add(f"{tag}: bandwidth >= {BW_TARGET:.0%} of copy", r.get("bw_fraction"), BW_TARGET)
        if r["M"] in (4, 8) and r["fmt"] == "nf4":
            add(f"{tag}: INT4/CUDA >= 1.0", r.get("int4_over_cuda"), 1.0)
        if r["M"] == 1 and r["fmt"] == "nf3":
            nf4 = next((q for q in done if q["fmt"] == "nf4" and q["M"] == 1 and (q["in"], q["out"]) == (r["in"], r["out"])), None)
            v = nf4["cuda_us"] / r["cuda_us"] if nf4 and nf4.get("cuda_us") and r.get("cuda_us") else None
            add(f"{tag}: nf4 time / nf3 time > 1.0 (nf3 faster)", v, 1.0 + 1e-9)
    if decode:
        chk = decode.get("checks", {})
        add("decode, CUDA graphs: CUDA / INT4 tok/s >= 1.0", chk.get("graph_cuda_over_int4"), 1.0)
        add("decode, CUDA graphs: CUDA / fp16 tok/s >= 1.5", chk.get("graph_cuda_over_fp16"), 1.5)
    return out


def decode(device: torch.device, bd, shape, log: Callable[[str], None], others: Optional[Dict]) -> Dict:
    """The 8-layer decode harness with the CUDA GEMV registered ("auto": the GEMV for decode steps,
    Triton for the prefill), eager and CUDA graphs, the per-step graph-vs-eager difference, and the
    ratios to the fp16 / INT4 runs of the same GPU check (``others``: its decode variants)."""
    from afpq_plugins.kernels import cuda as ck
    from afpq_plugins.kernels import explain

    res: Dict = {"variants": {}, "checks": {}}
    ck.register()
    try:
        torch.manual_seed(1)
        prompt = torch.randn(1, shape.prompt, shape.hidden, device=device)
        model = bd.quantize_afpq(bd.Model(shape, device))
        lin = model.blocks[0].q
        res["checks"]["kernel_at_M1"] = explain(torch.zeros(1, lin.in_features, device=device, dtype=model.dtype), lin)
        entry = {"weight_GB": bd.weight_bytes(model) / 1e9}
        outs = {}
        for m in ("eager", "graph"):
            t0 = time.time()
            try:
                r = bd.run_decode(model, prompt, m == "graph")
                outs[m] = r.pop("outs")
                entry[m] = r
            except Exception as exc:
                entry[m] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
            log(f"  decode afpq_nf4_cuda {m}: {entry[m]} ({time.time() - t0:.0f} s)")
        if "eager" in outs and "graph" in outs:
            errs = [bd.rel(a, b) for a, b in zip(outs["graph"], outs["eager"])]
            entry["graph_vs_eager_rel_err"] = max(errs)
            entry["graph_vs_eager_bitwise_equal_steps"] = sum(bool(torch.equal(a, b)) for a, b in
                                                              zip(outs["graph"], outs["eager"]))
            entry["graph_vs_eager_rel_err_by_step"] = {i: errs[i] for i in (0, 1, 3, 7, 15, 31, 63, 127) if i < len(errs)}
        res["variants"]["afpq_nf4_cuda"] = entry
        # same model through the torch reference: first decode outputs agree
        try:
            bd.set_backend(model, "torch")
            with torch.no_grad():
                x = model.prefill(prompt.to(model.dtype))
                ref = [x := model.step(x) for _ in range(min(4, shape.new))]
            res["checks"]["cuda_vs_torch_ref_rel_err"] = max(bd.rel(a, b) for a, b in zip(outs["eager"], ref))
        except Exception as exc:
            res["checks"]["cuda_vs_torch_ref_rel_err"] = f"{type(exc).__name__}: {exc}"
        del model
    finally:
        ck.unregister()
    for m in ("eager", "graph"):
        a = entry.get(m, {}).get("tokens_per_s")
        for other in ("fp16", "int4", "afpq_nf4"):
            b = ((others or {}).get(other) or {}).get(m, {}).get("tokens_per_s")
            res["checks"][f"{m}_cuda_over_{other}"] = a / b if a and b else None
    return res


def _f(v, fmt="{:.1f}"):
    return "-" if v is None else fmt.format(v)


def markdown(sec: Dict) -> str:
    lines = ["## CUDA GEMV (register-table, NVRTC)", ""]
    c = sec.get("correctness")
    if c:
        lines += [f"Correctness ({c.get('by', 'kernel')}): {c['checked'] - c['failures']}/{c['checked']} cases ok "
                  f"({c.get('kinds', len(CASES))} layer kinds x "
                  f"fp16/bf16 x M, {c['shape'][0]}x{c['shape'][1]}: NaN-poisoned outputs all written, within the "
                  "stated bound of float64, bit-exact to the numpy model at M = 1, 3, 8, graph replay == eager at M = 1, 8)", ""]
        bad = [r for r in c["rows"] if not r["ok"]]
        for r in bad[:20]:
            lines.append(f"- FAIL {r}")
        if bad:
            lines.append("")
    rows = sec.get("table")
    if rows:
        bw = sec.get("copy_GBps")
        lines += [f"Kernel table (group 128, gptq, afpq; us per call, CUDA-graph replays over weight copies > L2; "
                  f"copy {_f(bw, '{:.0f}')} GB/s)", "",
                  "| fmt | in x out | M | CUDA fp16 us | CUDA bf16 us | Triton us | fp16 us | INT4 us | fp16/CUDA "
                  "| INT4/CUDA(bf16) | Triton/CUDA | CUDA GB/s | of copy | rel err |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            if "M" not in r:
                lines.append(f"| {r['fmt']} | {r['in']}x{r['out']} | - | skipped: {r.get('skipped')} |||||||||||")
                continue
            bwf = r.get("bw_fraction")
            lines.append(
                f"| {r['fmt']} | {r['in']}x{r['out']} | {r['M']} | {_f(r.get('cuda_us'))} | {_f(r.get('cuda_bf16_us'))} "
                f"| {_f(r.get('triton_us'))} | {_f(r.get('fp16_us'))} | {_f(r.get('int4_us'))} "
                f"| {_f(r.get('fp16_over_cuda'), '{:.2f}x')} | {_f(r.get('int4_over_cuda'), '{:.2f}x')} "
                f"| {_f(r.get('triton_over_cuda'), '{:.2f}x')} | {_f(r.get('cuda_GBps'), '{:.0f}')} "
                f"| {'-' if bwf is None else f'{100 * bwf:.0f}%'} | {_f(r.get('cuda_rel_err'), '{:.1e}')} |")
        lines.append("")
    d = sec.get("decode")
    if d:
        v = d["variants"].get("afpq_nf4_cuda", {})
        e, g = v.get("eager", {}), v.get("graph", {})
        lines += ["Decode harness with the CUDA GEMV (auto: GEMV for decode steps, Triton for the prefill): "
                  f"eager {_f(e.get('tokens_per_s'))} tok/s, CUDA graphs {_f(g.get('tokens_per_s'))} tok/s"
                  f"{' ' + g['error'][:100] if 'error' in g else ''}; graph vs eager max rel err "
                  f"{_f(v.get('graph_vs_eager_rel_err'), '{:.1e}')}, bit-equal steps "
                  f"{v.get('graph_vs_eager_bitwise_equal_steps', '-')}", "",
                  "Checks: " + ", ".join(f"{a} = {b:.3g}" if isinstance(b, float) else f"{a} = {b}"
                                         for a, b in d["checks"].items()), ""]
    ts = sec.get("targets")
    if ts:
        lines += ["| CUDA GEMV target | value | |", "|---|---|---|"]
        for x in ts:
            val = x["value"]
            lines.append(f"| {x['target']} | {'-' if val is None else f'{val:.2f}'} | {'PASS' if x['pass'] else 'MISS'} |")
        lines.append("")
    return "\n".join(lines)
