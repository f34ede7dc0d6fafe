"""Model-level work: RTN quantization of a model's Linears, save and load.

Module swapping and the state dict are torch only; reading the model's config,
building the architecture and copying the tokenizer use transformers, imported
lazily.
"""

from __future__ import annotations

import logging
import os
import shutil
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .card import with_model_card
from .core.checkpoint import (
    AFPQConfigDict,
    CheckpointError,
    CheckpointSnapshot,
    is_afpq_checkpoint,
    placeholder_keys,
    quantized_module_names,
    validate_layer_tensors,
    write_checkpoint,
)
from .core.constants import LAYER_PARAM_SUFFIXES
from .core.quantize import check_finite
from .core.spec import DEFAULT_SKIP, QuantSpec, is_skipped
from .nn import AFPQLinear
from .nn.skeleton import build_skeleton, plan_skeleton, set_module, tied_parameter_names

__all__ = [
    "DEFAULT_SKIP",
    "config_from_dict",
    "find_linears",
    "quantize_model_rtn",
    "save_quantized",
    "load_quantized",
    "is_afpq_checkpoint",
    "prepare_layers",
]

log = logging.getLogger(__name__)

_TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "generation_config.json",
)


def find_linears(model: nn.Module, skip: Sequence[str] = DEFAULT_SKIP) -> Dict[str, nn.Linear]:
    """``{name: module}`` of the ``nn.Linear`` layers to quantize, in model order."""
    return {
        name: mod for name, mod in model.named_modules()
        if isinstance(mod, nn.Linear) and not is_skipped(name, skip)
    }


def quantize_model_rtn(
    model: nn.Module,
    fmt="nf4",
    group_size: int = 128,
    mode: Optional[str] = None,
    layout: str = "gptq",
    skip: Sequence[str] = DEFAULT_SKIP,
    scale_dtype: torch.dtype = torch.float16,
    progress: bool = True,
    scale_search=None,
    layer_searches: Optional[dict] = None,
    *,
    spec: Optional[QuantSpec] = None,
    layer_specs: Optional[Dict[str, QuantSpec]] = None,
    extra: Optional[dict] = None,
) -> AFPQConfigDict:
    """Replace the model's Linears with round-to-nearest :class:`AFPQLinear` (in place).

    The settings come whole as ``spec`` (:class:`~afpq_plugins.core.spec.QuantSpec`), or as
    the separate arguments, which build one. Every layer is checked first (group size,
    packing constraints, finite weights: one check per layer); if anything still fails
    while layers are replaced, the replaced ones are put back, so on an error the caller's
    model is as it was.

    The spec's scale search (``None`` = the paper's min/max scales, ``"mse"`` or a
    :class:`~afpq_plugins.core.search.ScaleSearch`) opts into the scale search;
    ``layer_searches`` (layer name -> search object) overrides it per layer (the output
    search bound to each layer's calibration energies). ``layer_specs`` (layer name -> spec)
    gives layers their own format, group size and mode (written to
    ``quantization_config.modules``); ``extra``: more ``quantization_config`` keys.
    """
    if spec is None:
        spec = QuantSpec(fmt, group_size, mode, scale_dtype, layout, tuple(skip), scale_search)
    spec = spec.resolved("rtn")
    linears = find_linears(model, spec.skip)
    if not linears:
        raise ValueError("no nn.Linear layers to quantize (check the skip list)")
    specs = {name: (layer_specs or {}).get(name, spec).resolved("rtn") for name in linears}
    plan = {}
    for name, lin in linears.items():  # validate everything checkable before touching anything
        plan[name] = specs[name].layer(lin.in_features, lin.out_features, name)
        check_finite(lin.weight.detach(), f"{name}.weight")
    it = linears.items()
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, total=len(linears), desc=f"RTN {spec.describe()}", unit="layer")
    done: List[Tuple[str, nn.Module]] = []
    try:
        with torch.no_grad():
            for name, lin in it:
                new = AFPQLinear.from_linear(lin, name=name, search=(layer_searches or {}).get(name),
                                             spec=specs[name], geometry=plan[name])
                set_module(model, name, new)
                done.append((name, lin))
    except BaseException:  # leave the caller's model as it was
        for name, lin in reversed(done):
            set_module(model, name, lin)
        raise
    untie_quantized_head(model, linears)
    return AFPQConfigDict.from_spec(spec, "rtn", quantized_modules=list(linears), layer_specs=specs, extra=extra)


