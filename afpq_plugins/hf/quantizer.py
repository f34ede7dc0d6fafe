"""``AFPQHfQuantizer``: the transformers ``HfQuantizer`` for ``quant_method: "afpq"``.

Pre-quantized checkpoints (the usual case): before weights load, the model skeleton
(meta device) gets an :class:`~afpq_plugins.nn.AFPQLinear` in place of every
``nn.Linear`` (or GPT-2 ``Conv1D``) the checkpoint lists in ``quantized_modules``
(:func:`afpq_plugins.nn.skeleton.build_skeleton`, shared with every loader), and the checkpoint files
are validated against it (:mod:`.validate`); transformers then loads ``qweight`` /
``scales`` / ``scales_neg`` / ``zeros`` / ``g_idx`` / ``bias`` into those buffers like
any other tensor. After loading, the group parameters are put back in the
checkpoint's ``scale_dtype`` exactly (transformers 4.53 casts every float tensor of a
quantized model to the model dtype; they are re-read from the file when that cast
was lossy), and no tensor may be left on the meta device.

A float model with ``quantization_config=AFPQConfig(..., dataset=...)`` is quantized
after loading by :class:`~afpq_plugins.hf.optimum.AFPQGPTQQuantizer` (GPTQ with the
AFPQ grid), like transformers' own GPTQ quantize-on-load.

The refusal placeholders (``<layer>.weight`` and ``<layer>.qzeros``, ``uint8 [1]``, see
:mod:`afpq_plugins.core.checkpoint`) are validated with the other tensors, kept out of
transformers' unexpected-key report (4.53: ``update_unexpected_keys``; 5.x: the model's
``_keys_to_ignore_on_load_unexpected``), and written again by ``save_pretrained`` (5.x:
``get_state_dict_and_metadata``; 4.53, which has no quantizer hook there: the model's
``_fix_state_dict_keys_on_save``, overridden on the loaded instance only).

Written against the HfQuantizer API of transformers 4.53.3 and 5.17.0; the hooks whose
names differ (``update_torch_dtype`` / ``update_dtype``, ``is_serializable``'s
argument) are both provided.
"""

from __future__ import annotations

import logging
import os
import re
import types
from typing import Dict, Optional, Tuple

import torch
from torch import nn
from transformers.quantizers.base import HfQuantizer

from ..core.checkpoint import (
    PLACEHOLDER_SUFFIXES,
    STAMP_METADATA_KEY,
    CheckpointError,
    config_stamp,
    placeholder_keys,
    quantized_module_names,
    safetensors_metadata,
    with_refusal_placeholders,
)
from ..core.safetensors_io import read_header
from ..nn import AFPQLinear, second_param_name
from ..nn.skeleton import build_skeleton, set_module
from .config import AFPQConfig
from .validate import CheckpointTensors, resolve_checkpoint_files, validate_against_model

__all__ = ["AFPQHfQuantizer"]

log = logging.getLogger(__name__)


def _with_placeholders(model: nn.Module, state_dict: dict) -> dict:
    """``state_dict`` plus the refusal placeholders of each :class:`AFPQLinear` in ``model``."""
    return with_refusal_placeholders(state_dict, [n for n, m in model.named_modules() if isinstance(m, AFPQLinear)])


def _fix_state_dict_keys_on_save(self, state_dict):
    """transformers 4.53's ``save_pretrained`` hook, bound to an AFPQ model instance: the
    class's own key fixing, then the refusal placeholders. (Bound with ``types.MethodType``,
    so ``copy.deepcopy`` rebinds it to the copy.)"""
    return _with_placeholders(self, type(self)._fix_state_dict_keys_on_save(self, state_dict))


def _placeholder_pattern(names) -> str:
    suffixes = "|".join(PLACEHOLDER_SUFFIXES)
    return r"(?:^|\.)(?:" + "|".join(re.escape(n) for n in sorted(names)) + r")\.(?:" + suffixes + r")$"


def _skip_init_of_parents(model: nn.Module, names) -> None:
    """transformers 5.x runs ``_init_weights`` on every module not flagged
    ``_is_hf_initialized`` after loading; GPT-2's re-initializes ``<attn|mlp>.c_proj.weight``
    there, which an AFPQ layer does not have. The parents of the quantized layers hold no
    tensor of their own that the checkpoint lacks (every tensor was validated present), so
    they are flagged as initialized; parents with buffers of their own (which 5.x may need
    to re-initialize) are left alone. 4.53 does not read the flag."""
    for name in names:
        parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
        if parent is not model and next(parent.buffers(recurse=False), None) is None:
            parent._is_hf_initialized = True


