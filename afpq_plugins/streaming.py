"""Streaming RTN: a float model's safetensors shards in, AFPQ shards out, one tensor at a time.

The model's structure comes from its ``config.json``, built on the meta device (nothing
allocated): the Linears to quantize are :func:`afpq_plugins.model.find_linears`' (the
in-memory RTN's choice) and each is checked once by
:func:`afpq_plugins.nn.skeleton.plan_skeleton`. The source is read through
:class:`~afpq_plugins.core.checkpoint.CheckpointSnapshot` (one version of the folder, strict
headers, ``pread`` of one tensor at a time); each Linear weight is quantized by the same
:meth:`AFPQLinear.from_linear` as the in-memory path (same bytes, tested) and handed to
:func:`~afpq_plugins.core.checkpoint.checkpoint_writer`, which writes a shard as soon as it is
full. Peak memory: about one tensor in float32 plus its quantization temporaries plus one
output shard, whatever the depth of the model.

Float tensors keep their source dtype unless ``dtype`` is given. A tied output head that is
quantized is untied on purpose (its weight is read from the embedding, which stays float).
The ``output`` scale search streams one decoder layer at a time on calibration samples
(:mod:`afpq_plugins.streaming_output`). What cannot stream (a pickled ``.bin`` source, keys
the architecture does not know, such as a per-expert MoE checkpoint that transformers 5 fuses
on load, the output search without calibration samples or on decoder layers of mixed types)
raises :class:`NotStreamable`, and the CLI says why and takes the in-memory path.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch import nn

from .core.checkpoint import (
    AFPQConfigDict,
    CheckpointError,
    DEFAULT_MAX_SHARD_SIZE,
    CheckpointSnapshot,
    checkpoint_writer,
    parse_size,
    with_refusal_placeholders,
)
from .core.quantize import check_finite
from .core.spec import QuantSpec

__all__ = ["NotStreamable", "StreamResult", "quantize_rtn_streaming", "source_dtype", "Coverage", "coverage",
           "DTYPE_NAMES", "stream_cli"]

DTYPE_NAMES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class NotStreamable(ValueError):
    """The source cannot be quantized tensor by tensor (the message says why)."""


@dataclass
class StreamResult:
    qc: AFPQConfigDict
    path: str
    written_dtype: Optional[torch.dtype]
    source_bytes: int = 0
    seconds: float = 0.0
    coverage: Optional["Coverage"] = None


# -- what stays float -----------------------------------------------------------------------------
@dataclass
class Coverage:
    """Which weights a run quantizes and which stay float (printed before and after a run)."""

    total_params: int
    quantized: List[str]
    fused_experts: Dict[str, int] = field(default_factory=dict)  # module -> parameters in 3-D expert tensors
    float_linears: Dict[str, int] = field(default_factory=dict)  # Linear modules left float (skip list)

    @property
    def fused_params(self) -> int:
        return sum(self.fused_experts.values())

    def before_line(self) -> str:
        share = 100.0 * self.fused_params / max(self.total_params, 1)
        parts = []
        if self.fused_experts:
            first = next(iter(self.fused_experts))
            parts.append(f"{len(self.fused_experts)} fused 3-D expert module(s) ({first}, ...) stay FLOAT: "
                         f"{share:.1f}% of the model's parameters (this version quantizes nn.Linear experts only)")
        if self.float_linears:
            n = sum(self.float_linears.values())
            parts.append(f"{len(self.float_linears)} Linear(s) skipped ({', '.join(list(self.float_linears)[:3])}"
                         f"{', ...' if len(self.float_linears) > 3 else ''}): "
                         f"{100.0 * n / max(self.total_params, 1):.1f}% of the parameters")
        return "float: " + ("; ".join(parts) if parts else "nothing but embeddings and norms")

    def summary_line(self) -> str:
        experts = sum(1 for n in self.quantized if ".experts." in n or ".experts" == n[-8:])
        return (f"quantized {len(self.quantized)} layers: {experts} expert and {len(self.quantized) - experts} "
                f"non-expert; {len(self.fused_experts)} fused expert module(s) left float")

    def require_all(self) -> None:
        if self.fused_experts:
            share = 100.0 * self.fused_params / max(self.total_params, 1)
            raise ValueError(
                f"--require-all: {len(self.fused_experts)} fused 3-D expert module(s) cannot be quantized by this "
                f"version and would stay float ({next(iter(self.fused_experts))}, ...; {share:.1f}% of the parameters)"
            )


def coverage(model: nn.Module, quantized: Sequence[str], skip: Sequence[str] = ()) -> Coverage:
    """What :func:`quantize_rtn_streaming` (or an engine quantizing ``quantized``) leaves float:
    modules holding 3-D parameters (transformers 5's fused ``experts.gate_up_proj`` /
    ``down_proj``) and the skipped Linears. Works on a meta model."""
    from .core.spec import is_skipped

    qset = set(quantized)
    total = sum(p.numel() for p in model.parameters())
    fused: Dict[str, int] = {}
    float_linears: Dict[str, int] = {}
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and name not in qset and is_skipped(name, skip):
            float_linears[name] = mod.weight.numel()
        n3 = sum(p.numel() for p in mod.parameters(recurse=False) if p.dim() >= 3)
        if n3 and not isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            fused[name] = n3
    return Coverage(total, list(quantized), fused, float_linears)


# -- the source -----------------------------------------------------------------------------------
def source_dtype(snap: CheckpointSnapshot, keys=None) -> Optional[torch.dtype]:
    """The most common float dtype (by element count) of the source's tensors (``keys``: only those)."""
    count: Dict[torch.dtype, int] = {}
    for k in (keys if keys is not None else snap.keys()):
        dt = snap.dtype(k)
        if dt.is_floating_point:
            n = 1
            for d in snap.shape(k):
                n *= d
            count[dt] = count.get(dt, 0) + n
    return max(count, key=lambda d: (count[d], d == torch.float32)) if count else None


