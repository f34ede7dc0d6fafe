"""GPTQ and AWQ through GPTQModel at size: its layer offload on, the checkpoint written tensor by tensor.

With ``offload_to_disk`` GPTQModel builds the model on the meta device and onloads one decoder
layer at a time from the source checkpoint (its "turtle" model); each finished layer, and the
modules outside the decoder layers (the input embedding), go to an offload folder on disk
(accelerate's disk-offload hooks). The model object that comes back therefore holds almost
nothing: most of its tensors are on the meta device. :func:`quantize_offloaded` runs that and
writes the AFPQ checkpoint from where each tensor really is, one at a time:

- a module with accelerate's disk hook: its ``weights_map`` (the offload folder, memory-mapped);
- a tensor on the meta device without a hook (GPTQModel leaves the output head in the source):
  the source checkpoint (:class:`~afpq_plugins.core.checkpoint.CheckpointSnapshot`, strict reads);
- anything else: the tensor in memory (norms, rotary buffers).

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

from ..core.checkpoint import CheckpointError, CheckpointSnapshot, DEFAULT_MAX_SHARD_SIZE, checkpoint_writer, parse_size
from ..core.checkpoint_schema import with_refusal_placeholders
from ..core.constants import LAYER_PARAM_SUFFIXES
from ..core.spec import QuantSpec

__all__ = ["quantize_offloaded", "offloaded_tensor_reader"]


def _hook_weights_map(module):
    """The accelerate disk-offload ``weights_map`` of ``module``'s hook, or None."""
    hook = getattr(module, "_hf_hook", None)
    if hook is None:
        return None
    for h in getattr(hook, "hooks", None) or [hook]:
        wm = getattr(h, "weights_map", None)
        if wm is not None and getattr(h, "offload", False):
            return wm
    return None


def offloaded_tensor_reader(model, snap: Optional[CheckpointSnapshot] = None):
    """``(keys, read)`` of ``model``'s state dict where its tensors may be offloaded: ``keys``
    (state-dict order, tied duplicates dropped), ``read(key)`` the tensor on the CPU, from memory,
    the module's disk-offload map or ``snap`` (the source checkpoint). A tensor found in none of
    them is a :class:`CheckpointError` naming it."""
    from ..nn.skeleton import tied_parameter_names

    tied = tied_parameter_names(model)
    modules = dict(model.named_modules())
    sd = model.state_dict(keep_vars=True)
    keys = [k for k in sd if k not in tied]
    src_keys = set(snap.keys()) if snap is not None else set()

    def read(key: str) -> torch.Tensor:
        t = sd[key]
        if t.device.type != "meta":
            return t.detach().cpu()
        owner, _, leaf = key.rpartition(".")
        wm = _hook_weights_map(modules.get(owner))
        if wm is not None:
            try:
                return wm[leaf].detach().cpu()
            except KeyError:
                pass
        if key in src_keys:
            return snap.read(key)
        raise CheckpointError(f"tensor {key!r} ({tuple(t.shape)}, {t.dtype}) is on the meta device after "
                              "GPTQModel's run and neither its offload folder nor the source checkpoint has it")

    return keys, read


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
    from ..streaming import NotStreamable, StreamResult, _meta_model, coverage, source_dtype
    from . import api

    t0 = time.perf_counter()
    src = os.path.abspath(src)
    with CheckpointSnapshot(src) as snap:
        if not snap.has_files:
            raise NotStreamable(f"{src} has no safetensors weights (pickled .bin weights are loaded whole)")
        snap.headers()  # strict, every file, before anything runs
        meta = _meta_model(snap)
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


def write_offloaded(model, out_dir: str, qc, src: str, tokenizer=None, dtype: Optional[torch.dtype] = None,
                    max_shard_size=None, overwrite: bool = False):
    """Write ``model`` (GPTQModel's, after an offloaded run; AFPQ layers in place) as the AFPQ
    checkpoint ``out_dir``, one tensor at a time (:func:`offloaded_tensor_reader`; ``src``: the
    source model folder, for the tensors GPTQModel left there). ``dtype``: the float tensors
    outside the quantized layers are written in it (default: the source's commonest float dtype). Returns ``(path, bytes read)``."""
    from ..card import with_model_card
    from ..model import checkpoint_model_config, extra_files_writer

    from ..streaming import _meta_model, source_dtype

    quant_keys = {f"{n}.{s}" for n in qc.quantized_modules for s in LAYER_PARAM_SUFFIXES}
    with CheckpointSnapshot(src) as snap:
        keys, read = offloaded_tensor_reader(model, snap)
        written = dtype or source_dtype(snap) or torch.float32
        # config.json from the source's config (as transformers reads it), not from GPTQModel's model,
        # whose config GPTQModel has rewritten for its run (Gemma 3's per-layer-type RoPE, e.g.)
        ref = _meta_model(snap)
        ref.generation_config = getattr(model, "generation_config", None) or ref.generation_config
        pad = getattr(getattr(model, "config", None), "pad_token_id", None)
        if getattr(ref.config, "pad_token_id", None) is None and pad is not None:
            ref.config.pad_token_id = pad  # GPTQModel sets it for padding calibration rows (as in memory)
        cfg_json = checkpoint_model_config(ref, qc, dtype=written)
        extra = with_model_card(extra_files_writer(ref, tokenizer, src), ref, qc, out_dir)
        placeholders = with_refusal_placeholders({}, qc.quantized_modules)
        n_read = 0
        with checkpoint_writer(out_dir, cfg_json, qc, extra_writer=extra, overwrite=overwrite,
                               max_shard_size=max_shard_size) as w:
            for key in sorted(set(keys) | set(placeholders)):
                if key in placeholders:
                    w.add(key, placeholders[key])
                    continue
                t = read(key)
                n_read += t.numel() * t.element_size()
                if t.is_floating_point() and key not in quant_keys and t.dtype != written:
                    t = t.to(written)
                w.add(key, t)
                del t
    return w.path, n_read


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
