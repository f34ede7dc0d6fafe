"""Running the study: load the model and text, quantize a copy per cell, measure perplexity, save after each."""

from __future__ import annotations

import contextlib
import copy
import importlib
import logging
import os
import time
import warnings
from typing import Callable, Iterable, List, Optional, Sequence

import torch

from .plan import Cell, Settings
from .store import _run_section, load_results, save_results


def adapters_with_search() -> List[str]:
    """The calibrated methods that can run here (every registered method takes a scale search)."""
    from ..methods import MethodUnavailable, get_method

    out = []
    for m in ("gptq", "awq"):
        try:
            get_method(m)
        except MethodUnavailable:  # not installed on this stack
            continue
        out.append(m)
    return out


def _eval_text_path(settings: Settings) -> str:
    from ..data import AUSTEN_DIR

    p = settings.eval_text
    if not os.path.isabs(p) and not os.path.exists(p):
        p = str(AUSTEN_DIR / p)
    if not os.path.isfile(p):
        raise ValueError(f"evaluation text {settings.eval_text!r} not found")
    return p


def load_inputs(settings: Settings):
    """(float model, tokenizer, token ids of the evaluation text)."""
    from ..data import load_model_and_tokenizer, load_text, resolve_model

    model, tok = load_model_and_tokenizer(resolve_model(settings.model))
    ids = tok(load_text(_eval_text_path(settings)), return_tensors="pt").input_ids[0]
    return model, tok, ids


def check_groups(model: torch.nn.Module, groups: Iterable[int]) -> None:
    """Every group size must divide every quantized layer's input width (clear error otherwise)."""
    from ..core.spec import group_count
    from ..model import find_linears

    linears = find_linears(model)
    for g in groups:
        for name, lin in linears.items():
            try:
                group_count(lin.in_features, g, name)
            except ValueError as exc:
                widths = sorted({m.in_features for m in linears.values()})
                raise ValueError(f"group size {g} does not fit this model (input widths {widths}): {exc}") from None


def _spec(cell: Cell, settings: Settings):
    from ..methods import FormatSpec

    return FormatSpec(cell.fmt, cell.group_size, cell.mode, settings.scale_dtype, scale_search=cell.search)


def _rtn(model, cell: Cell, settings: Settings, tok=None) -> None:
    """RTN as fake quantization: the weight ``quantize_model_rtn`` stores, decoded once
    (the output search calibrates on the same samples as GPTQ/AWQ)."""
    from ..methods import Calibration, quantize

    quantize(model, tok, "rtn", _spec(cell, settings), Calibration(settings.nsamples, settings.calib_seqlen,
                                                                   settings.seed), fake=True, progress=False)


