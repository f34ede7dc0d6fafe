"""Registration: AFPQ configs and checkpoints in AutoGPTQ's own entry points.

AutoGPTQ 0.7.1 has no plugin hooks: ``BaseGPTQForCausalLM.quantize`` builds
``auto_gptq.modeling._base.GPTQ`` objects and ``pack_model`` / ``make_quant`` pick their
layer class with ``auto_gptq.modeling._utils.dynamically_import_QuantLinear``. While an
AFPQ config is in play (and only then) :func:`afpq_hooks` points those two names at the
AFPQ classes, and ``pack_model`` at :func:`pack_model_afpq` (validate, then mutate: every
layer is packed before the first module is replaced), and restores them on exit.

:func:`register` (run by ``import afpq_plugins.autogptq``, the documented opt-in; undone
by :func:`unregister`; :func:`registered` scopes it to a ``with`` block) wraps five entry points so
that they enter those scopes by themselves; each wrapper hands anything that is not an
AFPQ config or checkpoint to the original method untouched, so an INT workflow in the
same process runs exactly the stock code:

* ``BaseGPTQForCausalLM.from_pretrained``  AFPQ config: CPU allowed (compat shim).
* ``BaseGPTQForCausalLM.quantize``         AFPQ config: AFPQ GPTQ/QuantLinear (+ CPU shims).
* ``BaseGPTQForCausalLM.save_quantized``   AFPQ config: the project's checkpoint format.
* ``BaseGPTQForCausalLM.from_quantized`` and ``AutoGPTQForCausalLM.from_quantized``:
  an AFPQ checkpoint (``quant_method: "afpq"``) loads through the project's loader.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from typing import Iterator, Optional

import torch

from ..core.checkpoint import is_afpq_checkpoint
from . import compat
from .config import AFPQQuantizeConfig
from .qlinear import AFPQQuantLinear, quant_linear_class
from .quantizer import AFPQGPTQ

__all__ = [
    "afpq_hooks",
    "register",
    "unregister",
    "is_registered",
    "registered",
    "save_afpq",
    "load_afpq",
    "wrap_model",
    "pack_model_afpq",
    "check_layer_specs",
]

log = logging.getLogger(__name__)
_WRAPPED = "__afpq_original__"


@contextlib.contextmanager
def afpq_hooks(cfg: AFPQQuantizeConfig, model=None) -> Iterator[None]:
    """Point AutoGPTQ's ``GPTQ`` and ``dynamically_import_QuantLinear`` at AFPQ classes.

    With per-module settings (``cfg.layer_specs``) ``model`` is the transformers model being
    quantized: its modules of those names get their own grid, bits and group size, in GPTQ
    and in packing."""
    from auto_gptq.modeling import _base, _utils

    qlinear = quant_linear_class(cfg.fmt, cfg.mode, cfg.torch_scale_dtype)

    def import_quant_linear(*args, **kwargs):
        return qlinear

    own = {}
    if cfg.layer_specs:
        if model is None:
            raise ValueError("afpq_hooks: a config with layer_specs needs the model it quantizes")
        modules = dict(model.named_modules())
        own = {modules[n]: s for n, s in cfg.layer_specs.items() if n in modules}
    gptq = AFPQGPTQ.bind(cfg.fmt, cfg.mode, cfg.torch_scale_dtype, cfg.scale_search, bits=cfg.bits, layers=own)
    pack = functools.partial(pack_model_afpq, qlinear=qlinear, layer_specs=cfg.layer_specs)
    with compat.patched(_base, "GPTQ", gptq), compat.patched(_utils, "dynamically_import_QuantLinear", import_quant_linear), \
            compat.patched(_base, "pack_model", pack):
        yield


def check_layer_specs(wrapper, cfg: AFPQQuantizeConfig) -> None:
    """Before any work: every ``cfg.layer_specs`` name is a Linear AutoGPTQ quantizes in
    ``wrapper``'s model (its decoder layers' ``inside_layer_modules``) and takes that
    module's settings (group size, packing); errors name the module."""
    if not cfg.layer_specs:
        return
    from auto_gptq.modeling._utils import find_layers, get_module_by_name_prefix

    from ..nn.convert import float_weight

    layers = get_module_by_name_prefix(wrapper.model, wrapper.layers_block_name)
    quantized = {}
    for i, layer in enumerate(layers):
        full = find_layers(layer)
        for n in sum(wrapper.inside_layer_modules, []):
            if n in full:
                quantized[f"{wrapper.layers_block_name}.{i}.{n}"] = full[n]
    for name, spec in cfg.layer_specs.items():
        if name not in quantized:
            raise ValueError(f"layer_specs names {name!r}, which AutoGPTQ 0.7.1 does not quantize in this "
                             f"{wrapper.model.config.model_type} model (its decoder layers' Linears)")
        out_f, in_f = float_weight(quantized[name]).shape
        spec.layer(in_f, out_f, name, layout="gptq")


