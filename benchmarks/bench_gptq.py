"""GPTQ vs RTN with INT, NF (one scale), NF AFPQ and FP AFPQ grids on the embedded SmolLM2.

    PYTHONPATH=. python benchmarks/bench_gptq.py [--nsamples 32 --calib-seqlen 512]
        [--seqlen 512 --windows 16] [--bits 3 4] [--group-size 64 -1] [--json benchmarks/out/gptq.json]

* Model: SmolLM2-135M-Instruct from ``afpq_plugins.data.default_model_path()`` (its
  weights are the float32 dequantization of a Q4_1 GGUF; hidden size 576, so groups
  of 64 and -1).
* Calibration: ``calibration_samples`` (random windows of the five Austen calibration
  novels, seed 0). Evaluation: perplexity on Pride and Prejudice, the first
  ``--windows`` non-overlapping windows of ``--seqlen`` tokens.
* GPTQ INT is stock AutoGPTQ 0.7.1 (``BaseQuantizeConfig(sym=False)``, its own
  Quantizer and QuantLinear, the same CPU shims); the FP/NF rows are the AFPQ adapter.
  Both use damp 0.01, act-order off (the paper's setting), true-sequential as given.
* RTN is ``afpq_plugins.model.quantize_model_rtn``.
* Quantization wall time of each GPTQ cell is the whole ``quantize()`` call (capture,
  GPTQ, packing); the AFPQ/INT ratio compares cells of the same bits and group size
  measured in the same run.

The JSON file holds every finished cell; a rerun with the same settings skips them
(resumable). Blocks run in the order 3-bit g64, 4-bit g64, 3-bit g-1, 4-bit g-1; within a
block INT and NF AFPQ first, RTN before GPTQ.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time

import torch

ROWS = (  # (label, family, mode)
    ("INT (scale + zero)", "int", "zp"),
    ("NF sym (one scale)", "nf", "sym"),
    ("NF AFPQ (two scales)", "nf", "afpq"),
    ("FP AFPQ (two scales)", "fp", "afpq"),
)


def cell_key(method, fmt, mode, g):
    return f"{method}/{fmt}/{mode}/g{g}"


def load_results(path, settings):
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
        if data.get("settings") == settings:
            return data
        print(f"note: {path} holds results for other settings; starting afresh", file=sys.stderr)
    return {"settings": settings, "cells": {}}


def save_results(path, data):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=2, sort_keys=True)
    os.replace(tmp, path)


def gptq_int(model, bits, g, examples, true_sequential=True):
    """Stock AutoGPTQ INT GPTQ on CPU (its own quantizer and QuantLinear)."""
    from auto_gptq.modeling._base import BaseQuantizeConfig
    from auto_gptq.modeling._utils import get_module_by_name_prefix
    from auto_gptq.modeling.auto import GPTQ_CAUSAL_LM_MODEL_MAP

    from afpq_plugins.autogptq import compat

    cfg = BaseQuantizeConfig(bits=bits, group_size=g, desc_act=False, sym=False, true_sequential=true_sequential)
    wrapper = GPTQ_CAUSAL_LM_MODEL_MAP[model.config.model_type](model, False, cfg)
    layers = get_module_by_name_prefix(model, wrapper.layers_block_name)
    with compat.cpu_quantize(), compat.keyword_layer_calls(layers):
        wrapper.quantize(examples)
    return wrapper.model


def gptq_afpq(model, fmt, mode, g, examples, true_sequential=True):
    from afpq_plugins.autogptq import AFPQQuantizeConfig, quantize_model
    from afpq_plugins.core.formats import get_format

    cfg = AFPQQuantizeConfig(bits=get_format(fmt).bits, group_size=g, fmt=fmt, mode=mode, desc_act=False,
                             true_sequential=true_sequential)
    quantize_model(model, cfg, examples)
    return model


def timing(args) -> None:
    """GPTQ-AFPQ (nf3, two scales) vs stock GPTQ-INT (int3) quantize() wall time, alternating.

    On a shared machine a single pair of cells measures the neighbours' load as much as
    the code, so this runs ``--repeats`` alternating pairs on the first ``--timing-layers``
    decoder layers of SmolLM2 and reports the minimum (and median) of each.
    """
    import statistics

    import afpq_plugins.autogptq  # noqa: F401
    from afpq_plugins.autogptq import examples_from_ids
    from afpq_plugins.data import calibration_samples, default_model_path, load_model_and_tokenizer

    base, tok = load_model_and_tokenizer(default_model_path())
    base.model.layers = base.model.layers[: args.timing_layers]
    base.config.num_hidden_layers = args.timing_layers
    examples = examples_from_ids(calibration_samples(tok, args.nsamples, args.calib_seqlen, seed=0))
    times = {"int3": [], "nf3-afpq": []}
    for _ in range(args.repeats):
        for name in times:
            model = copy.deepcopy(base)
            t0 = time.perf_counter()
            if name == "int3":
                gptq_int(model, 3, 64, examples, args.true_sequential)
            else:
                gptq_afpq(model, "nf3", "afpq", 64, examples, args.true_sequential)
            times[name].append(time.perf_counter() - t0)
            del model
            print(f"{name:9s} {times[name][-1]:7.2f}s", flush=True)
    res = {k: {"min_s": min(v), "median_s": statistics.median(v), "all_s": [round(x, 2) for x in v]} for k, v in times.items()}
    res["ratio_min"] = res["nf3-afpq"]["min_s"] / res["int3"]["min_s"]
    res["ratio_median"] = res["nf3-afpq"]["median_s"] / res["int3"]["median_s"]
    res["settings"] = {"layers": args.timing_layers, "nsamples": args.nsamples, "calib_seqlen": args.calib_seqlen,
                       "group_size": 64, "true_sequential": args.true_sequential, "repeats": args.repeats}
    print(json.dumps(res, indent=2, sort_keys=True))
    save_results(args.timing_json, res)


def layer_timing(args) -> None:
    """GPTQ's per-layer work, AFPQ vs stock INT, alternating: ``fasterquant`` then ``pack``.

    Everything else in ``quantize()`` (calibration forwards, Hessian accumulation,
    hooks) is the same code for both, so the whole-call ratio lies between 1 and this
    one; on a shared machine this is the stabler figure (many short alternating
    repeats, minimum per side). Weights: SmolLM2's decoder layer 0 (q, k, o, gate,
    down shapes); Hessian ``X^T X`` of its real input activations on the calibration text.
    """
    import statistics

    from auto_gptq.nn_modules.qlinear.qlinear_cuda_old import QuantLinear as IntQuantLinear
    from auto_gptq.quantization.gptq import GPTQ

    import afpq_plugins.autogptq as A
    from afpq_plugins.autogptq import compat
    from afpq_plugins.data import calibration_samples, default_model_path, load_model_and_tokenizer

    base, tok = load_model_and_tokenizer(default_model_path())
    blk = base.model.layers[0]
    ids = torch.cat(calibration_samples(tok, args.nsamples, args.calib_seqlen, seed=0)).reshape(args.nsamples, -1)
    with torch.no_grad():
        h = base.model.embed_tokens(ids).reshape(-1, base.config.hidden_size)
        x_attn = blk.input_layernorm(h)
        up = blk.mlp.act_fn(blk.mlp.gate_proj(x_attn)) * blk.mlp.up_proj(x_attn)
    hess = {base.config.hidden_size: 2 * x_attn.t() @ x_attn / len(x_attn), up.shape[1]: 2 * up.t() @ up / len(up)}
    layers = {"q_proj": blk.self_attn.q_proj, "k_proj": blk.self_attn.k_proj, "o_proj": blk.self_attn.o_proj,
              "gate_proj": blk.mlp.gate_proj, "down_proj": blk.mlp.down_proj}
    g, bits = 64, 3
    afpq_gptq = A.AFPQGPTQ.bind("nf3", "afpq", torch.float16)
    afpq_ql = A.quant_linear_class("nf3", "afpq", torch.float16)

    def one(kind):
        tq = tp = 0.0
        for lin in layers.values():
            layer = copy.deepcopy(lin)
            t0 = time.perf_counter()
            gq = GPTQ(layer) if kind == "int3" else afpq_gptq(layer)
            gq.quantizer.configure(bits, perchannel=True, sym=False)
            gq.H = hess[layer.in_features].clone()
            gq.nsamples = 1
            with compat.no_cuda_synchronize():
                scale, zero, g_idx = gq.fasterquant(group_size=g)
            t1 = time.perf_counter()
            cls = IntQuantLinear if kind == "int3" else afpq_ql
            ql = cls(bits, g, layer.in_features, layer.out_features, False)
            ql.pack(layer, scale, zero, g_idx)
            tq, tp = tq + t1 - t0, tp + time.perf_counter() - t1
        return tq, tp

    times = {"int3": [], "nf3-afpq": []}
    for r in range(args.repeats):
        for kind in times:
            times[kind].append(one(kind))
        print(f"repeat {r}: " + "  ".join(f"{k} fasterquant {v[-1][0]:.3f}s pack {v[-1][1]:.3f}s"
                                          for k, v in times.items()), flush=True)
    res = {"settings": {"layers": list(layers), "nsamples": args.nsamples, "calib_seqlen": args.calib_seqlen,
                        "group_size": g, "bits": bits, "repeats": args.repeats, "threads": torch.get_num_threads()}}
    for k, v in times.items():
        fq = [a for a, _ in v]
        tot = [a + b for a, b in v]
        res[k] = {"fasterquant_min_s": min(fq), "fasterquant_median_s": statistics.median(fq),
                  "with_pack_min_s": min(tot), "with_pack_median_s": statistics.median(tot)}
    for part in ("fasterquant_min_s", "fasterquant_median_s", "with_pack_min_s", "with_pack_median_s"):
        res["ratio_" + part[:-2]] = res["nf3-afpq"][part] / res["int3"][part]
    print(json.dumps(res, indent=2, sort_keys=True))
    save_results(args.layer_timing_json, res)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--calib-seqlen", type=int, default=512)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--windows", type=int, default=16)
    p.add_argument("--bits", type=int, nargs="*", default=[3, 4])
    p.add_argument("--group-size", type=int, nargs="*", default=[64, -1])
    p.add_argument("--methods", nargs="*", default=["rtn", "gptq"])
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--true-sequential", action=argparse.BooleanOptionalAction, default=True,
                   help="AutoGPTQ true_sequential (off: one calibration pass per decoder layer, ~2.5x faster)")
    p.add_argument("--json", default="benchmarks/out/gptq.json")
    p.add_argument("--timing", action="store_true", help="only the alternating GPTQ-AFPQ vs GPTQ-INT timing")
    p.add_argument("--timing-layers", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--timing-json", default="benchmarks/out/gptq_timing.json")
    p.add_argument("--layer-timing", action="store_true",
                   help="only GPTQ's per-layer work (fasterquant + pack), AFPQ vs stock INT, alternating")
    p.add_argument("--layer-timing-json", default="benchmarks/out/gptq_layer_timing.json")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.layer_timing:
        return layer_timing(args)
    if args.timing:
        import logging

        logging.getLogger("auto_gptq").setLevel(logging.WARNING)
        from auto_gptq.modeling import _base

        _base.logger.setLevel(logging.WARNING)
        return timing(args)

    import logging

    logging.getLogger("auto_gptq").setLevel(logging.WARNING)
    import afpq_plugins.autogptq  # noqa: F401  (registers the adapter)
    from auto_gptq.modeling import _base

    _base.logger.setLevel(logging.WARNING)
    from afpq_plugins.autogptq import examples_from_ids
    from afpq_plugins.data import calibration_samples, default_model_path, eval_text_path, load_model_and_tokenizer, load_text
    from afpq_plugins.evaluate import perplexity
    from afpq_plugins.model import quantize_model_rtn

    settings = {"model": "SmolLM2-135M-Instruct (dequantized Q4_1 GGUF)", "nsamples": args.nsamples,
                "calib_seqlen": args.calib_seqlen, "seqlen": args.seqlen, "windows": args.windows,
                "calibration": "Austen x5 (not P&P), seed 0", "eval": "Pride and Prejudice",
                "damp": 0.01, "desc_act": False, "true_sequential": args.true_sequential, "scale_dtype": "float16"}
    data = load_results(args.json, settings)
    cells = data["cells"]
    path = default_model_path()
    base, tok = load_model_and_tokenizer(path)
    base.eval()
    ids = tok(load_text(str(eval_text_path())), return_tensors="pt").input_ids[0]
    if "fp32" not in data:
        r = perplexity(base, ids, seqlen=args.seqlen, windows=args.windows, progress=False)
        data["fp32"] = r.ppl
        save_results(args.json, data)
    print(f"fp32: ppl {data['fp32']:.3f}", flush=True)
    examples = examples_from_ids(calibration_samples(tok, args.nsamples, args.calib_seqlen, seed=0))

    order = [(b, g) for g in args.group_size for b in args.bits]
    order.sort(key=lambda bg: (bg[1] == -1, bg[0]))  # g64 first, 3 bits first
    # Within a (bits, group) block: the INT and NF-AFPQ pairs first (the headline
    # comparison), RTN before GPTQ, so an interrupted run still has paired cells.
    plan = [(m, fam, mode) for fam, mode in (("int", "zp"), ("nf", "afpq"), ("nf", "sym"), ("fp", "afpq"))
            for m in ("rtn", "gptq") if m in args.methods]
    for bits, g in order:
        for method, fam, mode in plan:
            fmt = f"{fam}{bits}"
            key = cell_key(method, fmt, mode, g)
            if key in cells:
                continue
            model = copy.deepcopy(base)
            t0 = time.perf_counter()
            with torch.no_grad():
                if method == "rtn":
                    quantize_model_rtn(model, fmt, g, mode, progress=False)
                elif fam == "int":
                    model = gptq_int(model, bits, g, examples, args.true_sequential)
                else:
                    model = gptq_afpq(model, fmt, mode, g, examples, args.true_sequential)
            tq = time.perf_counter() - t0
            r = perplexity(model, ids, seqlen=args.seqlen, windows=args.windows, progress=False)
            del model
            cells[key] = {"method": method, "format": fmt, "mode": mode, "bits": bits, "group_size": g,
                          "ppl": r.ppl, "quantize_s": round(tq, 2), "eval_s": round(r.seconds, 2)}
            save_results(args.json, data)
            print(f"{key:24s} ppl {r.ppl:9.3f}  quantize {tq:7.1f}s  eval {r.seconds:6.1f}s", flush=True)
    print()
    print(report(data))


def report(data) -> str:
    cells = data["cells"]
    s = data["settings"]
    cols = [(b, g) for g in (64, -1) for b in (3, 4)]
    lines = [f"Settings: {json.dumps(s, sort_keys=True)}", "",
             "| method | " + " | ".join(f"{b}-bit g{g}" for b, g in cols) + " |",
             "|---|" + "---|" * len(cols)]
    lines.append("| fp32 (Q4_1-derived) | " + " | ".join(f"{data.get('fp32', float('nan')):.2f}" for _ in cols) + " |")
    for method in ("rtn", "gptq"):
        for label, fam, mode in ROWS:
            row = []
            for b, g in cols:
                c = cells.get(cell_key(method, f"{fam}{b}", mode, g))
                row.append("-" if c is None else f"{c['ppl']:.2f}")
            lines.append(f"| {method.upper()} {label} | " + " | ".join(row) + " |")
    lines += ["", "GPTQ quantization wall time (whole quantize() call, same run):", "",
              "| bits g | INT (stock AutoGPTQ) s | NF sym s | NF AFPQ s | FP AFPQ s | NF AFPQ / INT |", "|---|---|---|---|---|---|"]
    for b, g in cols:
        t = [cells.get(cell_key("gptq", f"{fam}{b}", mode, g)) for _, fam, mode in ROWS]
        if all(x is None for x in t):
            continue
        vals = ["-" if x is None else f"{x['quantize_s']:.1f}" for x in t]
        ratio = "-" if t[0] is None or t[2] is None else f"{t[2]['quantize_s'] / t[0]['quantize_s']:.2f}"
        lines.append(f"| {b}-bit g{g} | " + " | ".join(vals) + f" | {ratio} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
