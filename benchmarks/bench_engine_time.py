"""Quantization wall time of AFPQ against INT on the same engine (GPTQModel 7.6, llm-compressor 0.14).

    GPTQMODEL_CPU_WORKERS=2 PYTHONPATH=. .venv-modern/bin/python benchmarks/bench_engine_time.py \
        [--engines gptqmodel-gptq gptqmodel-awq llmcompressor-gptq] [--repeats 2] [--threads 2] \
        [--layers K] [--out benchmarks/out/engine_time.json]

Per engine, three variants of the same quantization of the embedded SmolLM2-135M-Instruct
(calibration 8 x 256 tokens of the five Austen calibration novels, seed 0, group 64):

* ``int-stock``: the engine's own INT3 asymmetric path, no afpq code in it. GPTQModel:
  ``QuantizeConfig(bits=3, group_size=64, sym=False, method=...)`` and ``quantize()`` on the
  in-memory model, which packs each layer into GPTQModel's INT kernel module inside ``quantize()``
  (GPTQ: its ``TorchLinear``; AWQ: ``AwqTorchLinear`` through the scoped shim
  :func:`awq_torch_kernel_float32`, because GPTQModel's default AWQ kernel refuses CPU with
  "AWQ: CUDA is not available" and its torch AWQ kernel refuses a float32 layer; the AWQ
  algorithm and the packing code stay GPTQModel's).
  llm-compressor: ``oneshot`` with a stock ``GPTQModifier`` (INT3 asymmetric, group 64); it leaves
  fake-quantized ``Linear`` modules and packs only in ``save_pretrained`` (not timed), so its
  stock row has no packing while the two adapter rows below pack into ``AFPQLinear``.
* ``int-stock-fixed`` (GPTQModel AWQ only): the same stock INT3 AWQ with the corrected smoothing-scale
  search (``afpq_plugins.gptqmodel.awq_search.fixed_scale_search``, what the adapter uses): GPTQModel
  7.6's own search corrupts float32 CPU weights (its "master copy" is the live tensor), so the plain
  stock row times a run whose weights blow up.
* ``int-core``: our adapter with core's INT3 grid (``FormatSpec("int3", 64)``): the same
  adapter code, processors and packing as AFPQ, only the grid differs.
* ``nf3-afpq``: our adapter with NF3 two scales (``FormatSpec("nf3", 64, "afpq")``).

The settings the engines share are the same on every variant: act-order off (GPTQModel's
group-aware reordering off, llm-compressor's ``actorder=None``), true-sequential on, GPTQModel's
default damping (GPTQ), llm-compressor dampening 0.01, AWQ clip search as ``--awq-clip``
(the adapter's; stock INT runs GPTQModel's own clip search).

Timed: only the quantize call (the dataset rows built from the calibration windows tokenized once before,
the engine's capture, quantization and its in-``quantize()`` packing); each run gets a fresh
deep copy of the float model made before the timer, and nothing is saved. Runs are interleaved
(``int-stock, nf3-afpq, int-core[, int-stock-fixed]``, then the reverse order on the next repeat, and so on), after
one untimed warm-up of every variant on a one-layer copy with 2 x 64 tokens (imports, first calls).
Progress on stderr; the table on stdout; JSON (atomic) to ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import logging
import os
import platform
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from afpq_plugins.methods import Calibration  # noqa: E402  (light: no engine, no torch)

ENGINES = ("gptqmodel-gptq", "gptqmodel-awq", "llmcompressor-gptq")
VARIANTS = ("int-stock", "nf3-afpq", "int-core")
AWQ_FIXED = "int-stock-fixed"  # GPTQModel AWQ only: stock INT with the corrected scale search
GROUP = 64
TARGET = 1.15


# -- pure helpers (tested in tests/test_bench_engine_time.py) ----------------------------------------
def run_order(repeat: int, variants: Sequence[str] = VARIANTS) -> List[str]:
    """The variants' order in repeat ``repeat`` (0-based): as given on even repeats, reversed on odd ones."""
    return list(variants) if repeat % 2 == 0 else list(reversed(variants))


def summarize(times: Dict[str, List[float]]) -> dict:
    """Median seconds per variant and the ratios of nf3-afpq to int-stock, int-core and (when timed)
    int-stock-fixed."""
    for k, v in times.items():
        if not v:
            raise ValueError(f"summarize: variant {k!r} has no timed run")
    med = {k: statistics.median(v) for k, v in times.items()}
    afpq = med.get("nf3-afpq")

    def ratio(ref):
        return None if afpq is None or ref not in med else afpq / med[ref]

    out = {"median_s": med, "runs_s": {k: list(v) for k, v in times.items()},
           "ratio_vs_stock": ratio("int-stock"), "ratio_vs_core": ratio("int-core")}
    if AWQ_FIXED in med:
        out["ratio_vs_stock_fixed"] = ratio(AWQ_FIXED)
    return out


