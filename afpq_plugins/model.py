"""Model-level work: RTN quantization of a model's Linears, save and load.

Module swapping and the state dict are torch only; reading the model's config,
building the architecture and copying the tokenizer use transformers, imported
lazily.
"""

from __future__ import annotations

import logging
import os
import shutil
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .core.checkpoint import (
    AFPQConfigDict,
    CheckpointError,
    load_checkpoint_tensors,
    placeholder_keys,
    quantized_module_names,
    read_quant_config,
    validate_layer_tensors,
    write_checkpoint,
)
from .core.formats import get_format, resolve_mode
from .core.quantize import group_count, resolve_search
from .nn import AFPQLinear

__all__ = [
    "DEFAULT_SKIP",
    "find_linears",
    "quantize_model_rtn",
    "save_quantized",
    "load_quantized",
    "is_afpq_checkpoint",
]

log = logging.getLogger(__name__)

#: Modules left in float by default (embeddings are not Linears and are never touched).
DEFAULT_SKIP: Tuple[str, ...] = ("lm_head",)

_TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "generation_config.json",
)


def _skipped(name: str, skip: Iterable[str]) -> bool:
    return any(name == s or name.startswith(s + ".") or name.endswith("." + s) for s in skip)


def find_linears(model: nn.Module, skip: Sequence[str] = DEFAULT_SKIP) -> Dict[str, nn.Linear]:
    """``{name: module}`` of the ``nn.Linear`` layers to quantize, in model order."""
    return {
        name: mod for name, mod in model.named_modules()
        if isinstance(mod, nn.Linear) and not _skipped(name, skip)
    }


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


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
) -> AFPQConfigDict:
    """Replace the model's Linears with round-to-nearest :class:`AFPQLinear` (in place).

    ``scale_search`` (``None`` = the paper's min/max scales, ``"mse"`` or a
    :class:`~afpq_plugins.core.quantize.ScaleSearch`) opts into the scale search;
    ``layer_searches`` (layer name -> search object) overrides it per layer (the output
    search bound to each layer's calibration energies).
    """
    f = get_format(fmt)
    mode = resolve_mode(f, mode)
    search = resolve_search(scale_search)
    linears = find_linears(model, skip)
    if not linears:
        raise ValueError("no nn.Linear layers to quantize (check the skip list)")
    for name, lin in linears.items():  # validate all shapes before touching anything
        group_count(lin.in_features, group_size, name)
    it = linears.items()
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, total=len(linears), desc=f"RTN {f.name}/{mode} g{group_size}", unit="layer")
    with torch.no_grad():
        for name, lin in it:
            _set_module(model, name, AFPQLinear.from_linear(
                lin, f, group_size, mode, layout, scale_dtype, name=name,
                search=(layer_searches or {}).get(name, search)))
    dtype_name = str(scale_dtype).replace("torch.", "")
    return AFPQConfigDict(
        format=f.name, bits=f.bits, group_size=group_size, mode=mode, layout=layout,
        scale_dtype=dtype_name, method="rtn", modules_to_not_convert=list(skip),
        quantized_modules=list(linears),
        extra={"scale_search": search.to_dict() if search else {"method": "minmax"}},
    )


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
) -> str:
    """Write ``model`` (already holding AFPQ layers) as an AFPQ checkpoint."""
    tensors = _state_dict_for_save(model)
    cfg = model.config.to_dict() if hasattr(model, "config") else {}
    cfg.pop("quantization_config", None)
    cfg.pop("_name_or_path", None)  # machine-specific; keeps saves deterministic
    _add_legacy_rope_keys(cfg)

    def extra(tmp: str) -> None:
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        elif source_dir is not None:
            for fname in _TOKENIZER_FILES:
                src = os.path.join(source_dir, fname)
                if os.path.isfile(src):
                    shutil.copyfile(src, os.path.join(tmp, fname))
        gen = getattr(model, "generation_config", None)
        if gen is not None and not os.path.exists(os.path.join(tmp, "generation_config.json")):
            gen.save_pretrained(tmp)

    return write_checkpoint(out_dir, tensors, cfg, qc, extra_writer=extra, overwrite=overwrite)


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