def source_meta_model(snap: CheckpointSnapshot):
    from .model import build_meta_model

    config = snap.config
    if isinstance(config.get("quantization_config"), dict):
        raise NotStreamable(f"{snap.config_path}: the source is already quantized "
                            f"(quant_method {config['quantization_config'].get('quant_method')!r})")
    return build_meta_model(config, snap.config_path)


def _weight_sources(snap: CheckpointSnapshot, model: nn.Module, names: Sequence[str]) -> Dict[str, str]:
    """``{model state-dict key: source key}``; tied keys absent from the source map to their
    partner (a quantized tied head reads the embedding). :class:`NotStreamable` when the
    source keys are not the architecture's."""
    from .nn.skeleton import tied_parameter_names

    sd_keys = set(model.state_dict())
    src_keys = set(snap.keys())
    unknown = sorted(src_keys - sd_keys)
    if unknown:
        raise NotStreamable(f"{snap.source(unknown[0])}: tensor {unknown[0]!r} is not a {type(model).__name__} "
                            f"tensor (a checkpoint layout transformers converts on load)")
    mapping = {k: k for k in src_keys}
    tied = tied_parameter_names(model)
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    emb_key = next((f"{n}.weight" for n, m in model.named_modules() if m is emb), None) if emb is not None else None
    for key in tied:
        if key not in src_keys and key[: -len(".weight")] in set(names):
            if emb_key is None or emb_key not in src_keys:
                raise NotStreamable(f"{snap.path}: tied output head {key!r} without an input embedding to read")
            mapping[key] = emb_key
    missing = sorted(sd_keys - set(mapping) - tied)
    if missing:
        raise NotStreamable(f"{snap.path}: tensor {missing[0]!r} of {type(model).__name__} is not in the source")
    return mapping


