"""Core speed benchmarks: ratios measured side by side in one run.

    python benchmarks/bench_core.py [--quick] [--json benchmarks/out/core.json] [--skip-model]

1. Encode + fake-quant of a 4096x4096 weight, group 128, AFPQ two scales
   (``fake_quantize``, which encodes every weight to its nearest grid code and decodes
   it), against the AFPQ reference approach (nearest grid value by argmin over an
   [N, table] distance matrix, once for the positive and once for the negative side).
   Target >= 20x. ``quantize_weight`` (codes + scales, no decode) is reported beside it.
2. Packing a 4096x4096 4-bit weight (codes given) against a per-column Python loop
   like the reference's (llm-awq / AutoAWQ ``from_linear``: OR one code column at a
   time into each packed column).  Target >= 100x.
3. RTN quantize + save of the whole embedded SmolLM2-135M (time, peak RSS), in a
   subprocess.  Target < 30 s.
4. AFPQLinear CPU forward at batch 1 and 64, 4096x4096, group 128, next to fp32
   nn.Linear and next to the reference's forward (unpack + gather + where per call).

Timings are medians of several repeats; only ratios between numbers taken in the same
run are meaningful on a shared machine.
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

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from afpq_plugins.core.formats import get_format  # noqa: E402
from afpq_plugins.core.packing import AWQ_ORDER, pack_awq, pack_gptq  # noqa: E402
from afpq_plugins.core.quantize import fake_quantize, quantize_weight  # noqa: E402
from afpq_plugins.nn import AFPQLinear  # noqa: E402


def median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# -- baselines: the AFPQ reference approach, re-implemented here --------------------------
def reference_fake_quant(w: torch.Tensor, fmt_name: str, group_size: int):
    """Argmin over a distance matrix, per side, as the AFPQ reference code does."""
    f = get_format(fmt_name)
    table = torch.tensor(f.values, dtype=torch.float32)
    wg = w.reshape(-1, group_size)
    s_pos = wg.amax(1, keepdim=True).clamp(min=0) / f.top_pos
    s_neg = wg.amin(1, keepdim=True).clamp(max=0).abs() / f.top_neg
    pos = torch.where(wg >= 0, wg, torch.zeros_like(wg)) / s_pos
    neg = torch.where(wg < 0, wg, torch.zeros_like(wg)) / s_neg  # NaN if s_neg == 0 (the reference's bug)
    idx_p = (pos.reshape(-1, 1) - table).abs().argmin(-1)
    idx_n = (neg.reshape(-1, 1) - table).abs().argmin(-1)
    q_p = table[idx_p].reshape(wg.shape)
    q_n = table[idx_n].reshape(wg.shape)
    codes = torch.where(wg >= 0, idx_p.reshape(wg.shape), idx_n.reshape(wg.shape))
    return codes.reshape(w.shape), (q_p * s_pos + q_n * s_neg).reshape(w.shape)


def reference_pack_awq(codes: torch.Tensor) -> torch.Tensor:
    """Per-column Python loop (llm-awq / AutoAWQ ``from_linear`` style)."""
    intweight = codes.t().to(torch.int32)  # [in, out]
    qweight = torch.zeros(intweight.shape[0], intweight.shape[1] // 8, dtype=torch.int32)
    for col in range(intweight.shape[1] // 8):
        for i in range(8):
            qweight[:, col] |= intweight[:, col * 8 + AWQ_ORDER[i]] << (i * 4)
    return qweight


def reference_forward(x, qweight, scales, scales_neg, table, group_size):
    """Reference-style forward: unpack, gather, expand scales, where, matmul, every call."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32)
    codes = ((qweight.unsqueeze(-1) >> shifts) & 0xF).reshape(qweight.shape[0], -1)  # awq words, [in, out]
    inverse = torch.tensor([AWQ_ORDER.index(j) for j in range(8)])
    codes = codes.view(codes.shape[0], -1, 8)[..., inverse].reshape(codes.shape[0], -1)
    v = table[codes.long()]
    sp = scales.float().repeat_interleave(group_size, 0)
    sn = scales_neg.float().repeat_interleave(group_size, 0)
    w_t = torch.where(v >= 0, v * sp, v * sn)
    return x @ w_t


