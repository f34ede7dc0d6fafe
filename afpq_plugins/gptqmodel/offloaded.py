"""GPTQ and AWQ through GPTQModel at size: its layer offload on, the checkpoint written tensor by tensor.

With ``offload_to_disk`` GPTQModel builds the model on the meta device and onloads one decoder
layer at a time from the source checkpoint (its "turtle" model); each finished layer, and the
modules outside the decoder layers (the input embedding), go to an offload folder on disk
(accelerate's disk-offload hooks). The model object that comes back therefore holds almost
nothing: most of its tensors are on the meta device. :func:`quantize_offloaded` runs that and
writes the AFPQ checkpoint from where each tensor really is, one at a time (:mod:`.offload_io`).

The offload folder is a hidden sibling of ``out_dir`` (the output's disk, never ``/tmp``, which
may be memory), removed afterwards. The write is the checkpoint writer's (atomic, sharded).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from typing import Callable, Optional

import torch

from ..core.checkpoint import CheckpointSnapshot, DEFAULT_MAX_SHARD_SIZE, check_replaceable, parse_size
from ..core.spec import QuantSpec
from .offload_io import offloaded_tensor_reader, write_offloaded

__all__ = ["quantize_offloaded", "offloaded_cli", "offloaded_tensor_reader", "write_offloaded"]


def quantize_offloaded(
    src: str,
    out_dir: str,
    spec: QuantSpec,
    calib,
    method: str = "gptq",
    *,
    dtype: Optional[torch.dtype] = None,
    compute_dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    max_shard_size=None,
    overwrite: bool = False,
    require_all: bool = False,
    log: Optional[Callable[[str], None]] = None,
    desc_act: bool = False,
    static_groups: bool = False,
    true_sequential: bool = True,
    damp_percent: Optional[float] = None,
    clip: str = "symmetric",
    progress: bool = True,
):
    """GPTQModel's GPTQ or AWQ (``method``) with ``spec``'s grid on the float model folder ``src``
    with GPTQModel's layer offload, written as the AFPQ checkpoint ``out_dir``.

    ``calib``: a resolved :class:`~afpq_plugins.methods.Calibration`. ``compute_dtype``: the dtype
    GPTQModel loads each layer in (calibration and quantization); ``dtype``: the float tensors'
    dtype in the checkpoint (default: the source's). ``device``: GPTQModel's device. Returns a
    :class:`~afpq_plugins.streaming.StreamResult`."""
    from ..model import find_linears
    from ..streaming import NotStreamable, StreamResult, source_meta_model, coverage, source_dtype
    from . import api

    t0 = time.perf_counter()
    src = os.path.abspath(src)
    check_replaceable(os.path.abspath(out_dir), overwrite)  # before the long run, not only when writing
    with CheckpointSnapshot(src) as snap:
        if not snap.has_files:
            raise NotStreamable(f"{src} has no safetensors weights (pickled .bin weights are loaded whole)")
        snap.headers()  # strict, every file, before anything runs
        meta = source_meta_model(snap)
        why = api.supported_model_type(meta)
        if why:
            raise NotStreamable(why)
        if tuple(spec.skip) != ("lm_head",):
            raise ValueError("--backend gptqmodel quantizes the decoder layers and keeps lm_head in float "
                             "(GPTQModel's layer lists); --skip is not supported")
        cov = coverage(meta, list(find_linears(meta, spec.skip)), spec.skip)
        if require_all:
            cov.require_all()
        if cov.fused_experts:  # GPTQModel's loader would unfuse them: a layout no AFPQ loader reads yet
            raise NotStreamable(f"{len(cov.fused_experts)} fused 3-D expert module(s) "
                                f"({next(iter(cov.fused_experts))}, ...), which GPTQModel's offloading loader unfuses")
        written = dtype or source_dtype(snap) or torch.float32
        if log is not None:
            from ..progress import decoder_layers

            nl = decoder_layers(meta)
            log(f"afpq quantize: {method} through gptqmodel, layer offload on (one decoder layer in memory at a "
                f"time), from {src} ({len(snap.files)} file(s), source dtype {source_dtype(snap)}, "
                f"{len(nl) if nl is not None else '?'} decoder layers); calibration {calib.nsamples} x {calib.seqlen} "
                f"tokens (--nsamples/--calib-seqlen) and quantization in {compute_dtype} on {device}; float tensors "
                f"written as {written}; shards of at most "
                f"{parse_size(max_shard_size or DEFAULT_MAX_SHARD_SIZE) / 1e6:,.1f} MB")
            log(cov.before_line())

    out_abs = os.path.abspath(out_dir)
    os.makedirs(os.path.dirname(out_abs), exist_ok=True)
    offload = tempfile.mkdtemp(prefix=f".{os.path.basename(out_abs)}.offload-", dir=os.path.dirname(out_abs))
    try:
        kw = dict(bits=spec.bits, group_size=spec.group_size, desc_act=desc_act, true_sequential=true_sequential,
                  method=method, offload_to_disk=True, offload_to_disk_path=offload)
        if method == "gptq":
            kw["static_groups"] = static_groups
            if damp_percent is not None:
                kw["damp_percent"] = damp_percent
        cfg = api.QuantizeConfig(fmt=spec.fmt, mode=spec.mode, scale_dtype=spec.scale_dtype,
                                 scale_search=spec.scale_search, layout=spec.layout_for(method), clip=clip, **kw)
        qmodel = api.GPTQModel.load(src, cfg, dtype=compute_dtype, device=device)
        if not qmodel.quantize_config.offload_to_disk:
            raise NotStreamable(f"GPTQModel turned its layer offload off for {type(qmodel.model).__name__}")
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(src, trust_remote_code=False)  # (GPTQModel's own wrapper cannot be passed back)
        rows = [{"input_ids": s.tolist(), "attention_mask": [1] * s.numel()} for s in calib.samples(tok)]
        timer = contextlib.nullcontext()
        if progress and log is not None and torch.device(device).type == "cpu":
            from ..progress import FirstLayerTimer

            timer = FirstLayerTimer(qmodel.model, log)
        with timer:
            qc = qmodel.quantize(rows, tokenizer=tok, batch_size=1)
        path, n_read = write_offloaded(qmodel.model, out_dir, qc, src, tokenizer=tok, dtype=written,
                                       max_shard_size=max_shard_size, overwrite=overwrite)
    finally:
        shutil.rmtree(offload, ignore_errors=True)
    cov = coverage(meta, qc.quantized_modules, spec.skip)  # what GPTQModel did quantize
    return StreamResult(qc, path, written, n_read, time.perf_counter() - t0, cov)


def offloaded_cli(args, method, spec: QuantSpec, dtype, max_shard: int, note: Callable[[str], None], calib,
                  options: dict) -> int:
    """``afpq quantize --method gptq|awq`` with GPTQModel (:class:`~afpq_plugins.streaming.NotStreamable`:
    the CLI takes the in-memory path). ``options``: the method's options from the flags."""
    from ..data import resolve_model

    path = str(resolve_model(args.model))
    opts = {k: v for k, v in options.items() if k in ("desc_act", "static_groups", "true_sequential",
                                                      "damp_percent", "clip", "progress")}
    res = quantize_offloaded(path, args.out, spec, calib, method.name, dtype=dtype,
                             compute_dtype=dtype or torch.float32, device=args.device, max_shard_size=max_shard,
                             overwrite=args.overwrite, require_all=args.require_all, log=note, **opts)
    qc = res.qc
    print(f"quantized {len(qc.quantized_modules)} layers of {path} with {method.name} {qc.spec.fmt}/{qc.spec.mode} "
          f"group {qc.spec.group_size} layout {qc.layout} -> {res.path} (GPTQModel with layer offload: "
          f"{res.seconds:.1f}s)")
    note(res.coverage.summary_line())
    return 0