# -- the run --------------------------------------------------------------------------------------
def quantize_rtn_streaming(
    src: str,
    out_dir: str,
    spec: QuantSpec,
    *,
    dtype: Optional[torch.dtype] = None,
    device="cpu",
    max_shard_size=None,
    overwrite: bool = False,
    tokenizer=None,
    progress: bool = False,
    require_all: bool = False,
    log: Optional[Callable[[str], None]] = None,
    calibration: Optional[Sequence[torch.Tensor]] = None,
) -> StreamResult:
    """RTN-quantize the float model folder ``src`` into the AFPQ checkpoint ``out_dir``,
    tensor by tensor (see the module docstring). ``dtype``: the float tensors' dtype in the
    checkpoint (default: each keeps its source dtype); quantization computes in float32 on
    ``device``. Everything that can be checked (config, architecture, every header, each
    layer's geometry, the coverage) is checked before the first byte is written; an error
    later (a non-finite weight) discards the temporary folder and leaves ``out_dir`` as it was.

    The output scale search (``spec.scale_search`` ``"output"``) runs one decoder layer at a
    time on ``calibration`` (token-id samples, e.g. :func:`afpq_plugins.rtn.calibration_samples`):
    :mod:`afpq_plugins.streaming_output`; calibration computes in ``dtype`` (default float32)."""
    from .core.output_search import is_output_search
    from .card import with_model_card
    from .model import checkpoint_model_config, extra_files_writer, find_linears, untie_quantized_head
    from .nn import AFPQLinear
    from .nn.skeleton import plan_skeleton

    spec = spec.resolved("rtn")
    output = is_output_search(spec.scale_search)
    if output and calibration is None:
        raise NotStreamable("the output scale search needs calibration activations: pass calibration "
                            "(token-id samples) to run it layer by layer")
    t0 = time.perf_counter()
    with CheckpointSnapshot(src) as snap:
        snap.headers()  # strict, every file, before anything else
        model = source_meta_model(snap)
        linears = find_linears(model, spec.skip)
        if not linears:
            raise ValueError("no nn.Linear layers to quantize (check the skip list)")
        names = list(linears)
        cov = coverage(model, names, spec.skip)
        if require_all:
            cov.require_all()
        qc = AFPQConfigDict.from_spec(spec, "rtn", quantized_modules=names)
        plan = plan_skeleton(model, qc, names, source=snap.weights_path, spec=spec)  # one check per layer
        mapping = _weight_sources(snap, model, names)
        weight_of = {f"{n}.weight": n for n in names}
        for key, name in weight_of.items():  # the source's shapes and dtypes, before writing
            sk = mapping.get(key)
            lp = plan[name]
            if sk is None:
                raise CheckpointError(f"{snap.path}: weight {key!r} of quantized layer {name!r} is not in the source")
            if snap.shape(sk) != (lp.out_features, lp.in_features):
                raise CheckpointError(f"{snap.source(sk)}: tensor {sk!r} has shape {snap.shape(sk)}, "
                                      f"expected {(lp.out_features, lp.in_features)} for layer {name!r}")
            if not snap.dtype(sk).is_floating_point:
                raise CheckpointError(f"{snap.source(sk)}: tensor {sk!r} is stored as {snap.dtype(sk)}, "
                                      "not a float weight")
        for k in mapping:
            if k not in weight_of and not snap.dtype(mapping[k]).is_floating_point:
                ref = model.state_dict()[k]
                if ref.is_floating_point():
                    raise CheckpointError(f"{snap.source(mapping[k])}: tensor {k!r} is stored as "
                                          f"{snap.dtype(mapping[k])}, but the model holds a float tensor there")
        float_keys = [k for k in mapping if k not in weight_of]
        written = dtype or source_dtype(snap, [mapping[k] for k in float_keys]) or torch.float32
        lplan = None
        if output:
            from .model import config_from_dict
            from .streaming_output import plan_layers

            lplan = plan_layers(config_from_dict(snap.config, snap.config_path), names, NotStreamable)
        untie_quantized_head(model, names)
        cfg = checkpoint_model_config(model, qc, dtype=written)
        extra = with_model_card(extra_files_writer(model, tokenizer, os.path.abspath(src)), model, qc, out_dir)
        if log is not None:
            how = ("layer by layer (output search: calibration in "
                   f"{dtype or torch.float32}, {len(calibration)} samples, float activations propagated)"
                   if output else "tensor by tensor")
            log(f"afpq quantize: rtn streaming {how} from {src} ({len(snap.files)} file(s), source dtype "
                f"{source_dtype(snap)}); quantization in float32 on {device}; float tensors written as "
                f"{dtype or 'their source dtype'}; shards of at most "
                f"{parse_size(max_shard_size or DEFAULT_MAX_SHARD_SIZE) / 1e6:,.1f} MB")
            log(cov.before_line())
        # source order: sequential reads of each shard
        order = sorted(mapping, key=lambda k: (snap.files.index(snap.source(mapping[k])),
                                               snap.headers()[mapping[k]][1]["data_offsets"][0], k))
        captured = None
        if output:  # the first decoder layer's inputs, before anything is written
            from .streaming_output import capture

            captured = capture(lplan, snap, mapping, calibration, device=device, compute_dtype=dtype or torch.float32)
            layered = {k for k in order if lplan.layer_of(k) is not None
                       or (lplan.head is not None and weight_of.get(k) == lplan.head)}
            order = [k for k in order if k not in layered]
        it = order
        if progress and not output:
            from tqdm.auto import tqdm

            it = tqdm(order, desc=f"RTN (streaming) {spec.describe()}", unit="tensor")
        read = 0
        with checkpoint_writer(out_dir, cfg, qc, extra_writer=extra, overwrite=overwrite,
                               max_shard_size=max_shard_size) as w:
            for key in it:
                sk = mapping[key]
                t = snap.read(sk)
                read += t.numel() * t.element_size()
                name = weight_of.get(key)
                if name is None:
                    w.add(key, t.to(dtype) if dtype is not None and t.is_floating_point() else t)
                    continue
                wt = t.to(device=device, dtype=torch.float32)
                del t
                check_finite(wt, key)
                lp = plan[name]
                lin = nn.Linear(lp.in_features, lp.out_features, bias=False, device="meta")
                lin.weight = nn.Parameter(wt, requires_grad=False)
                layer = AFPQLinear.from_linear(lin, name=name, spec=spec, geometry=lp.geometry)
                del lin, wt
                layer_tensors = {f"{name}.{k}": v.detach().cpu() for k, v in layer.state_dict().items()}
                del layer
                for k, v in sorted(with_refusal_placeholders(layer_tensors, [name]).items()):
                    w.add(k, v)
            if output:
                from .streaming_output import run_layers

                read += sum(snap.headers()[mapping[k]][1]["data_offsets"][1]
                            - snap.headers()[mapping[k]][1]["data_offsets"][0] for k in layered)
                run_layers(lplan, snap, mapping, weight_of, plan, spec, captured, w.add, dtype=dtype, device=device,
                           compute_dtype=dtype or torch.float32, progress=progress)
    seconds = time.perf_counter() - t0
    res = StreamResult(qc, w.path, written, read, seconds, cov)
    return res