# -- benchmarks ------------------------------------------------------------------------------
def bench_encode(n: int, group_size: int, repeats: int) -> list:
    torch.manual_seed(0)
    w = torch.randn(n, n)
    rows = []
    for fmt in ("fp4", "nf4", "nf3"):
        base = median_time(lambda: reference_fake_quant(w, fmt, group_size), max(1, repeats // 2))
        # fake_quantize encodes (nearest grid code per weight) and decodes in one pass over
        # cache-sized chunks: the same work as the reference, which returns codes and w_hat.
        ours = median_time(lambda: fake_quantize(w, fmt, group_size), repeats)
        codes_only = median_time(lambda: quantize_weight(w, fmt, group_size), repeats)
        rows.append({"bench": "encode+fake-quant", "format": fmt, "shape": [n, n], "group_size": group_size,
                     "reference_s": base, "ours_s": ours, "quantize_weight_s": codes_only,
                     "speedup": base / ours, "target": 20.0})
    return rows


def bench_pack(n: int, repeats: int) -> list:
    torch.manual_seed(0)
    codes = torch.randint(0, 16, (n, n), dtype=torch.uint8)
    base = median_time(lambda: reference_pack_awq(codes), max(1, repeats // 3))
    rows = []
    for layout, fn in (("awq", lambda: pack_awq(codes)), ("gptq", lambda: pack_gptq(codes, 4))):
        ours = median_time(fn, repeats)
        rows.append({"bench": "pack 4-bit", "layout": layout, "shape": [n, n], "reference_s": base,
                     "ours_s": ours, "speedup": base / ours, "target": 100.0})
    return rows


def bench_forward(n: int, group_size: int, repeats: int) -> list:
    torch.manual_seed(0)
    lin = torch.nn.Linear(n, n, bias=False)
    layer = AFPQLinear.from_linear(lin, "nf4", group_size, layout="awq")
    table = get_format("nf4").lut("afpq")
    rows = []
    with torch.inference_mode():
        for m in (1, 64):
            x = torch.randn(m, n)
            ref = reference_forward(x, layer.qweight, layer.scales, layer.scales_neg, table, group_size)
            assert torch.allclose(layer(x), ref, rtol=1e-4, atol=1e-3), "forward and reference disagree"
            t_fp32 = median_time(lambda: lin(x), repeats)
            t_ours = median_time(lambda: layer(x), repeats)
            t_ref = median_time(lambda: reference_forward(x, layer.qweight, layer.scales, layer.scales_neg, table,
                                                          group_size), repeats)
            rows.append({"bench": "AFPQLinear forward (CPU)", "batch": m, "shape": [n, n], "fp32_s": t_fp32,
                         "ours_s": t_ours, "reference_s": t_ref, "ours_over_fp32": t_ours / t_fp32,
                         "speedup_vs_reference": t_ref / t_ours})
    return rows


_MODEL_SCRIPT = r"""
import json, resource, sys, time, torch
from afpq_plugins.data import default_model_path, load_model_and_tokenizer
from afpq_plugins.model import quantize_model_rtn, save_quantized
path = default_model_path()
t0 = time.perf_counter()
model, tok = load_model_and_tokenizer(path)
t1 = time.perf_counter()
qc = quantize_model_rtn(model, sys.argv[2], int(sys.argv[3]), progress=False)
t2 = time.perf_counter()
save_quantized(model, sys.argv[1], qc, tokenizer=tok, overwrite=True)
t3 = time.perf_counter()
print(json.dumps({"load_s": t1 - t0, "quantize_s": t2 - t1, "save_s": t3 - t2, "quantize_save_s": t3 - t1,
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "layers": len(qc.quantized_modules)}))
"""


def bench_model(fmt: str, group_size: int) -> list:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
        out = subprocess.run([sys.executable, "-c", _MODEL_SCRIPT, os.path.join(tmp, "ck"), fmt, str(group_size)],
                             check=True, capture_output=True, text=True, env=env)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    res.update(bench="RTN quantize+save SmolLM2-135M", format=fmt, group_size=group_size, target_s=30.0)
    return [res]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer repeats")
    ap.add_argument("--skip-model", action="store_true", help="skip the SmolLM2 quantize+save run")
    ap.add_argument("--json", default=os.path.join("benchmarks", "out", "core.json"))
    args = ap.parse_args(argv)
    repeats = 3 if args.quick else 7
    torch.set_num_threads(torch.get_num_threads())
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs")
    rows = []
    for fn in (lambda: bench_encode(4096, 128, repeats), lambda: bench_pack(4096, repeats),
               lambda: bench_forward(4096, 128, repeats)):
        for r in fn():
            rows.append(r)
            print(json.dumps(r))
    if not args.skip_model:
        for r in bench_model("nf4", 64):
            rows.append(r)
            print(json.dumps(r))
    print()
    print("| benchmark | case | ours | reference / fp32 | ratio | target |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        if r["bench"].startswith("encode"):
            print(f"| {r['bench']} 4096x4096 g128 | {r['format']} AFPQ | {r['ours_s']*1e3:.0f} ms | "
                  f"{r['reference_s']*1e3:.0f} ms | {r['speedup']:.1f}x faster | >= 20x |")
        elif r["bench"].startswith("pack"):
            print(f"| {r['bench']} 4096x4096 | {r['layout']} layout | {r['ours_s']*1e3:.1f} ms | "
                  f"{r['reference_s']*1e3:.0f} ms | {r['speedup']:.0f}x faster | >= 100x |")
        elif r["bench"].startswith("AFPQLinear"):
            print(f"| {r['bench']} 4096x4096 g128 nf4 | batch {r['batch']} | {r['ours_s']*1e3:.1f} ms | "
                  f"fp32 {r['fp32_s']*1e3:.1f} ms, reference {r['reference_s']*1e3:.1f} ms | "
                  f"{r['ours_over_fp32']:.1f}x fp32 time; {r['speedup_vs_reference']:.1f}x faster than reference | "
                  "faster than reference |")
        else:
            print(f"| {r['bench']} | {r['format']} g{r['group_size']}, {r['layers']} layers | "
                  f"{r['quantize_save_s']:.1f} s (load {r['load_s']:.1f} s) | peak RSS {r['peak_rss_mib']:.0f} MiB | - | < 30 s |")
    os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
    with open(args.json, "w", encoding="utf-8") as fh:
        json.dump(rows, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