def untie_quantized_head(model: nn.Module, quantized) -> Optional[str]:
    """A quantized output head that was tied to the input embedding is untied on purpose:
    the embedding keeps its float weight, the config says ``tie_word_embeddings: false`` (so
    no loader ties a packed layer to it). Returns the head's name when that happened."""
    head = tied_head_name(model)
    if head is None or head not in set(quantized):
        return None
    model.config.tie_word_embeddings = False
    text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else None
    if text is not None and text is not model.config and hasattr(text, "tie_word_embeddings"):
        text.tie_word_embeddings = False
    log.info("%s is quantized: untied from the input embedding, which stays float", head)
    return head


def _state_dict_for_save(model: nn.Module) -> Dict[str, torch.Tensor]:
    """State dict with tied (shared-storage) duplicates dropped, keeping the first name."""
    seen: Dict[tuple, str] = {}
    out: Dict[str, torch.Tensor] = {}
    for name, t in model.state_dict().items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype) if t.numel() else None
        if key is not None and key in seen:
            continue
        if key is not None:
            seen[key] = name
        out[name] = t
    return out


def save_quantized(
    model: nn.Module, out_dir: str, qc: AFPQConfigDict, tokenizer=None,
    source_dir: Optional[str] = None, overwrite: bool = False,
    dtype: Optional[torch.dtype] = None, max_shard_size=None,
) -> str:
    """Write ``model`` (already holding AFPQ layers) as an AFPQ checkpoint.

    ``dtype``: the float tensors (embeddings, norms, float layers, biases) are written in
    it (default: as they are); the group parameters keep ``scale_dtype``. ``config.json``'s
    dtype says what was written. ``max_shard_size``: see
    :func:`~afpq_plugins.core.checkpoint.write_checkpoint`. A quantized output head whose
    weight was tied to the embedding is written untied (the float embedding is kept,
    ``tie_word_embeddings: false``)."""
    tensors = _state_dict_for_save(model)
    if dtype is not None:
        keep = {f"{n}.{s}" for n in qc.quantized_modules for s in LAYER_PARAM_SUFFIXES}
        tensors = {k: (t.to(dtype) if t.is_floating_point() and k not in keep else t) for k, t in tensors.items()}
    cfg = checkpoint_model_config(model, qc, tensors)
    extra = with_model_card(extra_files_writer(model, tokenizer, source_dir), model, qc, out_dir)
    return write_checkpoint(out_dir, tensors, cfg, qc, extra_writer=extra, overwrite=overwrite,
                            max_shard_size=max_shard_size)


def checkpoint_model_config(model: nn.Module, qc: AFPQConfigDict, tensors: Optional[Dict[str, torch.Tensor]] = None,
                            dtype: Optional[torch.dtype] = None) -> dict:
    """The ``config.json`` dict of a checkpoint of ``model`` (without ``quantization_config``):
    the model's config, machine-specific keys dropped, ``architectures`` set, legacy RoPE
    keys added, the dtype written (``dtype``, else the most common float dtype of ``tensors``)
    and an output head quantized out of a tied pair marked untied."""
    cfg = model.config.to_dict() if hasattr(model, "config") else {}
    cfg.pop("quantization_config", None)
    cfg.pop("_name_or_path", None)  # machine-specific; keeps saves deterministic
    if not cfg.get("architectures") and hasattr(model, "config"):
        # As transformers' save_pretrained does: a model built with from_config has
        # architectures=None, and engines that pick the class from it (vLLM) would load
        # the bare base model instead of the causal-LM head.
        cfg["architectures"] = [type(model).__name__]
    _add_legacy_rope_keys(cfg)
    if dtype is None and tensors is not None:
        quant = {f"{n}.{s}" for n in qc.quantized_modules for s in LAYER_PARAM_SUFFIXES}
        dtype = _model_dtype(tensors, quant) if any(t.is_floating_point() for t in tensors.values()) else None
    if dtype is not None:
        name = str(dtype).replace("torch.", "")
        keys = [k for k in ("torch_dtype", "dtype") if k in cfg] or ["torch_dtype"]
        cfg.update({k: name for k in keys})
    head = tied_head_name(model)
    if head is not None and head in set(qc.quantized_modules):
        cfg["tie_word_embeddings"] = False  # the head is quantized: the embedding stays float, untied
    return cfg