def stream_cli(args, spec: QuantSpec, dtype, max_shard: int, note: Callable[[str], None], calib=None) -> int:
    """``afpq quantize --method rtn``'s streaming run (:class:`NotStreamable`: the CLI takes
    the in-memory path). ``calib``: the :class:`~afpq_plugins.methods.Calibration` of the
    output search (its samples are tokenized here, with the source's tokenizer)."""
    from .core.output_search import is_output_search
    from .data import resolve_model

    path = str(resolve_model(args.model))
    with CheckpointSnapshot(path) as snap:
        if not snap.has_files:
            raise NotStreamable(f"{path} has no safetensors weights (pickled .bin weights are loaded whole)")
    samples = None
    if is_output_search(spec.scale_search) and calib is not None:
        from transformers import AutoTokenizer

        from .rtn import calibration_samples

        samples = calibration_samples(AutoTokenizer.from_pretrained(path, trust_remote_code=False), calib)
    res = quantize_rtn_streaming(path, args.out, spec, dtype=dtype, device=args.device, max_shard_size=max_shard,
                                 overwrite=args.overwrite, progress=not args.quiet, require_all=args.require_all,
                                 log=note, calibration=samples)
    qc, mb = res.qc, res.source_bytes / 1e6
    print(f"quantized {len(qc.quantized_modules)} layers of {path} with rtn {spec.fmt}/{spec.mode} group "
          f"{spec.group_size} layout {qc.layout} -> {res.path} (streaming: read {mb:.1f} MB in {res.seconds:.1f}s, "
          f"{mb / max(res.seconds, 1e-9):.1f} MB/s)")
    note(res.coverage.summary_line())
    return 0