def pack_model_afpq(model, quantizers, bits, group_size, use_triton=False, use_cuda_fp16=True, desc_act=False,
                    warmup_triton=False, force_layer_back_to_cpu=False, *, qlinear, layer_specs=None) -> None:
    """AutoGPTQ 0.7.1's ``pack_model`` (same arguments, same result) for AFPQ layers, validate
    then mutate: upstream replaces every Linear with an empty ``QuantLinear`` first and packs
    them one by one, so a layer that fails to pack leaves a model of half-empty layers. Here
    every layer is built and packed on the side (its result checked by
    :func:`~afpq_plugins.nn.convert.check_engine_result`, errors naming the layer), then all
    are swapped in; the peak is upstream's (it, too, holds every packed layer beside the float
    ones). ``quantizers``: ``{name: (quantizer, scale, zero, g_idx)}``, as upstream, and
    replaced by ``{name: quantizer}`` once packed, as upstream does. ``layer_specs``: a layer
    named there is packed with its own format, bits, group size and mode."""
    from auto_gptq.modeling._utils import find_layers

    from ..core.errors import EngineResultError
    from ..nn.convert import float_weight
    from ..nn.skeleton import set_module

    if use_triton:
        raise NotImplementedError("AFPQ layers have no AutoGPTQ triton kernels (use_triton=False)")
    found = find_layers(model)
    built = {}
    for name in quantizers:  # validate and pack every layer before touching the model
        if name not in found:
            raise EngineResultError(f"{name}: AutoGPTQ quantized a layer the model does not hold")
        layer = found[name]
        _, scale, zero, g_idx = quantizers[name]
        try:
            W = float_weight(layer)
        except NotImplementedError as exc:
            raise EngineResultError(f"{name}: {exc}") from None
        dev = W.device
        bias = getattr(layer, "bias", None)
        own = (layer_specs or {}).get(name)
        cls, b, gs = (qlinear, bits, group_size) if own is None else \
            (quant_linear_class(own.fmt, own.mode, own.torch_scale_dtype), own.bits, own.group_size)
        try:
            new = cls(b, gs, W.shape[1], W.shape[0], True, use_cuda_fp16=use_cuda_fp16,
                      trainable=False, weight_dtype=W.dtype)
        except ValueError as exc:  # the group size or the packing does not fit this layer
            raise EngineResultError(f"{name}: {exc}") from None
        new.pack_weight(W.to("cpu"), None if bias is None else bias.data.to("cpu"), scale.to("cpu"), zero.to("cpu"),
                        None if g_idx is None else g_idx.to("cpu"), name)
        built[name] = new.to(dev)
    if force_layer_back_to_cpu:
        model.to("cpu")
        built = {n: m.to("cpu") for n, m in built.items()}
    for name, new in built.items():
        new.device = next(new.buffers()).device  # as make_quant sets it
        set_module(model, name, new)
        quantizers[name] = quantizers[name][0]
    log.info("Model packed (%d AFPQ layers).", len(built))


def _is_afpq_dir(path) -> bool:
    return path is not None and os.path.isdir(str(path)) and is_afpq_checkpoint(path)


