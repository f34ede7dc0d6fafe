"""The model card: a README.md in every checkpoint folder we write.

:func:`with_model_card` wraps a checkpoint's ``extra_writer`` (``afpq_plugins.model.save_quantized``
calls it once), so the card is written into the same temporary folder as the tensors and
appears atomically with them. The card states what a user publishing the folder needs:
format, bits per weight (measured on the layers' stored tensors), group size, mode, layout,
method and engine, scale search, calibration, the command line, perplexities when known, and
how to load it with transformers, vLLM and lm-eval.

What only the caller knows (the command line, the calibration, measured perplexities) comes
from :func:`card_context`, which the CLI wraps around its save; the Python API gets a card
that says "written from Python" and "calibration: not recorded" unless it does the same.
An existing README.md (say, the source model's card copied by an engine) is kept.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import shlex
from typing import Callable, Dict, Iterator, Optional

import torch

__all__ = ["card_context", "with_model_card", "render_card", "bits_per_weight", "CARD_NAME"]

CARD_NAME = "README.md"
_CONTEXT: contextvars.ContextVar[dict] = contextvars.ContextVar("afpq_card_context", default={})

_MODES = {
    "afpq": "AFPQ: two scales per group, one for the positive and one for the negative weights",
    "sym": "symmetric: one absmax scale per group",
    "zp": "scale + zero-point per group (the INT baseline)",
}


@contextlib.contextmanager
def card_context(command: Optional[str] = None, calibration: Optional[str] = None, source: Optional[str] = None,
                 perplexity: Optional[Dict[str, float]] = None) -> Iterator[None]:
    """Facts for the cards written inside this block (``perplexity``: label -> value)."""
    ctx = {k: v for k, v in dict(command=command, calibration=calibration, source=source,
                                 perplexity=perplexity).items() if v}
    token = _CONTEXT.set({**_CONTEXT.get(), **ctx})
    try:
        yield
    finally:
        _CONTEXT.reset(token)


def command_line(argv) -> str:
    """``afpq ARGS`` as a shell would take it."""
    return "afpq " + " ".join(shlex.quote(str(a)) for a in argv)


def bits_per_weight(model, qc) -> Optional[float]:
    """Stored bits of the quantized layers (codes, scales, zeros as stored) per weight they replace,
    from each layer's settings (per-module ones included) and shape; g_idx and biases are not
    counted. Works on a meta-device model (the streaming writer's)."""
    from .nn.skeleton import linear_dims

    stored = weights = 0
    for name in qc.quantized_modules:
        try:
            m = model.get_submodule(name)
            in_f, out_f = (m.in_features, m.out_features) if hasattr(m, "qweight") else linear_dims(m, name)
        except (AttributeError, ValueError):
            return None
        spec = qc.spec_for(name)  # as stored: zero-points are kept in the scale dtype, like the scales
        params = 1 if spec.mode == "sym" else 2
        scale_bits = torch.finfo(spec.torch_scale_dtype).bits
        stored += out_f * in_f * spec.bits + out_f * spec.groups(in_f) * params * scale_bits
        weights += in_f * out_f
    return stored / weights if weights else None


def render_card(qc, model=None, folder_name: str = "CHECKPOINT", context: Optional[dict] = None) -> str:
    """The card's markdown for checkpoint config ``qc`` (an ``AFPQConfigDict``)."""
    from .core.version import VERSION

    ctx = dict(_CONTEXT.get() if context is None else context)
    extra = dict(qc.extra)
    bpw = bits_per_weight(model, qc) if model is not None else None
    search = extra.get("scale_search") or {"method": "minmax"}
    search_name = search.get("method", "minmax") if isinstance(search, dict) else str(search)
    engine = extra.get("quantizer") or ("afpq_plugins core" if qc.method == "rtn" else "not recorded")
    group = "whole rows (-1)" if qc.group_size == -1 else str(qc.group_size)
    calib = ctx.get("calibration") or ("none (round to nearest)" if qc.method == "rtn" and search_name != "output"
                                       else "not recorded (written from Python)")
    command = ctx.get("command", "written from Python (afpq_plugins.model.save_quantized)")
    rows = [
        ("format", f"`{qc.format}` ({qc.bits}-bit grid: {', '.join(f'{v:g}' for v in (qc.table or [])[:16])})"),
        ("bits per weight", f"{bpw:.3f} (codes + {qc.scale_dtype} group parameters, quantized layers)"
         if bpw is not None else "not measured"),
        ("group size", group),
        ("mode", f"`{qc.mode}`: {_MODES.get(qc.mode, qc.mode)}"),
        ("layout", f"`{qc.layout}` packing" + (", act-order (desc_act)" if qc.desc_act else "")),
        ("method", f"`{qc.method}` through {engine}"),
        ("scale search", f"`{search_name}`"),
        ("calibration", calib),
        ("quantized layers", f"{len(qc.quantized_modules)}; kept in float: "
                             f"{', '.join(qc.modules_to_not_convert) or 'none'}"),
        ("written by", f"afpq-plugins {VERSION}"),
    ]
    if qc.modules:  # per-module settings (afpq quantize --bits-budget): the top-level row is the commonest
        shares = (qc.extra.get("allocation") or {}).get("shares") or {}
        mix = ", ".join(f"{k} {v:.0%}" for k, v in shares.items()) or f"{len(qc.modules)} modules differ"
        budget = qc.extra.get("bits_budget")
        rows.insert(2, ("per-module settings", (f"chosen under a budget of {budget} bits/weight: " if budget else "")
                        + mix + " of the weights (quantization_config.modules)"))
    if ctx.get("source"):
        rows.insert(0, ("source model", f"`{ctx['source']}`"))
    ppl = ctx.get("perplexity") or {}
    lines = [
        "---",
        "library_name: transformers",
        f"tags: [afpq, quantized, {qc.format}, {qc.bits}-bit]",
        "---",
        "",
        f"# {folder_name}: AFPQ {qc.format} g{qc.group_size} ({qc.method})",
        "",
        "A checkpoint in the AFPQ format (asymmetric floating-point quantization, arXiv 2311.01792), written by "
        "afpq-plugins. Stock loaders refuse it by design (they would "
        "read the codes as INT); install `afpq-plugins` to load it.",
        "",
        "| setting | value |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in rows],
        "",
        "Made with:",
        "",
        "```sh",
        command,
        "```",
        "",
        "## Perplexity",
        "",
    ]
    if ppl:
        lines += ["| model | perplexity |", "|---|---|", *[f"| {k} | {v:.3f} |" for k, v in ppl.items()], ""]
    else:
        lines += [f"Not measured when written. `afpq eval {folder_name}` gives the perplexity on Pride and "
                  "Prejudice (the embedded evaluation text); `afpq eval BASE_MODEL` the float model's.", ""]
    lines += [
        "## Load",
        "",
        "transformers (the installed package registers `quant_method \"afpq\"`; no import needed):",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        f"model = AutoModelForCausalLM.from_pretrained(\"{folder_name}\")",
        f"tok = AutoTokenizer.from_pretrained(\"{folder_name}\")",
        "```",
        "",
        "vLLM (the plugin registers through the `vllm.general_plugins` entry point):",
        "",
        "```python",
        "from vllm import LLM",
        f"llm = LLM(model=\"{folder_name}\")",
        "```",
        "",
        "lm-eval (`pip install lm-eval`; the task files ship with afpq-plugins):",
        "",
        "```sh",
        f"lm_eval --model hf --model_args pretrained={folder_name} --tasks afpq_pride_ppl "
        "--include_path $(python -m afpq_plugins.lm_eval_tasks)",
        "```",
        "",
    ]
    return "\n".join(lines)


def with_model_card(extra_writer: Optional[Callable[[str], None]], model, qc,
                    out_dir: Optional[str] = None) -> Callable[[str], None]:
    """``extra_writer`` followed by writing the card into the same (temporary) folder."""

    def write(tmp: str) -> None:
        if extra_writer is not None:
            extra_writer(tmp)
        path = os.path.join(tmp, CARD_NAME)
        if os.path.exists(path):
            return
        name = os.path.normpath(out_dir) if out_dir else "CHECKPOINT"
        with open(path, "w", encoding="utf-8") as f:
            f.write(render_card(qc, model, name))

    return write