def tied_head_name(model: nn.Module) -> Optional[str]:
    """The output head's module name when the config ties it to the input embedding."""
    names = tied_parameter_names(model)
    for n in names:
        if n.endswith(".weight"):
            return n[: -len(".weight")]
    return None


def extra_files_writer(model, tokenizer=None, source_dir: Optional[str] = None):
    """``extra_writer`` of a checkpoint of ``model``: the tokenizer (saved, or its files copied
    from ``source_dir``), the source's generation config or the model's. Both save paths (this
    module's :func:`save_quantized` and the streaming RTN) use it."""
    def extra(tmp: str) -> None:
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if source_dir is not None:
            for fname in _TOKENIZER_FILES:
                src = os.path.join(source_dir, fname)
                if os.path.isfile(src) and not os.path.exists(os.path.join(tmp, fname)):
                    shutil.copyfile(src, os.path.join(tmp, fname))
        gen = getattr(model, "generation_config", None)
        if gen is not None and not os.path.exists(os.path.join(tmp, "generation_config.json")):
            gen.save_pretrained(tmp)

    return extra


def _add_legacy_rope_keys(cfg: dict) -> None:
    """Make a transformers-5 config readable by transformers 4.x.

    transformers 5 writes RoPE settings only as ``rope_parameters``; 4.53 ignores that
    key and silently falls back to ``rope_theta = 10000`` (SmolLM2 uses 100000), which
    loads a wrong model without any error. Writing ``rope_theta`` (and ``rope_scaling``
    for non-default RoPE) beside it keeps checkpoints portable across both stacks.
    """
    rope = cfg.get("rope_parameters")
    if not isinstance(rope, dict):
        return
    if "rope_theta" in rope:
        cfg.setdefault("rope_theta", rope["rope_theta"])
    if rope.get("rope_type", "default") != "default":
        cfg.setdefault("rope_scaling", {k: v for k, v in rope.items() if k != "rope_theta"})


def load_quantized(path: str, device="cpu", dtype: Optional[torch.dtype] = None) -> nn.Module:
    """Load an AFPQ checkpoint into its transformers architecture, with validation.

    One version of the folder is read (:class:`~afpq_plugins.core.checkpoint.CheckpointSnapshot`:
    config and tensors of the same save, even while the folder is being re-saved; one
    ``model.safetensors`` or transformers' shards and index). The
    architecture comes from ``config.json``'s ``model_type`` (transformers' own classes;
    custom code is never run, ``auto_map`` is ignored), is built on the meta device,
    turned into its AFPQ skeleton by :func:`afpq_plugins.nn.skeleton.build_skeleton`
    (``nn.Linear`` and GPT-2 ``Conv1D`` layers) and checked tensor by tensor before any
    memory is allocated; only then is the model built and filled. Float tensors of a
    dtype other than the model's (the most common float dtype of the non-quantized
    tensors, or ``dtype``) are cast to it, as transformers does. Every failure is a
    :class:`~afpq_plugins.core.checkpoint.CheckpointError` naming the file, key or tensor."""
    from accelerate import init_empty_weights

    with CheckpointSnapshot(path) as snap:
        qc = snap.quant_config()
        tensors = snap.tensors()
        src = snap.weights_path
        config = config_from_dict(snap.config, snap.config_path)
        with torch.device("meta"):  # nothing allocated, whatever the config's sizes
            probe = _build(config, snap.config_path)
        names = quantized_module_names(qc, tensors)
        plan = plan_skeleton(probe, qc, names, source=src)  # each layer checked once, here
        for name, spec in plan.items():
            validate_layer_tensors(name, tensors, qc, spec.in_features, spec.out_features, spec.has_bias,
                                   source=snap.source(f"{name}.qweight"), geometry=spec.geometry)
        build_skeleton(probe, qc, names, source=src, plan=plan)
        for key in placeholder_keys(names):  # validated above; absent in older checkpoints
            tensors.pop(key, None)
        tied = _check_state_dict(probe, tensors, src, snap.source)
        snap.check_stamp(qc)
    del probe
    quant = {f"{n}.{s}" for n in plan for s in LAYER_PARAM_SUFFIXES}
    target = dtype if dtype is not None else _model_dtype(tensors, quant)
    odd = sorted(k for k, t in tensors.items() if k not in quant and t.is_floating_point() and t.dtype != target)
    if odd and dtype is None:
        log.warning("%s: %d float tensor(s) are not %s (first: %r); cast to %s, as transformers does",
                    src, len(odd), target, odd[0], target)
    tensors.update({k: tensors[k].to(target) for k in odd})
    with init_empty_weights():
        model = _build(config, snap.config_path)
    build_skeleton(model, qc, names, bias_dtypes={n: tensors[f"{n}.bias"].dtype for n in plan if plan[n].has_bias},
                   source=src, plan=plan)
    model.load_state_dict(tensors, strict=False, assign=True)
    if tied:
        model.tie_weights()
    leftover = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.device.type == "meta"]
    if leftover:
        raise CheckpointError(f"{src}: tensor {leftover[0]!r} was not loaded")
    model.config.quantization_config = qc.to_dict()
    model = model.to(device).eval()
    prepare_layers(model)
    return model


