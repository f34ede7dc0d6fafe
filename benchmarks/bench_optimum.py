"""optimum + AFPQ next to the AutoGPTQ adapter: GPTQ nf3, group 64, on the embedded SmolLM2.

    PYTHONPATH=. python benchmarks/bench_optimum.py [--nsamples 32 --calib-seqlen 512]
        [--seqlen 512 --windows 16] [--fmt nf3 --group-size 64] [--json benchmarks/out/optimum.json]

Run in the legacy venv (optimum 2.0.0 + auto-gptq 0.7.1 + the AutoGPTQ adapter) for both
rows; in the modern venv (optimum 2.3.0 + gptqmodel 7.6.0) only the optimum row runs.

* Model: SmolLM2-135M-Instruct from ``afpq_plugins.data.default_model_path()`` (float32
  dequantization of a Q4_1 GGUF), CPU, float32.
* Calibration: ``calibration_samples`` (random windows of the five Austen calibration
  novels, seed 0), the *same token windows* for both rows. Evaluation: perplexity on
  Pride and Prejudice, the first ``--windows`` windows of ``--seqlen`` tokens.
* Both rows: damp 0.01, act-order off, true-sequential with AutoGPTQ's grouping of a
  Llama block (q/k/v, o, up/gate, down), fp16 scales, lm_head left in float.
  ``optimum``: ``afpq_plugins.hf.AFPQGPTQQuantizer`` (``quantize_model``); ``autogptq``:
  ``afpq_plugins.autogptq.quantize_model`` (``AFPQQuantizeConfig``).
* Also printed: the float model and RTN with the same grid, for scale.

The claim checked: the two GPTQ perplexities agree within 1 %. The JSON file is written
after every row and reused by a rerun with the same settings and stack (rows already
there are skipped), so the rows can also be measured by separate processes.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")

# AutoGPTQ's grouping of a Llama decoder block (auto_gptq.modeling.llama.inside_layer_modules)
LLAMA_GROUPS = [
    ["self_attn.k_proj", "self_attn.v_proj", "self_attn.q_proj"],
    ["self_attn.o_proj"],
    ["mlp.up_proj", "mlp.gate_proj"],
    ["mlp.down_proj"],
]


def _ppl(model, tok, text, args):
    from afpq_plugins.evaluate import perplexity

    return perplexity(model, tok, text, seqlen=args.seqlen, windows=args.windows, progress=False).ppl


def run_optimum(model, tok, samples, args):
    from afpq_plugins.hf import AFPQGPTQQuantizer

    dataset = [{"input_ids": [s.tolist()], "attention_mask": [[1] * s.numel()]} for s in samples]
    q = AFPQGPTQQuantizer(
        fmt=args.fmt, group_size=args.group_size, dataset=dataset, damp_percent=0.01, desc_act=False,
        true_sequential=True, modules_in_block_to_quantize=LLAMA_GROUPS, model_seqlen=args.calib_seqlen,
    )
    t0 = time.perf_counter()
    q.quantize_model(model, tok)
    return model, time.perf_counter() - t0


def run_optimum_int(model, tok, samples, args):
    """Stock optimum INT GPTQ (asymmetric int of the same bits), no AFPQ code in the loop.

    Evaluated on the fake-quantized float weights GPTQ leaves in the Linears (packing is
    skipped: optimum 2.0.0 cannot pack with auto-gptq 0.7.1 at all). Its only purpose is a
    control: the same INT run on both stacks shows how far the two GPTQ engines
    (auto-gptq vs gptqmodel) differ by themselves.
    """
    import contextlib

    from optimum.gptq import GPTQQuantizer

    from afpq_plugins.core.formats import get_format
    from afpq_plugins.hf import compat
    from afpq_plugins.hf import optimum as afpq_optimum

    class Unpacked(GPTQQuantizer):
        def pack_model(self, model, quantizers):
            self.layers_done = len(quantizers)

        def post_init_model(self, model):
            return model

        def to_dict(self):
            return {"quant_method": "gptq", "bits": self.bits}

    dataset = [{"input_ids": [s.tolist()], "attention_mask": [[1] * s.numel()]} for s in samples]
    kw = dict(bits=get_format(args.fmt).bits, group_size=args.group_size, dataset=dataset, damp_percent=0.01,
              desc_act=False, sym=False, true_sequential=True, modules_in_block_to_quantize=LLAMA_GROUPS,
              model_seqlen=args.calib_seqlen)
    if afpq_optimum.uses_gptqmodel():
        kw["act_group_aware"] = False
    q = Unpacked(**kw)
    before = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    t0 = time.perf_counter()
    with contextlib.ExitStack() as st:
        if not afpq_optimum.uses_gptqmodel():
            st.enter_context(compat.cpu_calibration_optimum_2_0())
            st.enter_context(compat.no_cuda_synchronize())
        q.quantize_model(model, tok)
    seconds = time.perf_counter() - t0
    after = model.model.layers[0].self_attn.q_proj.weight.detach()
    if torch.equal(before, after):
        raise SystemExit("optimum-int: GPTQ left the weights unchanged; nothing to evaluate")
    return model, seconds


def run_autogptq(model, tok, samples, args):
    from afpq_plugins.autogptq import AFPQQuantizeConfig, examples_from_ids, quantize_model
    from afpq_plugins.core.formats import get_format

    cfg = AFPQQuantizeConfig(bits=get_format(args.fmt).bits, group_size=args.group_size, fmt=args.fmt,
                             desc_act=False, damp_percent=0.01, true_sequential=True)
    t0 = time.perf_counter()
    quantize_model(model, cfg, examples_from_ids(samples))
    return model, time.perf_counter() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--fmt", default="nf3")
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--calib-seqlen", type=int, default=512)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--rows", nargs="+", default=["float", "rtn", "optimum", "autogptq"])
    ap.add_argument("--json", default="benchmarks/out/optimum.json")
    args = ap.parse_args(argv)

    import transformers

    from afpq_plugins.data import (calibration_samples, default_model_path, eval_text_path,
                                   load_model_and_tokenizer, load_text)
    from afpq_plugins.hf import optimum as afpq_optimum

    path = default_model_path()
    base, tok = load_model_and_tokenizer(path)
    text = load_text(eval_text_path())
    samples = calibration_samples(tok, args.nsamples, args.calib_seqlen, seed=0)
    backend = "gptqmodel" if afpq_optimum.uses_gptqmodel() else "auto-gptq"
    import optimum.version

    results = {
        "settings": {k: v for k, v in vars(args).items() if k not in ("json", "rows")},
        "stack": {"transformers": transformers.__version__, "optimum": optimum.version.__version__,
                  "optimum_backend": backend, "torch": torch.__version__, "python": platform.python_version()},
        "rows": {},
    }
    if args.json and os.path.isfile(args.json):  # resumable: keep rows measured with the same settings and stack
        with open(args.json, encoding="utf-8") as fh:
            old = json.load(fh)
        if old.get("settings") == results["settings"] and old.get("stack") == results["stack"]:
            results["rows"] = old.get("rows", {})

    def dump():
        if args.json:
            os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
            with open(args.json, "w", encoding="utf-8") as fh:
                json.dump(results, fh, indent=2, sort_keys=True)

    for row in args.rows:
        if row in results["rows"]:
            r = results["rows"][row]
            print(f"{row:9s} ppl {r['ppl']:8.3f}   (from {args.json})", flush=True)
            continue
        if row == "autogptq" and backend != "auto-gptq":
            print("autogptq row: skipped (the AutoGPTQ adapter needs the legacy stack)", flush=True)
            continue
        model = copy.deepcopy(base)
        seconds = None
        t0 = time.perf_counter()
        if row == "rtn":
            from afpq_plugins.model import quantize_model_rtn

            quantize_model_rtn(model, args.fmt, args.group_size, progress=False)
            seconds = time.perf_counter() - t0
        elif row == "optimum":
            model, seconds = run_optimum(model, tok, samples, args)
        elif row == "autogptq":
            model, seconds = run_autogptq(model, tok, samples, args)
        elif row == "optimum-int":
            model, seconds = run_optimum_int(model, tok, samples, args)
        elif row != "float":
            raise SystemExit(f"unknown row {row!r}")
        ppl = _ppl(model, tok, text, args)
        results["rows"][row] = {"ppl": ppl, "quantize_s": seconds}
        dump()
        print(f"{row:9s} ppl {ppl:8.3f}" + (f"   quantize {seconds:7.1f}s" if seconds else ""), flush=True)
        del model
    rows = results["rows"]
    if "optimum" in rows and "autogptq" in rows:
        rel = rows["optimum"]["ppl"] / rows["autogptq"]["ppl"] - 1
        results["optimum_vs_autogptq"] = rel
        print(f"optimum / autogptq - 1 = {100 * rel:+.3f} %  ({'within' if abs(rel) <= 0.01 else 'OUTSIDE'} 1 %)")
    dump()
    return 0


if __name__ == "__main__":
    sys.exit(main())
