"""``AFPQVllmConfig``: vLLM's ``QuantizationConfig`` for ``quant_method: "afpq"``.

The checkpoint's ``quantization_config`` is parsed and validated by core
(:class:`~afpq_plugins.core.checkpoint.AFPQConfigDict`), so an unknown format, mode or
layout fails here, before any weight is read, with the key named. vLLM-specific
limits are checked on top: the layout/bits pairs the kernels run (``gptq`` 2/3/4/8
bits, ``awq`` 4 bits) and a float ``lm_head`` (a quantized output head is not served).

Which layers are quantized: ``quantized_modules`` of the checkpoint (written by every
AFPQ writer); for older checkpoints without it, the layers that have a ``.qweight``
tensor in the safetensors headers (read in :meth:`maybe_update_config`, no data is
loaded). vLLM fuses layers (``qkv_proj`` = q/k/v, ``gate_up_proj`` = gate/up): a fused
layer is quantized when all its parts are, float when none is, and an error names it
when the parts disagree. Mixture-of-experts layers (``FusedMoE``) are served with float
experts only: a checkpoint whose experts are quantized is refused, naming the layer.
"""

from __future__ import annotations

import logging
from typing import Any, Dict, List, Optional

import torch
from vllm.model_executor.layers.linear import LinearBase, UnquantizedLinearMethod
from vllm.model_executor.layers.quantization import QuantizationMethods
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig, QuantizeMethodBase
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead

from ..core.checkpoint import AFPQConfigDict, CheckpointError, quantized_module_names
from ..core.spec import is_skipped  # the one rule for modules_to_not_convert

__all__ = ["AFPQVllmConfig", "SUPPORTED_BITS"]

log = logging.getLogger(__name__)

#: layout -> bits the vLLM linear method runs.
SUPPORTED_BITS = {"gptq": (2, 3, 4, 8), "awq": (4,)}


