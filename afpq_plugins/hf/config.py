"""``AFPQConfig``: the transformers ``QuantizationConfigMixin`` for ``quant_method: "afpq"``.

It accepts every key of the checkpoint format (:class:`~afpq_plugins.core.checkpoint.AFPQConfigDict`,
validated by it, so an unknown format or a bad key is an error naming the key) plus the
calibration options of quantize-on-load (``dataset``, ``tokenizer``, ``damp_percent``, ...),
which are never written to ``config.json``.
"""

from __future__ import annotations

import copy
from typing import Any, Dict, List, Optional

from transformers.utils.quantization_config import QuantizationConfigMixin

from ..core.checkpoint import FORMAT_VERSION, QUANT_METHOD, AFPQConfigDict, CheckpointError
from ..core.formats import get_format, resolve_mode

__all__ = ["AFPQConfig", "CALIBRATION_KEYS"]

#: Options of quantize-on-load / optimum export. ``None`` means optimum's default. Those
#: that are set and JSON scalars or lists (``damp_percent``, ``true_sequential``, ...) are
#: written to ``config.json`` (GPTQ checkpoints record them); ``dataset`` and
#: ``tokenizer`` never are.
CALIBRATION_KEYS = (
    "dataset", "tokenizer", "damp_percent", "true_sequential", "model_seqlen", "block_name_to_quantize",
    "module_name_preceding_first_block", "batch_size", "pad_token_id", "cache_block_outputs",
    "modules_in_block_to_quantize", "static_groups", "act_group_aware", "use_cuda_fp16",
)


_NEVER_SERIALIZED = ("dataset", "tokenizer")


def _is_json(v) -> bool:
    if isinstance(v, (bool, int, float, str)):
        return True
    if isinstance(v, (list, tuple)):
        return all(_is_json(x) for x in v)
    return False


