"""llm-compressor 0.14's ``GPTQModifier`` on an AFPQ grid: :class:`AFPQGPTQModifier`.

A drop-in for ``GPTQModifier`` in a ``oneshot`` recipe, through public extension points:

* a subclass of ``GPTQModifier`` (a pydantic ``Modifier``): its config groups are built
  from ``fmt`` / ``group_size`` (an INT proxy of the same bits and groups, which only
  drives llm-compressor's calibration hooks); its ``compress_module_list`` computes each
  group's AFPQ parameters with core (``find_params`` / ``round_params``, scale search
  included, from the weights before GPTQ, as llm-compressor does) and runs
  llm-compressor's own ``quantize_weight`` (Hessian, dampening, blocks, error feedback);
* the column quantization inside that GPTQ (core's ``ColumnQuantizer`` column path, one
  per group of the block, as in the other GPTQ engines) is registered with compressed-tensors'
  ``ImplBackend`` under ``gptq_block_update`` (its documented priority registry), active
  only while an AFPQ modifier compresses (a context variable), so INT recipes in the same
  process run the stock block update;
* each finished layer keeps llm-compressor's ``nn.Linear`` with the GPTQ weight and
  ``quantization_enabled = False`` (the documented switch that stops compressed-tensors'
  on-the-fly QDQ), so the next layers calibrate on the AFPQ weights; ``on_finalize``
  swaps the layers for :class:`~afpq_plugins.nn.AFPQLinear` (core's ``encode_gptq``).

Save with :func:`afpq_plugins.llmcompressor.save` (the project's checkpoint format), not
``save_pretrained`` (compressed-tensors has no AFPQ compressor).

Not supported here: activation ordering (``actorder`` other than None), batched or
distributed compression (one module at a time). AWQ: :mod:`afpq_plugins.llmcompressor.awq`.
"""

from __future__ import annotations

import contextvars
from typing import Any, Dict, Optional

import torch
from llmcompressor.modifiers.gptq import GPTQModifier
from pydantic import PrivateAttr, model_validator

from ..core.checkpoint import AFPQConfigDict
from ..core.gptq import ColumnQuantizer
from ..core.output_search import BoundOutputSearch, grouped_energies, is_output_search
from ..core.quantize import find_params, round_params
from ..nn.convert import linear_from_engine
from ..nn.skeleton import set_module
from ._common import afpq_fields, modifier_spec, module_spec, module_specs, record_config

__all__ = ["AFPQGPTQModifier"]

_ACTIVE: contextvars.ContextVar = contextvars.ContextVar("afpq_llmcompressor_grid", default=None)


def _register_block_update() -> None:
    from compressed_tensors.utils.impl_backend import ImplBackend
    from llmcompressor.modifiers.gptq.helpers import column_scale_window

    if "afpq_gptq_block_update" in ImplBackend._fn_registry:
        return

    @ImplBackend.register("gptq_block_update", req=lambda *a, **k: _ACTIVE.get() is not None, priority=-100)
    def afpq_gptq_block_update(W1, Hinv1, Q1, Err1, losses1, *, scale, zero_point, global_scale, g_idx,
                               quant_args, i1):
        """llm-compressor's eager block update with core's column quantization (AFPQ grid)."""
        fmt, mode = _ACTIVE.get()
        width = W1.shape[-1]
        p1, p2 = column_scale_window(scale, zero_point, global_scale, g_idx, quant_args, num_rows=W1.shape[-2],
                                     i1=i1, i2=i1 + width)
        per_column = p1.shape[-1] == width
        owner = _group_starts(p1, p2) if per_column else [0] * width
        quantizers: Dict[int, ColumnQuantizer] = {}  # one per group in the block (the column path's tables)
        for i in range(width):
            k = owner[i]
            cq = quantizers.get(k)
            if cq is None:
                cq = quantizers[k] = ColumnQuantizer.from_params(p1[..., k], p2[..., k], fmt, mode)
            w = W1[:, :, i]
            q = cq.column(w.reshape(-1, 1)).reshape(w.shape).to(w.dtype)
            diagonal = Hinv1[:, i, i]
            error = (w - q) / diagonal[:, None]
            Q1[:, :, i] = q
            Err1[:, :, i] = error
            losses1[:, :, i] = error.square()
            W1[:, :, i:] -= error.unsqueeze(-1) * Hinv1[:, i, i:].unsqueeze(1)


def _group_starts(p1: torch.Tensor, p2: torch.Tensor) -> list:
    """For each column of a ``[..., rows, width]`` parameter window, the first column of its run of
    columns with the same parameters (a group): their quantizer is built once."""
    same = ((p1[..., 1:] == p1[..., :-1]) & (p2[..., 1:] == p2[..., :-1])).flatten(0, -2).all(0).tolist()
    owner = [0]
    for i, s in enumerate(same, 1):
        owner.append(owner[-1] if s else i)
    return owner