def format_table(results: Dict[str, dict], target: float = TARGET) -> str:
    """Markdown table: engine, method, layers, median seconds per variant, the ratios (against ``target``)."""

    def sec(m, k):
        return f"{m[k]:.1f}" if k in m else "-"

    def rat(r):
        if r is None:
            return "-"
        return f"{r:.2f}" + ("" if r <= target else " (over)")

    fixed = any(AWQ_FIXED in r["median_s"] for r in results.values())
    head = ["engine", "method", "layers", "int-stock s"] + ([f"{AWQ_FIXED} s"] if fixed else []) + [
        "int-core s", "nf3-afpq s", "AFPQ / stock INT"] + (["AFPQ / stock INT fixed"] if fixed else []) + [
        "AFPQ / core INT"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for engine, res in results.items():
        name, method = engine.split("-", 1)
        m = res["median_s"]
        row = [name, method, str(res.get("layers", "-")), sec(m, "int-stock")] + ([sec(m, AWQ_FIXED)] if fixed else [])
        row += [sec(m, "int-core"), sec(m, "nf3-afpq"), rat(res["ratio_vs_stock"])]
        row += [rat(res.get("ratio_vs_stock_fixed"))] if fixed else []
        row += [rat(res["ratio_vs_core"])]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def write_json_atomic(path: str, data) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=2, sort_keys=True)
    os.replace(tmp, path)


def parse_layers(items: Optional[Sequence[str]], engines: Sequence[str]) -> Dict[str, Optional[int]]:
    """``--layers`` items (``K`` for every engine, ``ENGINE=K`` for one; later items win) as
    ``{engine: K or None}`` (None: all layers)."""
    out: Dict[str, Optional[int]] = {e: None for e in engines}
    for item in items or ():
        name, sep, k = item.rpartition("=")
        try:
            n = int(k)
        except ValueError:
            raise ValueError(f"--layers: expected K or ENGINE=K, got {item!r}") from None
        if n < 1:
            raise ValueError(f"--layers: K must be >= 1, got {item!r}")
        if not sep:
            out = {e: n for e in engines}
        elif name in ENGINES:
            if name in out:
                out[name] = n
        else:
            raise ValueError(f"--layers: unknown engine {name!r} in {item!r}: expected one of {', '.join(ENGINES)}")
    return out


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- the model ---------------------------------------------------------------------------------------
def truncate(model, k: int):
    """Keep only the first ``k`` decoder layers of ``model`` (in place; returns it)."""
    layers = model.model.layers
    if not 1 <= k <= len(layers):
        raise ValueError(f"--layers must be between 1 and {len(layers)}, got {k}")
    model.model.layers = layers[:k]
    model.config.num_hidden_layers = k
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = model.config.layer_types[:k]
    return model


@dataclass(frozen=True)
class FixedCalibration(Calibration):
    """A :class:`~afpq_plugins.methods.Calibration` whose ``samples()`` are clones of ``windows`` (cut to
    ``nsamples`` x ``seqlen``): no tokenization inside a timed run, and a small warm-up calibration
    that leaves the measured windows alone."""

    windows: tuple = field(default=(), compare=False, repr=False)

    def samples(self, tokenizer):
        return [w[: self.seqlen].clone() for w in self.windows[: self.nsamples]]


def fixed_calibration(windows, nsamples: Optional[int] = None, seqlen: Optional[int] = None) -> FixedCalibration:
    windows = tuple(windows)
    return FixedCalibration(nsamples or len(windows), seqlen or windows[0].numel(), 0, windows=windows)


# -- the variants: fn(model, tokenizer, calib) quantizes model in place ---------------------------------
def _gptqmodel_config(method: str, **extra):
    from gptqmodel import QuantizeConfig
    from gptqmodel.models._const import normalize_device

    kw = dict(bits=3, group_size=GROUP, sym=False, method=method, desc_act=False, true_sequential=True,
              offload_to_disk=False)
    if method == "gptq":
        kw.update(act_group_aware=False, static_groups=False)
    cfg = QuantizeConfig(**kw, **extra)
    cfg.device = normalize_device("cpu")
    return cfg