def prepare_layers(model: nn.Module) -> nn.Module:
    """Call :meth:`AFPQLinear.prepare` on every AFPQ layer (after loading, before tracing)."""
    for mod in model.modules():
        if isinstance(mod, AFPQLinear):
            mod.prepare()
    return model


def build_meta_model(config: dict, where: str) -> nn.Module:
    """The transformers model of a ``config.json`` dict (by ``model_type``, no remote code),
    built on the meta device: structure only, nothing allocated."""
    cfg = config_from_dict(config, where)
    with torch.device("meta"):
        return _build(cfg, where)


def config_from_dict(config: dict, where: str):
    """The transformers config of ``config.json``'s dict, by ``model_type`` (no remote code)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    d = {k: v for k, v in config.items() if k != "quantization_config"}  # ours is handled here
    mt = d.get("model_type")
    if not isinstance(mt, str) or mt not in CONFIG_MAPPING:
        raise CheckpointError(
            f"{where}: model_type {mt!r} is not an architecture transformers knows (custom code from a "
            "checkpoint is never run: trust_remote_code=False)"
        )
    try:
        return CONFIG_MAPPING[mt].from_dict(d)
    except Exception as exc:  # transformers' own validation of the values: ValueError, TypeError, ...
        raise CheckpointError(f"{where}: not a valid {mt} config ({type(exc).__name__}: {exc})") from exc


def _build(config, where: str) -> nn.Module:
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    except Exception as exc:  # a config transformers accepts but cannot build (sizes, heads, ...)
        raise CheckpointError(
            f"{where}: cannot build {type(config).__name__} from it ({type(exc).__name__}: {exc})"
        ) from exc


def _check_state_dict(model: nn.Module, tensors: Dict[str, torch.Tensor], src: str, source=None) -> set:
    """Every model tensor present (tied ones excepted), none unexpected, shapes equal;
    returns the tied names."""
    expected = set(model.state_dict())
    tied = tied_parameter_names(model)
    missing = sorted(expected - set(tensors) - tied)
    if missing:
        raise CheckpointError(f"{src}: tensor {missing[0]!r} is missing" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    unexpected = sorted(set(tensors) - expected)
    if unexpected:
        raise CheckpointError(f"{src}: unexpected tensor {unexpected[0]!r} (not in {type(model).__name__})")
    sd = model.state_dict()
    for k, t in tensors.items():
        where = source(k) if source is not None else src
        if tuple(sd[k].shape) != tuple(t.shape):
            raise CheckpointError(f"{where}: tensor {k!r} has shape {tuple(t.shape)}, expected {tuple(sd[k].shape)}")
        if sd[k].is_floating_point() and not t.is_floating_point():
            raise CheckpointError(
                f"{where}: tensor {k!r} is stored as {t.dtype}, but {type(model).__name__} holds a float tensor there"
            )
    return tied


def _model_dtype(tensors: Dict[str, torch.Tensor], quant: set) -> torch.dtype:
    """The most common float dtype among the non-quantized tensors (by element count)."""
    count: Dict[torch.dtype, int] = {}
    for k, t in tensors.items():
        if k not in quant and t.is_floating_point():
            count[t.dtype] = count.get(t.dtype, 0) + t.numel()
    return max(count, key=lambda d: (count[d], d == torch.float32)) if count else torch.float32