class AFPQGPTQModifier(GPTQModifier):
    """``GPTQModifier`` whose grid is an AFPQ format (see the module docstring).

    ``fmt``: a registered format (``nf3``, ``fp4``, ...); ``group_size``: input columns
    per group (-1: whole rows); ``mode``: ``afpq`` (two scales, default), ``sym`` or
    ``zp``; ``scale_dtype``: storage dtype of the scales; ``scale_search``: ``None``,
    ``"mse"``, ... (:mod:`afpq_plugins.core.search`). ``targets`` / ``ignore`` /
    ``dampening_frac`` / ``block_size`` as in ``GPTQModifier``. ``layer_specs``:
    ``{module name: QuantSpec or {"fmt", "group_size", "mode"}}``, modules with settings of their
    own (a bits budget; :func:`._common.afpq_fields`), written to the config's ``modules``.
    """

    fmt: str = "nf4"
    group_size: int = 128
    mode: Optional[str] = None
    scale_dtype: str = "float16"
    scale_search: Optional[Any] = None
    layer_specs: Optional[Dict[str, Any]] = None

    _afpq_params: Dict[str, tuple] = PrivateAttr(default_factory=dict)
    _afpq_config: Optional[AFPQConfigDict] = PrivateAttr(default=None)

    @model_validator(mode="before")
    @classmethod
    def _afpq_scheme(cls, data):
        if not isinstance(data, dict):
            return data
        if data.get("actorder") not in (None,):
            raise ValueError("AFPQGPTQModifier: activation ordering is not supported (use actorder=None)")
        data = afpq_fields(data, "AFPQGPTQModifier")
        data["actorder"] = None
        data["batched_quantization"] = None
        return data

    # -- GPTQ with the AFPQ grid ------------------------------------------------------------
    def compress_module_list(self, module_list):
        from llmcompressor.modifiers.gptq.gptq_quantize import quantize_weight
        from llmcompressor.modifiers.gptq.helpers import prepare_batch

        _register_block_update()
        token = _ACTIVE.set(None)
        try:
            for module in module_list:
                name = self._module_names[module]
                spec = module_spec(self, name, "gptq")
                f = spec.format
                _ACTIVE.set((f, spec.mode))
                quant_args = module.quantization_scheme.weights
                with torch.no_grad():
                    weights, hessians, _, _, _ = prepare_batch(
                        [module], [module.weight_observer.get_qparams()], self._hessians, self._num_samples)
                    W = weights[0]
                    gs = spec.effective_group_size(W.shape[1])
                    wg = W.float().reshape(W.shape[0], -1, gs)
                    search = spec.scale_search
                    if is_output_search(search):  # weighted by GPTQ's own diag(X^T X) of this layer
                        h = torch.diagonal(hessians[0].reshape(W.shape[1], W.shape[1])).float()
                        search = BoundOutputSearch(search, grouped_energies(h.to(wg.device), gs), name=name)
                    p1, p2 = round_params(*find_params(wg, f, spec.mode, search=search), mode=spec.mode,
                                          dtype=spec.torch_scale_dtype, name=f"{name}.weight")
                    p1, p2 = p1[..., 0].to(W.device), p2[..., 0].to(W.device)  # [rows, groups]
                    quantized, _, _ = quantize_weight(
                        weights=weights, hessians=hessians, scale=p1[None], zero_point=p2[None], global_scale=None,
                        quant_args=quant_args, blocksize=self.block_size, percdamp=self.dampening_frac)
                    module.weight.data.copy_(quantized[0].to(module.weight.dtype))
                module.quantization_enabled = False  # compressed-tensors: no more QDQ on this module
                self._afpq_params[name] = (p1.cpu(), p2.cpu())
                self._num_compressed_modules += 1
        finally:
            _ACTIVE.reset(token)

    def on_finalize(self, state, **kwargs) -> bool:
        out = super().on_finalize(state, **kwargs)
        self._swap_in_afpq(state.model)
        return out

    def _swap_in_afpq(self, model) -> None:
        spec = self.spec
        order = [n for n, _ in model.named_modules()]
        names = sorted(self._afpq_params, key=order.index)
        for name in names:
            p1, p2 = self._afpq_params[name]
            layer, _ = linear_from_engine(module_spec(self, name, "gptq"), model.get_submodule(name), p1, p2, None,
                                          name)
            set_module(model, name, layer)
        self._afpq_config = AFPQConfigDict.from_spec(
            spec, "gptq", quantized_modules=names, layer_specs=module_specs(self, names, "gptq"),
            extra={"quantizer": "llmcompressor 0.14", "damp_percent": self.dampening_frac,
                   "block_size": self.block_size},
        )
        record_config(model, self._afpq_config)

    @property
    def spec(self):
        """The modifier's settings as a :class:`~afpq_plugins.core.spec.QuantSpec` (layout gptq)."""
        return modifier_spec(self, "gptq")

    @property
    def checkpoint_config(self) -> Optional[AFPQConfigDict]:
        return self._afpq_config