@contextlib.contextmanager
def awq_torch_kernel_float32():
    """Scoped shim for stock AWQ on CPU: GPTQModel 7.6's kernel choice answers with its own torch AWQ kernel
    (``AwqTorchLinear``, the one GPTQModel itself picks on NPU) allowed to pack a float32 layer.

    GPTQModel's default AWQ kernel (GEMM) refuses CPU ("AWQ: CUDA is not available") and ``AwqTorchLinear``
    lists only float16/bfloat16 (a check on the layer dtype; its ``pack`` stores float16 scales either way).
    The AWQ algorithm and packing code stay GPTQModel's. Restored on exit.
    """
    import torch
    from gptqmodel.models import base as base_mod
    from gptqmodel.nn_modules.qlinear.torch_awq import AwqTorchLinear

    old_dtypes, old_select = AwqTorchLinear.SUPPORTS_DTYPES, base_mod.select_quant_linear
    AwqTorchLinear.SUPPORTS_DTYPES = [*old_dtypes, torch.float32]
    base_mod.select_quant_linear = lambda *a, **k: AwqTorchLinear
    try:
        yield
    finally:
        AwqTorchLinear.SUPPORTS_DTYPES, base_mod.select_quant_linear = old_dtypes, old_select


def gptqmodel_stock(method: str, fixed_search: bool = False) -> Callable:
    def run(model, tok, calib):
        from gptqmodel.models.auto import MODEL_MAP

        cfg = _gptqmodel_config(method)
        qmodel = MODEL_MAP[model.config.model_type](model, quantized=False, quantize_config=cfg, tokenizer=tok)
        rows = [{"input_ids": s.tolist(), "attention_mask": [1] * s.numel()} for s in calib.samples(tok)]
        with contextlib.ExitStack() as stack:
            if method == "awq":
                stack.enter_context(awq_torch_kernel_float32())
            if fixed_search:  # the adapter's corrected AWQ scale search under GPTQModel's stock processor
                from afpq_plugins.gptqmodel.awq_search import fixed_scale_search

                stack.enter_context(fixed_scale_search())
            qmodel.quantize(rows, tokenizer=tok, batch_size=1)
        return qmodel

    return run


def adapter(method: str, backend: str, fmt: str, mode, **options) -> Callable:
    def run(model, tok, calib):
        from afpq_plugins.methods import FormatSpec, quantize

        return quantize(model, tok, method, FormatSpec(fmt, GROUP, mode), calib, backend=backend, progress=False,
                        **options)

    return run


def llmcompressor_stock(model, tok, calib):
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.gptq import GPTQModifier

    samples = calib.samples(tok)
    ds = Dataset.from_dict({"input_ids": [s.tolist() for s in samples],
                            "attention_mask": [[1] * s.numel() for s in samples]})
    weights = {"num_bits": 3, "type": "int", "symmetric": False, "strategy": "group", "group_size": GROUP}
    mod = GPTQModifier(config_groups={"int3": {"targets": ["Linear"], "weights": weights}}, ignore=["lm_head"],
                       dampening_frac=0.01, actorder=None)
    oneshot(model=model, dataset=ds, recipe=[mod], num_calibration_samples=len(samples),
            max_seq_length=calib.seqlen, tokenizer=tok)
    return model


def variants_for(engine: str, awq_clip: str) -> Dict[str, Callable]:
    if engine == "gptqmodel-gptq":
        return {"int-stock": gptqmodel_stock("gptq"),
                "nf3-afpq": adapter("gptq", "gptqmodel", "nf3", "afpq"),
                "int-core": adapter("gptq", "gptqmodel", "int3", None)}
    if engine == "gptqmodel-awq":
        return {"int-stock": gptqmodel_stock("awq"),
                "nf3-afpq": adapter("awq", "gptqmodel", "nf3", "afpq", clip=awq_clip),
                "int-core": adapter("awq", "gptqmodel", "int3", None, clip=awq_clip),
                AWQ_FIXED: gptqmodel_stock("awq", fixed_search=True)}
    if engine == "llmcompressor-gptq":
        return {"int-stock": llmcompressor_stock,
                "nf3-afpq": adapter("gptq", "llmcompressor", "nf3", "afpq"),
                "int-core": adapter("gptq", "llmcompressor", "int3", None)}
    raise ValueError(f"unknown engine {engine!r}: expected one of {', '.join(ENGINES)}")


def _quiet() -> None:
    warnings.simplefilter("ignore")  # the adapter's AWQ RuntimeWarning, upstream deprecations
    for name in list(logging.root.manager.loggerDict):
        if name.startswith(("gptqmodel", "llmcompressor", "compressed_tensors", "transformers", "datasets")):
            logging.getLogger(name).setLevel(logging.ERROR)
    try:
        from loguru import logger  # llm-compressor logs through loguru

        logger.remove()
    except ImportError:
        pass