class AFPQVllmConfig(QuantizationConfig):
    """AFPQ weight-only quantization (two scales per group on an FP grid) for vLLM."""

    def __init__(self, qc: AFPQConfigDict) -> None:
        super().__init__()
        bits_ok = SUPPORTED_BITS.get(qc.layout, ())
        if qc.bits not in bits_ok:
            raise CheckpointError(
                f"quantization_config: layout {qc.layout!r} with bits {qc.bits} is not supported by the vLLM "
                f"adapter (gptq: 2/3/4/8 bits, awq: 4 bits)"
            )
        self.qc = qc
        self.spec = qc.spec  # the settings every layer is built with (registers a custom table)
        self.fmt = self.spec.format
        self.quantized: Optional[List[str]] = list(qc.quantized_modules) or None
        self.not_converted: List[str] = list(qc.modules_to_not_convert or [])

    def __repr__(self) -> str:
        q = self.qc
        return (f"AFPQVllmConfig(format={q.format}, bits={q.bits}, group_size={q.group_size}, mode={q.mode}, "
                f"layout={q.layout}, desc_act={q.desc_act})")

    # -- vLLM's interface ----------------------------------------------------------------
    @classmethod
    def get_name(cls) -> QuantizationMethods:
        return "afpq"  # type: ignore[return-value]

    @classmethod
    def get_supported_act_dtypes(cls) -> List[torch.dtype]:
        return [torch.float32, torch.float16, torch.bfloat16]

    @classmethod
    def get_min_capability(cls) -> int:
        return 60  # the torch kernel runs anywhere; Triton needs a CUDA GPU of this age or newer

    @staticmethod
    def get_config_filenames() -> List[str]:
        return []  # read from config.json's quantization_config

    @classmethod
    def from_config(cls, config: Dict[str, Any]) -> "AFPQVllmConfig":
        return cls(AFPQConfigDict.from_dict(config, source="quantization_config"))

    @classmethod
    def override_quantization_method(cls, hf_quant_cfg, user_quant, hf_config=None) -> Optional[QuantizationMethods]:
        if isinstance(hf_quant_cfg, dict) and hf_quant_cfg.get("quant_method") == "afpq" and user_quant in (None, "afpq"):
            return "afpq"  # type: ignore[return-value]
        return None

    @staticmethod
    def get_checkpoint_weight_mapper():
        """Keep every tensor: the base class drops ``.g_idx``, which AFPQ's act-order layers need."""
        from vllm.model_executor.models.utils import WeightsMapper

        return WeightsMapper()

    def apply_vllm_mapper(self, hf_to_vllm_mapper) -> None:
        if self.quantized is not None:
            self.quantized = hf_to_vllm_mapper.apply_list(self.quantized)
        self.not_converted = hf_to_vllm_mapper.apply_list(self.not_converted)

    def maybe_update_config(self, model_name: str, hf_config=None, revision: Optional[str] = None) -> None:
        if self.quantized is not None:
            return
        from vllm.transformers_utils.config import get_safetensors_params_metadata

        keys = list(get_safetensors_params_metadata(model_name, revision=revision))
        self.quantized = quantized_module_names(self.qc, keys)
        if not self.quantized:
            raise CheckpointError(f"{model_name}: an AFPQ checkpoint without any '<layer>.qweight' tensor")

    def get_quant_method(self, layer: torch.nn.Module, prefix: str) -> Optional[QuantizeMethodBase]:
        if isinstance(layer, ParallelLMHead):
            if self._quantized(prefix):
                raise CheckpointError(
                    f"layer {prefix!r}: a quantized output head is not supported by the vLLM adapter yet; "
                    "quantize with lm_head in modules_to_not_convert"
                )
            return None  # float embedding / head
        if isinstance(layer, LinearBase):
            if self._quantized(prefix):
                from .linear_method import AFPQLinearMethod

                return AFPQLinearMethod(self, self.layer_spec(prefix))
            return UnquantizedLinearMethod()
        inside = self._quantized_inside(prefix)
        if inside:  # a fused-experts layer (FusedMoE) over quantized experts: vLLM would fail on the keys
            raise CheckpointError(
                f"layer {prefix!r} ({type(layer).__name__}): the checkpoint quantizes its experts ({inside[0]!r}, "
                f"...): the vLLM adapter serves mixture-of-experts models with float experts only (quantized "
                "experts are not supported yet); quantize with the experts in modules_to_not_convert"
            )
        return None  # float experts (vLLM's unquantized method), embeddings, ...

    # -- helpers ---------------------------------------------------------------------------
    def shard_names(self, prefix: str) -> List[str]:
        """Checkpoint layer names behind a vLLM layer (``...qkv_proj`` -> q/k/v_proj)."""
        head, _, proj = prefix.rpartition(".")
        parts = self.packed_modules_mapping.get(proj)
        if not parts:
            return [prefix]
        return [f"{head}.{p}" if head else p for p in parts]

    def layer_spec(self, prefix: str):
        """The settings of vLLM layer ``prefix`` (per-module overrides applied); the checkpoint
        layers vLLM fuses into it must agree."""
        names = self.shard_names(prefix)
        specs = [self.qc.spec_for(n) for n in names]
        if any(s != specs[0] for s in specs[1:]):
            parts = ", ".join(f"{n}={s.describe()}" for n, s in zip(names, specs))
            raise CheckpointError(
                f"layer {prefix!r}: vLLM fuses {', '.join(names)} into one layer, but the checkpoint gives them "
                f"different settings ({parts}); quantize fused layers alike (afpq quantize --bits-budget does)"
            )
        return specs[0]

    def _quantized_inside(self, prefix: str) -> List[str]:
        """Quantized checkpoint layers under module ``prefix`` (a fused layer's parts)."""
        if not prefix or self.quantized is None:
            return []
        return [n for n in self.quantized if n.startswith(prefix + ".")]

    def _quantized(self, prefix: str) -> bool:
        names = self.shard_names(prefix)
        if self.quantized is not None:
            qset = set(self.quantized)
            flags = [n in qset for n in names]
        else:
            flags = [not is_skipped(n, self.not_converted) for n in names]
        if all(flags):
            return True
        if not any(flags):
            return False
        mixed = ", ".join(f"{n}={'quantized' if f else 'float'}" for n, f in zip(names, flags))
        raise CheckpointError(
            f"layer {prefix!r}: vLLM fuses {', '.join(names)} into one layer, but the checkpoint quantizes only "
            f"some of them ({mixed})"
        )