# -- checkpoint I/O ------------------------------------------------------------------------
def quantized_module_names(model) -> list:
    return [n for n, m in model.named_modules() if isinstance(m, AFPQQuantLinear)]


def save_afpq(wrapper, save_dir: str) -> str:
    """Write a quantized AutoGPTQ model holding AFPQ layers in the project's format."""
    from ..model import save_quantized

    cfg: AFPQQuantizeConfig = wrapper.quantize_config
    names = quantized_module_names(wrapper.model)
    if not names:
        raise RuntimeError("save_quantized: the model holds no AFPQ layers (was it quantized with an AFPQ config?)")
    skip = [wrapper.lm_head_name]
    qc = cfg.to_afpq(quantized_modules=names, modules_to_not_convert=skip)
    src = getattr(wrapper.model, "name_or_path", None)
    src = src if src and os.path.isdir(src) else None
    save_dir = os.path.abspath(save_dir)
    if os.path.isdir(save_dir) and os.listdir(save_dir) and not _is_afpq_dir(save_dir):
        raise FileExistsError(f"{save_dir} exists, is not empty and is not an AFPQ checkpoint; refusing to replace it")
    wrapper.model.to("cpu")
    out = save_quantized(wrapper.model, save_dir, qc, source_dir=src, overwrite=True)
    cfg.model_name_or_path = out
    return out


def load_afpq(path: str, device="cpu", torch_dtype: Optional[torch.dtype] = None):
    """Load an AFPQ checkpoint with the project's loader (``nn.Linear`` or transformers ``Conv1D``
    models: GPT-2's ``c_attn``/``c_proj``/``c_fc`` become AFPQLinear computing the same function)."""
    from ..model import load_quantized

    return load_quantized(path, device=device, dtype=torch_dtype)


def wrap_model(model, cfg: AFPQQuantizeConfig, quantized: bool):
    """The AutoGPTQ wrapper class for ``model``'s architecture around it."""
    from auto_gptq.modeling.auto import GPTQ_CAUSAL_LM_MODEL_MAP

    mt = model.config.model_type
    if mt not in GPTQ_CAUSAL_LM_MODEL_MAP:
        raise TypeError(f"{mt} isn't supported by AutoGPTQ 0.7.1")
    wrapper = GPTQ_CAUSAL_LM_MODEL_MAP[mt](model, quantized, cfg)
    if not hasattr(model, "seqlen"):
        c = model.config.to_dict()
        model.seqlen = next((c[k] for k in ("max_position_embeddings", "seq_length", "n_positions") if k in c), 4096)
    return wrapper


def _from_quantized_afpq(cls, model_name_or_path, device=None, device_map=None, torch_dtype=None, **kwargs):
    """AFPQ checkpoints load whole onto one device: ``device``, else a ``{"": dev}`` map,
    else the first GPU, else the CPU (AutoGPTQ's multi-device maps are not supported)."""
    if device is not None:
        dev = device
    elif isinstance(device_map, dict) and set(device_map) == {""}:
        dev = device_map[""]
    elif device_map in (None, "auto"):
        dev = "cuda:0" if torch.cuda.is_available() else "cpu"
    else:
        raise NotImplementedError(f"from_quantized of an AFPQ checkpoint: device_map {device_map!r} is not supported")
    if isinstance(dev, int):
        dev = f"cuda:{dev}"
    model = load_afpq(str(model_name_or_path), device=dev, torch_dtype=torch_dtype)
    # the config of the version that was loaded (not a second read of the folder)
    from ..core.checkpoint import AFPQConfigDict

    cfg = AFPQQuantizeConfig.from_afpq(AFPQConfigDict.from_dict(model.config.quantization_config))
    cfg.model_name_or_path = str(model_name_or_path)
    wrapper = wrap_model(model, cfg, quantized=True)
    # this wrapper only: AutoGPTQ's generate() autocasts to bfloat16 on CPU (fp16 models fail)
    wrapper.generate = functools.partial(compat.generate_without_cpu_autocast, wrapper)
    return wrapper