class AFPQConfig(QuantizationConfigMixin):
    """Quantization config of AFPQ checkpoints (load) and of quantize-on-load (calibrate).

    ``fmt`` and ``format`` are the same key (``format`` is what ``config.json`` holds).
    ``bits`` defaults to the format's bits and must match it.
    """

    def __init__(
        self,
        bits: Optional[int] = None,
        fmt: Optional[str] = None,
        group_size: int = 128,
        mode: Optional[str] = None,
        layout: str = "gptq",
        desc_act: bool = False,
        scale_dtype: str = "float16",
        method: Optional[str] = None,
        modules_to_not_convert: Optional[List[str]] = None,
        quantized_modules: Optional[List[str]] = None,
        table: Optional[List[float]] = None,
        version: int = FORMAT_VERSION,
        quant_method: str = QUANT_METHOD,
        # calibration (quantize on load / optimum export)
        dataset: Any = None,
        tokenizer: Any = None,
        damp_percent: Optional[float] = None,
        true_sequential: Optional[bool] = None,
        model_seqlen: Optional[int] = None,
        block_name_to_quantize: Optional[str] = None,
        module_name_preceding_first_block: Optional[List[str]] = None,
        batch_size: Optional[int] = None,
        pad_token_id: Optional[int] = None,
        cache_block_outputs: Optional[bool] = None,
        modules_in_block_to_quantize: Optional[List[List[str]]] = None,
        format: Optional[str] = None,  # noqa: A002 (the checkpoint's key)
        **kwargs,
    ) -> None:
        if fmt is not None and format is not None and str(fmt).lower() != str(format).lower():
            raise CheckpointError(f"quantization_config: fmt={fmt!r} and format={format!r} disagree")
        name = fmt if fmt is not None else format
        if name is None:
            raise CheckpointError("quantization_config: missing key 'format' (AFPQConfig(fmt=...))")
        # the same JSON types the checkpoint format requires (no silent coercion: both loaders agree)
        for key, v in (("format", name), ("modules_to_not_convert", modules_to_not_convert),
                       ("quantized_modules", quantized_modules), ("table", table), ("bits", bits)):
            if v is None:
                continue
            if key == "format" and not (isinstance(v, str) and v):
                raise CheckpointError(f"quantization_config.format must be a non-empty string, got {v!r:.200}")
            if key in ("modules_to_not_convert", "quantized_modules", "table") and not isinstance(v, (list, tuple)):
                raise CheckpointError(f"quantization_config.{key} must be a list, got {v!r:.200}")
            if key == "bits" and (not isinstance(v, int) or isinstance(v, bool)):
                raise CheckpointError(f"quantization_config.bits must be an integer, got {v!r:.200}")
        self.quant_method = quant_method
        if table is None:
            try:
                f = get_format(name)
            except ValueError as exc:
                raise CheckpointError(f"quantization_config.format: {exc}") from None
        else:
            f = None
        self.format = str(name).lower() if f is not None else str(name)
        self.bits = bits if bits is not None else (f.bits if f is not None else None)
        self.group_size = group_size
        self.mode = mode
        self.layout = layout
        self.desc_act = desc_act
        self.scale_dtype = scale_dtype
        self.method = method
        self.modules_to_not_convert = list(modules_to_not_convert) if modules_to_not_convert is not None else ["lm_head"]
        self.quantized_modules = list(quantized_modules or [])
        self.table = table
        self.version = version
        self.dataset = dataset
        self.tokenizer = tokenizer
        self.damp_percent = damp_percent
        self.true_sequential = true_sequential
        self.model_seqlen = model_seqlen
        self.block_name_to_quantize = block_name_to_quantize
        self.module_name_preceding_first_block = module_name_preceding_first_block
        self.batch_size = batch_size
        self.pad_token_id = pad_token_id
        self.cache_block_outputs = cache_block_outputs
        self.modules_in_block_to_quantize = modules_in_block_to_quantize
        self.extra: Dict[str, Any] = {k: v for k, v in kwargs.items() if k not in CALIBRATION_KEYS}
        for k in CALIBRATION_KEYS:  # rarely used optimum knobs ride along unserialized
            if k in kwargs:
                setattr(self, k, kwargs[k])
        self.post_init()

    # -- validation ------------------------------------------------------------------------
    def post_init(self) -> None:
        """Validate through the checkpoint format (errors name the key)."""
        self._qc = self.checkpoint_config()
        self.format, self.bits, self.mode = self._qc.format, self._qc.bits, self._qc.mode
        self.table = list(self._qc.table)

    def checkpoint_config(self) -> AFPQConfigDict:
        """This config as the checkpoint format's :class:`AFPQConfigDict` (validated)."""
        if self.bits is None:
            raise CheckpointError(f"quantization_config: missing key 'bits' for custom format {self.format!r}")
        mode = self.mode
        if mode is None:
            try:
                mode = resolve_mode(self.format)
            except ValueError:
                mode = "afpq"
        d = {
            "quant_method": self.quant_method, "version": self.version, "format": self.format, "bits": self.bits,
            "group_size": self.group_size, "mode": mode, "layout": self.layout, "desc_act": self.desc_act,
            "scale_dtype": self.scale_dtype, "method": self.method or ("gptq" if self.dataset is not None else "rtn"),
            "modules_to_not_convert": list(self.modules_to_not_convert),
            "quantized_modules": list(self.quantized_modules), "table": self.table,
        }
        d.update(self.extra)
        for k in CALIBRATION_KEYS:
            v = getattr(self, k, None)
            if k not in _NEVER_SERIALIZED and v is not None and _is_json(v):
                d[k] = v
        return AFPQConfigDict.from_dict(d, source="quantization_config")

    @property
    def spec(self):
        """The settings as the one settings value (:class:`~afpq_plugins.core.spec.QuantSpec`)."""
        return self._qc.spec

    @property
    def is_prequantized_checkpoint(self) -> bool:
        return bool(self.quantized_modules)

    # -- serialization -----------------------------------------------------------------------
    def to_dict(self) -> Dict[str, Any]:
        """Exactly the checkpoint format's ``quantization_config`` (calibration keys dropped)."""
        return self.checkpoint_config().to_dict()

    def to_diff_dict(self) -> Dict[str, Any]:
        return self.to_dict()

    def get_loading_attributes(self) -> Dict[str, Any]:
        return {}

    @classmethod
    def from_checkpoint_config(cls, qc: AFPQConfigDict, **calibration) -> "AFPQConfig":
        return cls(**qc.to_dict(), **calibration)

    def __deepcopy__(self, memo):
        # datasets and tokenizers are shared, not copied (transformers deep-copies configs)
        new = self.__class__.__new__(self.__class__)
        memo[id(self)] = new
        for k, v in self.__dict__.items():
            setattr(new, k, v if k in ("dataset", "tokenizer") else copy.deepcopy(v, memo))
        return new
