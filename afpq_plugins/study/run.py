"""Running the study: load the model and text, quantize a copy per cell, measure perplexity, save after each."""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import time
import warnings
from typing import Callable, Iterable, List, Optional, Sequence

import torch

from .plan import Cell, Settings
from .store import _run_section, load_results, save_results


def adapters_with_search() -> List[str]:
    """The calibrated methods whose adapter here accepts ``scale_search`` (imports them; none on a stack without them)."""
    import inspect

    out = []
    with _quiet_upstream():
        try:
            from ..autogptq.api import gptq_quantize

            if "scale_search" in inspect.signature(gptq_quantize).parameters:
                out.append("gptq")
        except Exception:  # not installed on this stack
            pass
        try:
            from ..autoawq.quantizer import AFPQAwqQuantizer

            if "scale_search" in inspect.signature(AFPQAwqQuantizer.__init__).parameters:
                out.append("awq")
        except Exception:
            pass
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
    from ..core.quantize import group_count
    from ..model import find_linears

    linears = find_linears(model)
    for g in groups:
        for name, lin in linears.items():
            try:
                group_count(lin.in_features, g, name)
            except ValueError as exc:
                widths = sorted({m.in_features for m in linears.values()})
                raise ValueError(f"group size {g} does not fit this model (input widths {widths}): {exc}") from None


def _rtn(model, cell: Cell, settings: Settings) -> None:
    """RTN as fake quantization: the weight ``quantize_model_rtn`` stores, decoded once."""
    from ..core.quantize import fake_quantize
    from ..model import find_linears

    dtype = getattr(torch, settings.scale_dtype)
    with torch.no_grad():
        for name, lin in find_linears(model).items():
            lin.weight.copy_(fake_quantize(lin.weight, cell.fmt, cell.group_size, cell.mode, scale_dtype=dtype,
                                           name=name, search=cell.search))


@contextlib.contextmanager
def _quiet_upstream():
    """Silence AutoGPTQ's per-module INFO lines and AutoAWQ's warnings (the study logs per cell)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _quiet_loggers() -> None:
    # after the upstream import: auto_gptq sets its loggers' levels when imported
    for name in list(logging.root.manager.loggerDict):
        if name.startswith(("auto_gptq", "awq")):
            logging.getLogger(name).setLevel(logging.WARNING)


def _search_kwargs(cell: Cell) -> dict:
    return {} if cell.search is None else {"scale_search": cell.search}


def _gptq(model, tok, cell: Cell, settings: Settings) -> None:
    with _quiet_upstream():
        from ..autogptq.api import gptq_quantize

        _quiet_loggers()
        gptq_quantize(model, tok, cell.fmt, cell.group_size, cell.mode, scale_dtype=settings.scale_dtype,
                      desc_act=settings.gptq_desc_act, true_sequential=settings.gptq_true_sequential,
                      damp_percent=settings.gptq_damp, nsamples=settings.nsamples, seqlen=settings.calib_seqlen,
                      seed=settings.seed, **_search_kwargs(cell))


def _awq(model, tok, cell: Cell, settings: Settings) -> None:
    with _quiet_upstream():
        from ..autoawq.io import awq_quantize, wrap_for_awq
        from ..data import calibration_samples

        _quiet_loggers()
        samples = calibration_samples(tok, settings.nsamples, settings.calib_seqlen, seed=settings.seed)
        awq_quantize(wrap_for_awq(model), tok, cell.fmt, cell.group_size, cell.mode, clip=settings.awq_clip,
                     calib_data=[s.tolist() for s in samples], n_samples=settings.nsamples,
                     seqlen=settings.calib_seqlen, scale_dtype=getattr(torch, settings.scale_dtype),
                     progress=False, **_search_kwargs(cell))


def run_cell(cell: Cell, model, tok, ids, settings: Settings) -> dict:
    """Quantize a copy of ``model`` as ``cell`` says and measure its perplexity."""
    from ..evaluate import perplexity

    m = copy.deepcopy(model)
    t0, c0 = time.perf_counter(), time.process_time()
    if cell.method == "rtn":
        _rtn(m, cell, settings)
    elif cell.method == "gptq":
        _gptq(m, tok, cell, settings)
    elif cell.method == "awq":
        _awq(m, tok, cell, settings)
    else:
        raise ValueError(f"unknown method {cell.method!r}")
    tq = time.perf_counter() - t0
    r = perplexity(m, ids, seqlen=settings.seqlen, windows=settings.windows, progress=False)
    del m
    return {"method": cell.method, "format": cell.fmt, "mode": cell.mode, "scale_search": cell.search or "minmax",
            "bits": cell.bits, "group_size": cell.group_size, "ppl": r.ppl, "nll": r.nll, "tokens": r.tokens,
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