# -- registration -----------------------------------------------------------------------------
def _install(owner, name, make):
    raw = owner.__dict__[name]
    if getattr(getattr(raw, "__func__", raw), _WRAPPED, None) is not None:
        return
    is_cm = isinstance(raw, classmethod)
    orig = raw.__func__ if is_cm else raw
    new = make(orig)
    functools.update_wrapper(new, orig)
    setattr(new, _WRAPPED, raw)
    setattr(owner, name, classmethod(new) if is_cm else new)


def _uninstall(owner, name):
    raw = owner.__dict__.get(name)
    fn = getattr(raw, "__func__", raw)
    orig = getattr(fn, _WRAPPED, None)
    if orig is not None:
        setattr(owner, name, orig)


def _targets():
    from auto_gptq.modeling._base import BaseGPTQForCausalLM
    from auto_gptq.modeling.auto import AutoGPTQForCausalLM

    return [
        (BaseGPTQForCausalLM, "from_pretrained", _make_from_pretrained),
        (BaseGPTQForCausalLM, "quantize", _make_quantize),
        (BaseGPTQForCausalLM, "save_quantized", _make_save_quantized),
        (BaseGPTQForCausalLM, "from_quantized", _make_from_quantized),
        (AutoGPTQForCausalLM, "from_quantized", _make_from_quantized),
    ]


def _make_from_pretrained(orig):
    def from_pretrained(cls, pretrained_model_name_or_path, quantize_config, *args, **kwargs):
        if not isinstance(quantize_config, AFPQQuantizeConfig):
            return orig(cls, pretrained_model_name_or_path, quantize_config, *args, **kwargs)
        with compat.allow_cpu_from_pretrained():
            return orig(cls, pretrained_model_name_or_path, quantize_config, *args, **kwargs)

    return from_pretrained


def _make_quantize(orig):
    def quantize(self, *args, **kwargs):
        cfg = self.quantize_config
        if not isinstance(cfg, AFPQQuantizeConfig):
            return orig(self, *args, **kwargs)
        kwargs["use_triton"] = False
        from auto_gptq.modeling._utils import get_module_by_name_prefix

        layers = get_module_by_name_prefix(self.model, self.layers_block_name)
        check_layer_specs(self, cfg)
        with afpq_hooks(cfg, self.model), compat.cpu_quantize(), compat.keyword_layer_calls(layers):
            return orig(self, *args, **kwargs)

    return quantize


def _make_save_quantized(orig):
    def save_quantized(self, save_dir, *args, **kwargs):
        if not isinstance(self.quantize_config, AFPQQuantizeConfig):
            return orig(self, save_dir, *args, **kwargs)
        if not self.quantized:
            raise EnvironmentError("can only save quantized model, please execute .quantize first.")
        return save_afpq(self, save_dir)

    return save_quantized


def _make_from_quantized(orig):
    def from_quantized(cls, model_name_or_path=None, *args, **kwargs):
        if not _is_afpq_dir(model_name_or_path):
            return orig(cls, model_name_or_path, *args, **kwargs)
        if args:
            raise TypeError("from_quantized of an AFPQ checkpoint takes keyword arguments only")
        return _from_quantized_afpq(
            cls, model_name_or_path, device=kwargs.get("device"), device_map=kwargs.get("device_map"),
            torch_dtype=kwargs.get("torch_dtype"),
        )

    return from_quantized


def register() -> None:
    """Install the dispatching wrappers (idempotent)."""
    for owner, name, make in _targets():
        _install(owner, name, make)


def unregister() -> None:
    """Restore AutoGPTQ's original methods."""
    for owner, name, _ in _targets():
        _uninstall(owner, name)


@contextlib.contextmanager
def registered() -> Iterator[None]:
    """The wrappers of :func:`register` for the duration of the block only (then the state
    before the block is restored): for code that called :func:`unregister` and wants
    AutoGPTQ's entry points to accept AFPQ configs in one place."""
    was = is_registered()
    register()
    try:
        yield
    finally:
        if not was:
            unregister()


def is_registered() -> bool:
    return all(getattr(getattr(o.__dict__[n], "__func__", o.__dict__[n]), _WRAPPED, None) is not None
               for o, n, _ in _targets())