def is_afpq_checkpoint(path: str) -> bool:
    import json

    cfg = os.path.join(path, "config.json")
    if not os.path.isfile(cfg):
        return False
    with open(cfg, encoding="utf-8") as fh:
        qc = json.load(fh).get("quantization_config") or {}
    return qc.get("quant_method") == "afpq"


def load_quantized(path: str, device="cpu", dtype: Optional[torch.dtype] = None) -> nn.Module:
    """Load an AFPQ checkpoint into its transformers architecture, with validation."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    _, qc = read_quant_config(path)
    tensors = load_checkpoint_tensors(path)
    src = os.path.join(path, "model.safetensors")
    config = AutoConfig.from_pretrained(path)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # ours is handled here, not by transformers
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    names = quantized_module_names(qc, tensors)
    for name in names:
        try:
            lin = model.get_submodule(name)
        except AttributeError:
            raise CheckpointError(f"{src}: quantized module {name!r} does not exist in {type(model).__name__}") from None
        in_f, out_f = _linear_dims(lin, name, src)
        has_bias = lin.bias is not None
        validate_layer_tensors(name, tensors, qc, in_f, out_f, has_bias, source=src)
        layer = AFPQLinear(
            in_f, out_f, has_bias, fmt=qc.fmt, group_size=qc.group_size, mode=qc.mode,
            layout=qc.layout, scale_dtype=qc.torch_scale_dtype,
            bias_dtype=tensors[f"{name}.bias"].dtype if has_bias else None,
        )
        _set_module(model, name, layer)
    for key in placeholder_keys(names):  # validated above; absent in older checkpoints
        tensors.pop(key, None)
    expected = set(model.state_dict())
    tied = _tied_names(model)
    missing = sorted(expected - set(tensors) - tied)
    if missing:
        raise CheckpointError(f"{src}: tensor {missing[0]!r} is missing" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    unexpected = sorted(set(tensors) - expected)
    if unexpected:
        raise CheckpointError(f"{src}: unexpected tensor {unexpected[0]!r} (not in {type(model).__name__})")
    sd = model.state_dict()
    for k, t in tensors.items():
        if tuple(sd[k].shape) != tuple(t.shape):
            raise CheckpointError(f"{src}: tensor {k!r} has shape {tuple(t.shape)}, expected {tuple(sd[k].shape)}")
    if dtype is not None:
        tensors = {k: (t.to(dtype) if t.is_floating_point() and not _is_quant_param(k) else t) for k, t in tensors.items()}
    model.load_state_dict(tensors, strict=False, assign=True)
    if tied:
        model.tie_weights()
    leftover = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.device.type == "meta"]
    if leftover:
        raise CheckpointError(f"{src}: tensor {leftover[0]!r} was not loaded")
    model.config.quantization_config = qc.to_dict()
    return model.to(device).eval()


def _linear_dims(mod: nn.Module, name: str, src: str) -> Tuple[int, int]:
    """(in, out) of an ``nn.Linear`` or a transformers ``Conv1D`` (GPT-2: weight ``[in, out]``,
    ``y = x @ W + b``, the same function as a Linear with ``W.T``)."""
    if isinstance(mod, nn.Linear):
        return mod.in_features, mod.out_features
    if type(mod).__name__ == "Conv1D" and getattr(mod, "weight", None) is not None and mod.weight.dim() == 2:
        in_f, out_f = mod.weight.shape
        return int(in_f), int(out_f)
    raise CheckpointError(f"{src}: quantized module {name!r} is a {type(mod).__name__}, expected Linear or Conv1D")


def _is_quant_param(key: str) -> bool:
    return key.rsplit(".", 1)[-1] in ("qweight", "scales", "scales_neg", "zeros", "g_idx")


def _tied_names(model: nn.Module) -> set:
    """Parameter names that ``tie_weights`` fills (e.g. ``lm_head.weight``)."""
    cfg = getattr(model, "config", None)
    if cfg is None or not getattr(cfg, "tie_word_embeddings", False):
        return set()
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if out is None:
        return set()
    for name, mod in model.named_modules():
        if mod is out:
            return {f"{name}.weight"}
    return set()


def quantized_layers(model: nn.Module) -> List[Tuple[str, AFPQLinear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, AFPQLinear)]