class AFPQHfQuantizer(HfQuantizer):
    """Loads AFPQ checkpoints into :class:`AFPQLinear` modules; quantizes float models on load."""

    requires_calibration = False
    required_packages = None
    requires_parameters_quantization = False  # transformers 4.53: plain tensor loading
    quantization_config: AFPQConfig

    def __init__(self, quantization_config: AFPQConfig, **kwargs) -> None:
        super().__init__(quantization_config, **kwargs)
        self._tensors: Optional[CheckpointTensors] = None
        self._layers: Dict[str, Tuple[int, int, bool]] = {}
        self._placeholders: set = set()

    # -- environment, dtype, device map --------------------------------------------------------
    def validate_environment(self, *args, **kwargs) -> None:
        if not self.pre_quantized and self.quantization_config.dataset is None:
            raise ValueError(
                "quantization_config=AFPQConfig(...) on a float model quantizes it on load with GPTQ and needs "
                "a calibration set: AFPQConfig(bits=..., fmt=..., dataset=[texts...], tokenizer=tok)"
            )
        device_map = kwargs.get("device_map")
        if isinstance(device_map, dict) and not self.pre_quantized and "disk" in device_map.values():
            raise ValueError("AFPQ quantize-on-load does not support disk offload")

    def update_torch_dtype(self, dtype):  # transformers 4.53
        return dtype

    def update_dtype(self, dtype):  # transformers 5.x
        return dtype

    def update_device_map(self, device_map):
        if device_map is None and not self.pre_quantized:
            device_map = {"": torch.device("cpu")}
        return device_map

    def update_tp_plan(self, config):
        """Also the earliest hook that sees the checkpoint's path (both versions call it
        before transformers opens the weights: 4.53 reads the safetensors metadata with
        the Rust reader, whose error on a truncated file names neither file nor tensor).
        A local checkpoint's headers are checked here with the strict reader."""
        if self.pre_quantized:
            src = getattr(config, "_name_or_path", None) or getattr(config, "name_or_path", None)
            if src and os.path.isdir(str(src)):
                # a folder without model.safetensors (say, only a pytorch_model.bin) is refused here,
                # before transformers would unpickle anything
                files = resolve_checkpoint_files(type("_Src", (), {"name_or_path": str(src)})())
                for f in files:
                    read_header(f)  # SafetensorsError naming the file and the tensor
        return config

    # -- before weights load: swap modules, validate the files ---------------------------------
    def _process_model_before_weight_loading(self, model, **kwargs):
        if not self.pre_quantized:
            return model
        qc = self.quantization_config.checkpoint_config()
        files = resolve_checkpoint_files(model, kwargs.get("checkpoint_files"))
        tensors = CheckpointTensors(files)
        try:
            plan = build_skeleton(model, qc, quantized_module_names(qc, tensors), source=files[0])
            layers: Dict[str, Tuple[int, int, bool]] = {
                name: (spec.in_features, spec.out_features, spec.has_bias) for name, spec in plan.items()
            }
            validate_against_model(tensors, model, qc, layers,  # includes the refusal placeholders
                                   geometries={name: spec.geometry for name, spec in plan.items()})
            stamp = config_stamp(qc)
            for f, meta in tensors.metadata.items():  # config.json and the tensors of one save
                if meta.get(STAMP_METADATA_KEY, stamp) != stamp:
                    raise CheckpointError(
                        f"{f}: written with another quantization_config than the config.json transformers read "
                        "(the checkpoint was re-saved during the load?); load it again"
                    )
        except BaseException:
            tensors.close()
            raise
        self._tensors, self._layers = tensors, layers
        self._placeholders = set(placeholder_keys(layers))
        _skip_init_of_parents(model, layers)
        # transformers 5.x reports unexpected checkpoint keys through this (instance) set
        ignore = set(getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ())
        model._keys_to_ignore_on_load_unexpected = ignore | {_placeholder_pattern(layers)}
        model.config.quantization_config = self.quantization_config
        return model

    def update_unexpected_keys(self, model, unexpected_keys, prefix):  # transformers 4.53
        return [k for k in unexpected_keys if k not in self._placeholders]

    # -- save_pretrained: keep writing the refusal placeholders --------------------------------------
    def get_state_dict_and_metadata(self, model, *args, **kwargs):  # transformers 5.x
        metadata = safetensors_metadata(self.quantization_config.checkpoint_config())
        metadata.pop("format")  # transformers sets it
        return _with_placeholders(model, model.state_dict()), metadata

    @staticmethod
    def _keep_placeholders_on_save(model) -> None:
        if not hasattr(HfQuantizer, "get_state_dict_and_metadata"):  # transformers 4.53
            model._fix_state_dict_keys_on_save = types.MethodType(_fix_state_dict_keys_on_save, model)

    # -- after weights load ------------------------------------------------------------------------
    def _process_model_after_weight_loading(self, model, **kwargs):
        self._keep_placeholders_on_save(model)
        if not self.pre_quantized:
            return self._quantize_on_load(model)
        qc = self.quantization_config.checkpoint_config()
        sdt = qc.torch_scale_dtype
        for name in self._layers:
            layer = model.get_submodule(name)
            for buf in ("scales", second_param_name(layer.mode)):
                if buf is None:
                    continue
                t = getattr(layer, buf)
                if t.dtype == sdt or t.device.type == "meta":
                    continue
                # transformers 4.53 cast it to the model dtype: undo exactly
                exact = self._tensors[f"{name}.{buf}"] if self._tensors is not None else t.to(sdt)
                layer._buffers[buf] = exact.to(device=t.device, dtype=sdt)
            for buf in ("qweight", "g_idx"):
                t = getattr(layer, buf, None)
                if t is not None and t.dtype != torch.int32 and t.device.type != "meta":
                    layer._buffers[buf] = t.to(torch.int32)
        leftover = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.device.type == "meta"]
        offloaded = getattr(model, "hf_device_map", None) and any(
            d in ("disk", "meta") for d in (model.hf_device_map or {}).values()
        )
        if leftover and not offloaded:
            src = self._tensors.files[0] if self._tensors is not None else "checkpoint"
            raise CheckpointError(f"{src}: tensor {leftover[0]!r} was not loaded")
        if self._tensors is not None:
            try:
                self._tensors.check_unchanged()  # transformers read the files that were validated
            finally:
                self._tensors.close()
        self._tensors = None  # no file handles or caches kept
        for mod in model.modules():  # buffers were replaced in place above: choose kernels afresh
            if isinstance(mod, AFPQLinear) and mod.qweight.device.type != "meta":
                mod.invalidate()
                mod.prepare()
        return model

    def _quantize_on_load(self, model):
        from .optimum import AFPQGPTQQuantizer

        cfg = self.quantization_config
        tok = cfg.tokenizer if cfg.tokenizer is not None else model.name_or_path
        quantizer = AFPQGPTQQuantizer.from_afpq_config(cfg)
        quantizer.quantize_model(model, tok)
        model.config.quantization_config = AFPQConfig.from_checkpoint_config(quantizer.checkpoint_config)
        self.quantization_config = model.config.quantization_config
        self.pre_quantized = True  # it now holds AFPQ modules; save_pretrained writes the checkpoint format
        return model

    def postprocess_model(self, model, **kwargs):
        out = super().postprocess_model(model, **kwargs)
        # both versions set model.config.quantization_config = self.quantization_config first
        return out if out is not None else model

    def _dequantize(self, model, dtype=None):
        """``model.dequantize()``: every AFPQLinear back to an ``nn.Linear`` holding its decoded weight."""
        for name, layer in [(n, m) for n, m in model.named_modules() if isinstance(m, AFPQLinear)]:
            dt = dtype or (layer.bias.dtype if layer.bias is not None else torch.float32)
            lin = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                            device=layer.qweight.device, dtype=dt)
            with torch.no_grad():
                lin.weight.copy_(layer.dequantize(torch.float32).to(dt))
                if layer.bias is not None:
                    lin.bias.copy_(layer.bias.to(dt))
            set_module(model, name, lin)
        return model

    # -- capabilities ------------------------------------------------------------------------------
    def is_serializable(self, safe_serialization=None) -> bool:
        return safe_serialization is not False  # the format is safetensors only

    @property
    def is_trainable(self) -> bool:
        return False

    @property
    def is_qat_trainable(self) -> bool:
        return False

    @property
    def is_compileable(self) -> bool:
        # AFPQLinear traces as one custom op (torch.ops.afpq.linear, with a fake implementation):
        # tests/test_linear.py compiles an AFPQ model with fullgraph=True
        return True