def time_one(fn: Callable, base, tok, calib) -> float:
    m = copy.deepcopy(base)
    gc.collect()
    with contextlib.redirect_stdout(sys.stderr):  # the engines' logs and progress bars: stdout keeps the table
        t0 = time.perf_counter()
        fn(m, tok, calib)
        dt = time.perf_counter() - t0
    del m
    gc.collect()
    return dt


def measure(engine: str, base, tok, calib, repeats: int, warm_base=None, awq_clip: str = "symmetric") -> dict:
    fns = variants_for(engine, awq_clip)
    names = list(fns)
    if warm_base is not None:
        warm_calib = fixed_calibration(calib.windows, 2, 64)
        for name in names:
            log(f"{engine}: warm-up {name} (one layer, 2 x 64 tokens, untimed)")
            time_one(fns[name], warm_base, tok, warm_calib)
            _quiet()
    times: Dict[str, List[float]] = {k: [] for k in names}
    for r in range(repeats):
        for name in run_order(r, names):
            log(f"{engine}: repeat {r + 1}/{repeats} {name} ...")
            dt = time_one(fns[name], base, tok, calib)
            _quiet()
            times[name].append(dt)
            log(f"{engine}: repeat {r + 1}/{repeats} {name} {dt:.1f}s")
    return summarize(times)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engines", nargs="+", default=list(ENGINES), choices=ENGINES)
    p.add_argument("--repeats", type=int, default=2, help="timed runs per variant (interleaved)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--layers", nargs="+", default=None, metavar="[ENGINE=]K",
                   help="keep only the first K decoder layers, for every engine (K) or one (ENGINE=K); default all")
    p.add_argument("--nsamples", type=int, default=8)
    p.add_argument("--calib-seqlen", type=int, default=256)
    p.add_argument("--awq-clip", default="symmetric", choices=("symmetric", "two-sided", "engine"),
                   help="the adapter's AWQ clip search (default: the adapter's default)")
    p.add_argument("--no-warmup", action="store_true", help="skip the untimed one-layer warm-up per variant")
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "out", "engine_time.json"))
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from afpq_plugins.data import default_model_path, load_model_and_tokenizer

    try:
        layers = parse_layers(args.layers, args.engines)
    except ValueError as exc:
        p.error(str(exc))
    log("loading SmolLM2-135M-Instruct and the calibration windows")
    full, tok = load_model_and_tokenizer(default_model_path())
    full.eval()
    nl = len(full.model.layers)
    warm = None if args.no_warmup else truncate(copy.deepcopy(full), 1)
    calib = fixed_calibration(Calibration(args.nsamples, args.calib_seqlen, 0).samples(tok))  # tokenized once
    settings = {"model": "SmolLM2-135M-Instruct", "model_layers": nl,
                "nsamples": args.nsamples, "calib_seqlen": args.calib_seqlen, "group_size": GROUP,
                "repeats": args.repeats, "threads": torch.get_num_threads(), "awq_clip": args.awq_clip,
                "warmup": warm is not None, "gptqmodel_cpu_workers": os.environ.get("GPTQMODEL_CPU_WORKERS"),
                "machine": f"{platform.machine()}, {os.cpu_count()} logical CPUs (shared)",
                "torch": torch.__version__, "command": " ".join(sys.argv)}
    out = {"settings": settings, "engines": {}}
    for engine in args.engines:
        k = layers[engine]
        base = full if k is None else truncate(copy.deepcopy(full), k)
        _quiet()
        t0 = time.perf_counter()
        res = measure(engine, base, tok, calib, args.repeats, warm, args.awq_clip)
        res["layers"] = len(base.model.layers)
        out["engines"][engine] = res
        write_json_atomic(args.out, out)
        log(f"{engine}: done in {(time.perf_counter() - t0) / 60:.1f} min; AFPQ/stock {res['ratio_vs_stock']:.3f}, "
            f"AFPQ/core {res['ratio_vs_core']:.3f}")
        del base
    print(format_table(out["engines"]))
    print(f"\nlayers kept of {nl}: " + ", ".join(f"{e} {r['layers']}" for e, r in out["engines"].items())
          + f"; {args.nsamples} x {args.calib_seqlen} calibration tokens, group {GROUP}, median of {args.repeats}; "
          f"target AFPQ/INT <= {TARGET}. JSON: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
