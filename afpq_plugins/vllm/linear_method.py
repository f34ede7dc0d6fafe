"""``AFPQLinearMethod``: vLLM's linear method for AFPQ layers, tensor parallelism included.

Parameters are declared with vLLM's parameter classes, so its column-parallel, row-parallel,
merged (gate/up) and QKV layers shard them with vLLM's own loaders:

===========  ====================================================  =============================
tensor       gptq layout (codes packed along the input)            awq layout (along the output)
===========  ====================================================  =============================
qweight      PackedvLLMParameter ``[in*bits/32, out]``, packed      PackedvLLMParameter ``[in, out/8]``,
             dim 0 (a row shard must hold whole packed words)       packed dim 1 (whole 8-column words)
scales,      GroupQuantScaleParameter ``[groups, out]`` (sharded    same
scales_neg   by groups on row-parallel layers), or
/ zeros      ChannelQuantScaleParameter (every group on every
             rank: act-order, ``group_size -1``, or groups that
             straddle a shard)
g_idx        RowvLLMParameter ``[in]``                              (built from ``group_size``)
===========  ====================================================  =============================

A group that straddles two row shards is handled by keeping all groups' scales on every
rank and giving the kernel the shard's slice of the global ``g_idx`` (the act-order code
path); only a shard that would split a packed word is an error, naming the layer and
the sizes. Every tensor is checked against the shape core expects for the checkpoint
(:func:`~afpq_plugins.core.checkpoint.expected_layer_tensors`) before vLLM narrows it,
and an error names the checkpoint key. The refusal placeholders (``<layer>.weight`` and
``<layer>.qzeros``, uint8 ``[1]``) are checked and dropped.

``apply`` calls the custom op ``torch.ops.afpq.linear`` (:mod:`afpq_plugins.kernels.ops`),
which runs the kernel the project's registry chooses; its fake implementation lets vLLM's
``torch.compile`` trace the model without ``enforce_eager``.
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Callable, List, Optional

import torch
from vllm.model_executor.layers.linear import LinearMethodBase, register_weight_loader_v2_supported_method
from vllm.model_executor.parameter import (
    BasevLLMParameter,
    ChannelQuantScaleParameter,
    GroupQuantScaleParameter,
    PackedvLLMParameter,
    RowvLLMParameter,
)

from ..core.checkpoint import CheckpointError, expected_layer_tensors, is_refusal_placeholder, second_param_name
from ..core.constants import PLACEHOLDER_SUFFIXES
from ..core.packing import packed_shape
from ..core.quantize import default_g_idx
from ..kernels import ops

__all__ = ["AFPQLinearMethod"]

_QKV = ("q", "k", "v")


class _LayerInfo:
    """What ``apply`` needs besides the tensors (plain Python values: constants to a tracer):
    the checkpoint's :class:`~afpq_plugins.core.spec.QuantSpec` and this rank's shard of the layer."""

    __slots__ = ("spec", "in_features", "out_features", "second", "row_parallel", "shard_groups", "rank",
                 "default_order", "prefix")

    fmt = property(lambda self: self.spec.fmt)
    mode = property(lambda self: self.spec.mode)
    layout = property(lambda self: self.spec.layout)
    group_size = property(lambda self: self.spec.group_size)


@register_weight_loader_v2_supported_method
class AFPQLinearMethod(LinearMethodBase):
    """Weight-only AFPQ linear for vLLM (see the module docstring)."""

    def __init__(self, config, spec=None) -> None:
        self.config = config
        self.qc = config.qc
        #: this layer's settings (per-module overrides applied; the parts of a fused layer agree)
        self.spec = spec if spec is not None else config.spec

    # -- weights -----------------------------------------------------------------------------
    def create_weights(
        self,
        layer: torch.nn.Module,
        input_size_per_partition: int,
        output_partition_sizes: List[int],
        input_size: int,
        output_size: int,
        params_dtype: torch.dtype,
        **extra_weight_attrs,
    ) -> None:
        qc = self.qc
        prefix = getattr(layer, "prefix", "") or type(layer).__name__
        loader = extra_weight_attrs["weight_loader"]
        in_p, out_p = input_size_per_partition, sum(output_partition_sizes)
        row_parallel = input_size != in_p
        rank = int(getattr(layer, "tp_rank", 0))
        spec = self.spec
        try:
            groups_total = spec.groups(input_size, f"layer {prefix!r}")
        except ValueError as exc:
            raise CheckpointError(str(exc)) from None
        gs = spec.effective_group_size(input_size)
        self._check_shard(prefix, input_size, in_p, output_partition_sizes)
        # Scales are sharded with the input only when each shard holds whole groups in the plain order.
        shard_groups = row_parallel and not qc.desc_act and spec.group_size != -1 and in_p % gs == 0
        groups = in_p // gs if shard_groups else groups_total

        info = _LayerInfo()
        info.spec, info.in_features, info.out_features = spec, in_p, out_p
        info.second = second_param_name(spec.mode)
        info.row_parallel, info.shard_groups, info.rank = row_parallel, shard_groups, rank
        info.default_order, info.prefix = True, prefix
        layer.afpq_info = info

        def checked(suffix: str) -> Callable:
            return self._checked_loader(layer, suffix, loader)

        qshape = packed_shape(qc.layout, spec.bits, out_p, in_p)  # validated by _check_shard
        if qc.layout == "gptq":
            qweight = PackedvLLMParameter(
                data=torch.empty(qshape, dtype=torch.int32), input_dim=0, output_dim=1, packed_dim=0,
                packed_factor=Fraction(32, spec.bits) if 32 % spec.bits else 32 // spec.bits,
                weight_loader=checked("qweight"),
            )
        else:
            qweight = PackedvLLMParameter(
                data=torch.empty(qshape, dtype=torch.int32), input_dim=0, output_dim=1, packed_dim=1,
                packed_factor=8, weight_loader=checked("qweight"),
            )
        layer.register_parameter("qweight", qweight)

        sdt = qc.torch_scale_dtype
        for name in ("scales", info.second):
            if name is None:
                continue
            data = torch.empty(groups, out_p, dtype=sdt)
            if row_parallel and not shard_groups:
                p = ChannelQuantScaleParameter(data=data, output_dim=1, weight_loader=checked(name))
            else:
                p = GroupQuantScaleParameter(data=data, output_dim=1, input_dim=0, weight_loader=checked(name))
            layer.register_parameter(name, p)

        if qc.layout == "gptq":
            g = RowvLLMParameter(data=torch.empty(in_p, dtype=torch.int32), input_dim=0,
                                 weight_loader=checked("g_idx"))
            layer.register_parameter("g_idx", g)
        elif row_parallel and not shard_groups:
            # awq has no g_idx: the shard's slice of the plain order, indexing all groups' scales.
            g = torch.arange(rank * in_p, (rank + 1) * in_p, dtype=torch.int32) // gs
            layer.register_buffer("g_idx", g, persistent=False)
        else:
            layer.g_idx = None

        # The refusal placeholders: empty (vLLM does not expect them), checked when they arrive.
        for suffix in PLACEHOLDER_SUFFIXES:
            p = BasevLLMParameter(data=torch.empty(0, dtype=torch.uint8), weight_loader=self._placeholder_loader(layer, suffix))
            layer.register_parameter(suffix, p)

    def _check_shard(self, prefix: str, input_size: int, in_p: int, out_sizes: List[int]) -> None:
        qc, bits = self.qc, self.spec.bits
        if qc.layout == "gptq":
            per = math.lcm(bits, 32) // bits  # codes per repeating block of packed words
            if input_size % per:
                raise CheckpointError(
                    f"layer {prefix!r}: {input_size} input features are not a multiple of {per}, "
                    f"which {bits}-bit gptq packing needs"
                )
            if in_p % per:
                raise CheckpointError(
                    f"layer {prefix!r}: tensor parallelism splits its {input_size} input features into shards of "
                    f"{in_p}, which is not a multiple of {per}: a shard cannot hold whole {bits}-bit packed words; "
                    "use a smaller tensor_parallel_size"
                )
        else:
            bad = [s for s in out_sizes if s % 8]
            if bad:
                raise CheckpointError(
                    f"layer {prefix!r}: output shard sizes {list(out_sizes)} are not all multiples of 8: the awq "
                    "layout packs 8 output columns per word, so a shard cannot hold whole packed words; use a "
                    "smaller tensor_parallel_size or the gptq layout"
                )

    # -- loading checks ----------------------------------------------------------------------------
    def _key(self, layer, shard_id) -> str:
        prefix = layer.afpq_info.prefix
        names = self.config.shard_names(prefix)
        if shard_id is None or len(names) == 1:
            return prefix
        idx = _QKV.index(shard_id) if shard_id in _QKV else shard_id
        if isinstance(idx, int) and 0 <= idx < len(names):
            return names[idx]
        return f"{prefix}[shard {shard_id}]"

    @staticmethod
    def _full_out(layer, shard_id) -> int:
        """Output features of the checkpoint tensor for this shard (before TP narrowing)."""
        if shard_id is None:
            return int(layer.output_size)
        if shard_id in _QKV:
            heads = layer.total_num_heads if shard_id == "q" else layer.total_num_kv_heads
            size = layer.v_head_size if shard_id == "v" else layer.head_size
            return int(heads * size)
        if isinstance(shard_id, tuple):
            return int(sum(layer.output_sizes[i] for i in shard_id))
        return int(layer.output_sizes[shard_id])

    def _checked_loader(self, layer, suffix: str, loader: Callable) -> Callable:
        qc, spec = self.qc, self.spec

        def load(param, loaded_weight: torch.Tensor, shard_id=None):
            name = self._key(layer, shard_id)
            key = f"{name}.{suffix}"
            out_f = self._full_out(layer, shard_id)
            try:
                shape, dtype = expected_layer_tensors(qc, int(layer.input_size), out_f, False, spec=spec)[suffix]
            except ValueError as exc:
                raise CheckpointError(f"tensor {key!r}: {exc}") from None
            if tuple(loaded_weight.shape) != tuple(shape):
                raise CheckpointError(
                    f"tensor {key!r} has shape {tuple(loaded_weight.shape)}, expected {tuple(shape)} "
                    f"({spec.fmt} {spec.bits}-bit, {qc.layout} layout, group_size {spec.group_size}, "
                    f"in_features {layer.input_size}, out_features {out_f})"
                )
            if dtype is not None and loaded_weight.dtype != dtype:
                raise CheckpointError(f"tensor {key!r} has dtype {loaded_weight.dtype}, expected {dtype}")
            if loaded_weight.is_floating_point() and not torch.isfinite(loaded_weight).all():
                raise CheckpointError(f"tensor {key!r} holds NaN or Inf")
            if suffix == "g_idx":
                self._check_g_idx(layer, key, loaded_weight)
            return loader(param, loaded_weight) if shard_id is None else loader(param, loaded_weight, shard_id)

        return load

    def _check_g_idx(self, layer, key: str, g: torch.Tensor) -> None:
        groups = self.spec.groups(int(layer.input_size))
        if g.numel() and (int(g.min()) < 0 or int(g.max()) >= groups):
            raise CheckpointError(f"tensor {key!r} indexes groups outside 0..{groups - 1}")
        seen = getattr(layer, "_afpq_g_idx_seen", None)
        if seen is None:
            layer._afpq_g_idx_seen = (key, g.detach().to("cpu", torch.int32).clone())
        elif not torch.equal(seen[1], g.detach().to("cpu", torch.int32)):
            raise CheckpointError(
                f"tensor {key!r} differs from {seen[0]!r}: vLLM fuses these layers into "
                f"{layer.afpq_info.prefix!r}, which needs one input order (g_idx) for all of them"
            )

    @staticmethod
    def _placeholder_loader(layer, suffix: str) -> Callable:
        def load(param, loaded_weight: torch.Tensor, shard_id=None):
            if not is_refusal_placeholder(loaded_weight.shape, loaded_weight.dtype):
                prefix = layer.afpq_info.prefix
                raise CheckpointError(
                    f"unexpected tensor '{prefix}.{suffix}' ({loaded_weight.dtype}, shape {tuple(loaded_weight.shape)})"
                    f" (shard {shard_id}) in quantized layer {prefix!r}: an AFPQ layer has no float weight or INT "
                    "zero-points; only the uint8 [1] refusal placeholder may use that key"
                )

        return load

    # -- after loading -------------------------------------------------------------------------------
    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        info: _LayerInfo = layer.afpq_info
        for suffix in PLACEHOLDER_SUFFIXES:
            if suffix in layer._parameters:
                del layer._parameters[suffix]
        layer.__dict__.pop("_afpq_g_idx_seen", None)
        for name in ("qweight", "scales", info.second):
            if name is not None:
                p = getattr(layer, name)
                setattr(layer, name, torch.nn.Parameter(p.data, requires_grad=False))
        self._settle_g_idx(layer, info)
        second = getattr(layer, info.second) if info.second else None
        # One view per layer, kept alive here: kernels cache their repacked weights on it.
        layer.afpq_view = ops.register_view(ops.LayerView(
            layer.qweight, layer.scales, second, layer.g_idx, None, info.spec, info.in_features, info.out_features,
            info.default_order))

    @staticmethod
    def _settle_g_idx(layer, info: "_LayerInfo") -> None:
        g = layer.g_idx
        if g is None:
            info.default_order = True
            return
        gs = info.spec.effective_group_size(info.in_features)
        g = g.data
        if info.shard_groups:
            # Scales hold this shard's groups only: the order must be the plain one, in local ids.
            groups_p = info.in_features // gs
            plain = torch.arange(info.rank * info.in_features, (info.rank + 1) * info.in_features,
                                 device=g.device, dtype=torch.int32) // gs
            if not torch.equal(g.to(torch.int32), plain):
                raise CheckpointError(
                    f"layer {info.prefix!r}: g_idx is not the plain order but quantization_config.desc_act is false; "
                    "a row-parallel shard keeps only its own groups' scales then"
                )
            g = g - info.rank * groups_p
        groups = layer.scales.shape[0]
        if g.numel() and (int(g.min()) < 0 or int(g.max()) >= groups):
            raise CheckpointError(f"layer {info.prefix!r}: g_idx indexes groups outside 0..{groups - 1}")
        g = g.to(torch.int32).contiguous()
        if isinstance(layer._parameters.get("g_idx"), torch.nn.Parameter):
            setattr(layer, "g_idx", torch.nn.Parameter(g, requires_grad=False))
        else:
            layer.g_idx = g
        info.default_order = bool(torch.equal(g, default_g_idx(info.in_features, info.group_size, g.device)))

    # -- forward ---------------------------------------------------------------------------------------
    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        info: _LayerInfo = layer.afpq_info
        second = getattr(layer, info.second) if info.second else None
        return ops.linear(
            x, layer.qweight, layer.scales, second, layer.g_idx, bias, info.fmt, info.mode, info.layout,
            info.group_size, info.in_features, info.out_features, info.default_order,
        )