@contextlib.contextmanager
def _quiet_upstream():
    """Silence AutoGPTQ's per-module INFO lines and AutoAWQ's warnings (the study logs per cell)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _quiet_loggers() -> None:
    # after the upstream import: auto_gptq sets its loggers' levels when imported
    for name in list(logging.root.manager.loggerDict):
        if name.startswith(("auto_gptq", "awq", "gptqmodel", "llmcompressor")):
            logging.getLogger(name).setLevel(logging.WARNING)


def _options(method: str, settings: Settings) -> dict:
    """The study's settings as the method's options (the same names on every engine; an engine
    without one, e.g. llm-compressor's GPTQ without act-order switches, runs its own way)."""
    if method == "gptq":
        return {"desc_act": settings.gptq_desc_act, "true_sequential": settings.gptq_true_sequential,
                "damp_percent": settings.gptq_damp}
    if method == "awq":
        return {"clip": settings.awq_clip}
    return {}


def quantize_cell(model, tok, cell: Cell, settings: Settings) -> str:
    """Quantize ``model`` in place as ``cell`` says (through the methods registry); returns the engine."""
    from ..methods import Calibration, get_method, quantize

    if cell.method == "rtn":
        _rtn(model, cell, settings, tok)
        return "core"
    if cell.method == "peer":
        from .peers import apply_peer

        apply_peer(model, cell.family)
        return "peer"
    backend = getattr(settings, "backend", None)
    with _quiet_upstream():
        m = get_method(cell.method, backend)
        for mod in m.requires:  # import first: auto_gptq sets its loggers' levels when imported
            importlib.import_module(mod)
        _quiet_loggers()
        quantize(model, tok, cell.method, _spec(cell, settings),
                 Calibration(settings.nsamples, settings.calib_seqlen, settings.seed), backend=backend,
                 progress=False, **{k: v for k, v in _options(cell.method, settings).items() if k in m.options})
    return m.engine


def run_cell(cell: Cell, model, tok, ids, settings: Settings) -> dict:
    """Quantize a copy of ``model`` as ``cell`` says and measure its perplexity."""
    from ..evaluate import perplexity

    m = copy.deepcopy(model)
    t0, c0 = time.perf_counter(), time.process_time()
    quantize_cell(m, tok, cell, settings)
    tq = time.perf_counter() - t0
    r = perplexity(m, ids, seqlen=settings.seqlen, windows=settings.windows, progress=False)
    del m
    return {"method": cell.method, "format": cell.fmt, "mode": cell.mode, "scale_search": cell.search or "minmax",
            "bits": cell.bits, "group_size": cell.group_size, "ppl": r.ppl, "nll": r.nll, "tokens": r.tokens,
            "ppl_se": r.ppl_se, "nll_se": r.nll_se, "window_nll": list(r.window_nll),
            "quantize_s": round(tq, 2), "eval_s": round(r.seconds, 2),
            "cpu_s": round(time.process_time() - c0, 2)}  # CPU time of this process, all threads


def run_study(
    plan: Sequence[Cell],
    settings: Settings,
    json_path: str,
    inputs=None,
    cell_runner: Callable = run_cell,
    log: Callable[[str], None] = print,
    max_cells: Optional[int] = None,
) -> dict:
    """Run every cell of ``plan`` not yet in ``json_path`` under ``settings``; save after each.

    ``inputs``: ``(model, tokenizer, ids)`` (default: :func:`load_inputs`), loaded only
    when some cell is missing. Returns the run's section of the file.
    """
    from ..evaluate import perplexity

    settings.validate()
    data = load_results(json_path)
    sec = _run_section(data, settings)
    todo = [c for c in plan if c.key not in sec["cells"]]
    done = len(plan) - len(todo)
    if max_cells is not None:
        todo = todo[:max_cells]
    log(f"accuracy: {len(plan)} cells planned, {done} already in {json_path}, {len(todo)} to run")
    if not todo and sec.get("fp32") is not None:
        return sec
    model, tok, ids = inputs if inputs is not None else load_inputs(settings)
    check_groups(model, sorted({c.group_size for c in todo}))
    if sec.get("fp32") is None:
        r = perplexity(model, ids, seqlen=settings.seqlen, windows=settings.windows, progress=False)
        sec["fp32"] = r.as_dict()
        save_results(json_path, data)
        log(f"fp32 (Q4_1-derived): ppl {r.ppl:.3f} over {r.tokens} tokens ({r.seconds:.0f}s)")
    t_start = time.perf_counter()
    for i, cell in enumerate(todo, 1):
        t0 = time.perf_counter()
        sec["cells"][cell.key] = cell_runner(cell, model, tok, ids, settings)
        save_results(json_path, data)
        res = sec["cells"][cell.key]
        elapsed = time.perf_counter() - t_start
        eta = elapsed / i * (len(todo) - i)
        log(f"[{i}/{len(todo)}] {cell.key:28s} ppl {res['ppl']:10.3f}  ({time.perf_counter() - t0:5.0f}s; "
            f"elapsed {elapsed / 60:.1f} min, ~{eta / 60:.0f} min left at this pace)")
    return sec
