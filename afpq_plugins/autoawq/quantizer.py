"""``AFPQAwqQuantizer``: AutoAWQ 0.2.9's ``AwqQuantizer`` on AFPQ grids.

Passed through AutoAWQ's ``quantizer_cls`` hook; ``BaseAWQForCausalLM.quantize``
forwards its extra keyword arguments to the constructor, so::

    model.quantize(tok, quant_config={"w_bit": 3, "q_group_size": 64, "zero_point": True,
                                      "version": "gemm"},
                   quantizer_cls=AFPQAwqQuantizer, fmt="nf3", clip="two-sided")

What changes against upstream, and nothing else:

* :meth:`pseudo_quantize_tensor` is the core maths (``find_params`` / ``round_params``
  / ``fake_quantize_groups``, scales rounded to their storage dtype), so AWQ's scale
  search (``_compute_best_scale``) and clip search run against the AFPQ grid.
* :meth:`_apply_quant` builds :class:`~afpq_plugins.nn.AFPQLinear` modules (4-bit: the
  AutoAWQ GEMM layout ``awq``; 3-bit: the ``gptq`` layout, since the GEMM packer is
  4-bit only) instead of ``WQLinear_*``.
* ``clip="symmetric"`` (default) is AutoAWQ's clip search (same candidates
  ``[-max_val, max_val]``, score and tie rule) computed exactly with matmuls
  (core's :func:`~afpq_plugins.core.search.symmetric_clip`, ~10x faster on CPU);
  ``clip="autoawq"`` runs AutoAWQ's own ``_compute_best_clip`` verbatim;
  ``clip="two-sided"`` shrinks the positive and the negative extreme of each group
  independently (core's :func:`~afpq_plugins.core.search.two_sided_clip`).
* On CPU the scale search runs under :func:`~afpq_plugins.autoawq.compat.snapshot_state_dict`:
  AutoAWQ 0.2.9 otherwise piles the scales of all candidates into the weights there.
  The KV cache is off during the run (captured layer inputs would carry a growing cache).
* ``q_group_size=-1`` (whole rows) works: AutoAWQ 0.2.9's ``_search_best_scale``
  does ``weight.view(-1, self.group_size)``, which fails for -1, so the scale search
  runs with ``group_size = in_features`` (the same grouping).
* ``layer_specs`` (per-module settings, a bits budget's choice): AutoAWQ searches one
  smoothing scale per group of Linears sharing an input (q/k/v, gate/up; o_proj and
  down_proj alone); the group's search, each Linear's clip search and its quantization
  run on that module's format, group size and mode (a group must share one setting, as a
  budget's fused units do; a group that does not is an error naming its modules).
"""

from __future__ import annotations

import contextlib
import warnings
from collections import defaultdict
from dataclasses import replace
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

with warnings.catch_warnings():  # AutoAWQ 0.2.9 warns at import that it is deprecated
    warnings.simplefilter("ignore")
    from awq.quantize.quantizer import AwqQuantizer
    from awq.utils.module import exclude_layers_to_not_quantize, get_named_linears, get_op_name, set_op_by_name

from .._patching import patched
from ..core.checkpoint import AFPQConfigDict
from ..core.formats import get_format, resolve_mode
from ..core.spec import QuantSpec
from ..core.output_search import BoundOutputSearch, grouped_energies, is_output_search
from ..core.quantize import fake_quantize_rows, quantize_weight
from ..core.constants import SCALE_DTYPES
from ..core.search import apply_two_sided_clip, symmetric_clip, two_sided_clip
from ..core.search_registry import resolve_search, search_dict
from ..nn import AFPQLinear
from .calib import calibration_token_lists
from .compat import snapshot_state_dict

__all__ = ["AFPQAwqQuantizer", "CLIP_MODES"]

CLIP_MODES = ("symmetric", "two-sided", "autoawq")
#: AutoAWQ's clip search skips these (q/k feed a bmm, hard to clip precisely).
_AVOID_CLIPPING = ("q_", "k_", "query", "key", "Wqkv")


class AFPQAwqQuantizer(AwqQuantizer):
    """AutoAWQ quantizer whose grid is an AFPQ format (see the module docstring).

    Extra keyword arguments (all optional):

    ``fmt``          format name (default ``nf{w_bit}``); its bits must equal ``w_bit``
    ``mode``         ``afpq`` (two scales), ``sym`` or ``zp`` (default: the format's)
    ``clip``         ``symmetric`` (AutoAWQ's search, fast), ``two-sided``, or ``autoawq``
                     (AutoAWQ's own code, slow)
    ``layout``       ``awq`` (4-bit only) or ``gptq`` (default: ``awq`` at 4 bits, else ``gptq``)
    ``scale_dtype``  storage dtype of the scales (default float16)
    ``scale_search`` ``None`` (the paper's min/max scales), ``"mse"`` or a
                     :class:`~afpq_plugins.core.quantize.ScaleSearch`: every group's
                     scales are searched (per side for two scales) inside AWQ's own scale
                     and clip searches and in the final quantization
    ``layer_specs``  ``{module name as in model.named_modules(): QuantSpec}``: those
                     Linears on their own format, group size and mode (layout, scale
                     dtype and scale search are this run's); see the module docstring

    ``calib_data`` may also be ``"austen"`` (embedded text) or token-id tensors
    (:func:`~afpq_plugins.autoawq.calib.calibration_token_lists`).
    """

    search = None  # the scale search (None: min/max); set by __init__
    layer_specs: Mapping[str, QuantSpec] = {}  # per-module settings; set by __init__

    def __init__(
        self, awq_model, model, tokenizer, w_bit, group_size, zero_point, version, calib_data,
        split, text_column, duo_scaling, *args, fmt=None, mode: Optional[str] = None,
        clip: str = "symmetric", layout: Optional[str] = None, scale_dtype=torch.float16, scale_search=None,
        layer_specs: Optional[Mapping[str, QuantSpec]] = None, **kwargs,
    ) -> None:
        try:
            self.search = resolve_search(scale_search)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"AFPQAwqQuantizer: scale_search: {exc}") from None
        # "output": min/max inside AWQ's scale search; after the clip search, each layer's
        # final scales are searched on the clip step's (scaled) calibration inputs
        self._output = self.search if is_output_search(self.search) else None
        if self._output is not None:
            self.search = None
        self._layer_search: Dict[str, object] = {}
        self.fmt = get_format(fmt if fmt is not None else f"nf{w_bit}")
        if self.fmt.bits != w_bit:
            raise ValueError(f"fmt {self.fmt.name!r} has {self.fmt.bits} bits but quant_config w_bit is {w_bit}")
        self.mode = resolve_mode(self.fmt, mode)
        if clip not in CLIP_MODES:
            raise ValueError(f"clip must be one of {', '.join(CLIP_MODES)}, got {clip!r}")
        self.clip = clip
        self.layout = QuantSpec(self.fmt, mode=self.mode, layout=layout).layout_for("awq")
        self._check_grid(self.fmt, self.mode, zero_point)
        if str(version).lower() != "gemm":
            raise ValueError(f"AFPQ modules replace AutoAWQ's GEMM modules only; quant_config version must be 'gemm', got {version!r}")
        if isinstance(scale_dtype, str):
            scale_dtype = SCALE_DTYPES[scale_dtype]
        self.scale_dtype = scale_dtype
        self.layer_specs: Dict[str, QuantSpec] = {}
        for name, ls in (layer_specs or {}).items():
            if not isinstance(ls, QuantSpec):
                raise TypeError(f"layer_specs[{name!r}] must be a QuantSpec, got {type(ls).__name__}")
            if (ls.scale_dtype, ls.search_dict()) != (str(scale_dtype).replace("torch.", ""), search_dict(scale_search)):
                raise ValueError(f"{name}: per-module settings may change format, group size and mode only "
                                 "(the scale dtype and the scale search are the run's)")
            self._check_grid(ls.format, ls.mode, zero_point, name)
            self.layer_specs[name] = ls
        self.quantized_modules: List[str] = []
        n = kwargs.get("max_calib_samples", 128)
        seqlen = kwargs.get("max_calib_seq_len", 512)
        calib_data = calibration_token_lists(calib_data, tokenizer, n, seqlen)
        # AutoAWQ 0.2.9 captures layer 0's keyword inputs once and replays them; with
        # use_cache on (transformers >= 4.36), they hold a DynamicCache that grows on
        # every replayed forward and corrupts the search. Off for the whole run.
        cfg = getattr(model, "config", None)
        self._scoped = contextlib.ExitStack()  # closed when quantize() ends
        if cfg is not None:
            self._scoped.enter_context(patched(cfg, "use_cache", False))
        super().__init__(
            awq_model, model, tokenizer, w_bit, group_size, zero_point, version, calib_data,
            split, text_column, duo_scaling, *args, **kwargs,
        )
        self._top = (self.fmt, self.mode, self.group_size)  # the settings of every layer without its own
        self._check_layer_specs()

    def _check_grid(self, f, mode: str, zero_point: bool, name: Optional[str] = None) -> None:
        who = f"{name}: " if name else ""
        if mode == "zp" and f.kind == "int" and not zero_point:
            raise ValueError(f"{who}INT grids use a zero-point here (mode 'zp'); set quant_config zero_point=True")
        if self.layout == "awq" and f.bits != 4:
            raise ValueError(f"{who}layout 'awq' (AutoAWQ GEMM) is 4-bit only; use layout 'gptq' for {f.bits} bits"
                             + (f" ({f.name}; a bits budget mixing bit widths needs --layout gptq)" if name else ""))

    def _check_layer_specs(self) -> None:
        """Before any search: every ``layer_specs`` name is a Linear AutoAWQ quantizes here, and
        takes its settings (group size), and the Linears AWQ scales together share one setting;
        errors name the modules."""
        if not self.layer_specs:
            return
        linears = {}
        for block in self.modules:
            prefix = get_op_name(self.model, block)
            named = exclude_layers_to_not_quantize(get_named_linears(block), self.modules_to_not_convert)
            linears.update({f"{prefix}.{n}": lin for n, lin in named.items()})
            try:  # AutoAWQ's description of the block's scaling groups (their inputs are not needed here)
                groups = self.awq_model.get_layers_for_scaling(block, defaultdict(lambda: None), {})
            except Exception:  # a description that needs the real inputs: checked when the group is searched
                groups = []
            for g in groups:
                self._common_setting([get_op_name(self.model, lin) for lin in g["layers"]])
        for name, ls in self.layer_specs.items():
            if name not in linears:
                raise ValueError(f"layer_specs names {name!r}, which AutoAWQ 0.2.9 does not quantize in this model "
                                 "(its decoder layers' Linears, less modules_to_not_convert)")
            w = linears[name].weight
            ls.layer(w.shape[1], w.shape[0], name, layout=self.layout)

    # -- the grid ----------------------------------------------------------------------
    @property
    def _row_group(self) -> int:
        return self.group_size if self.group_size > 0 else -1

    def pseudo_quantize_tensor(self, w: torch.Tensor):
        """Quantize-dequantize ``w`` (any leading dims; last dim = input columns).

        Returns ``(w_hat, p1, p2)``: ``w_hat`` in ``w``'s shape and dtype; ``p1`` / ``p2``
        the group parameters, ``[w.shape[0], groups per leading row]``, float32 holding
        storage-dtype values: s_pos / s_neg (``afpq``), s / s (``sym``), s / zero (``zp``).
        """
        return fake_quantize_rows(w, self.fmt, self.group_size, self.mode, self.scale_dtype, self.search,
                                  "AWQ weight")

    # -- per-module settings --------------------------------------------------------------
    def _setting(self, name: str) -> Tuple:
        """(format, mode, group size) of module ``name``."""
        ls = self.layer_specs.get(name)
        return self._top if ls is None else (ls.format, ls.mode, ls.group_size)

    def _common_setting(self, names: Sequence[str]) -> Tuple:
        """The one setting of the modules ``names`` (AWQ scales them together); else a ``ValueError`` naming them."""
        settings = {n: self._setting(n) for n in names}
        if len(set(settings.values())) > 1:
            label = ", ".join(f"{n} {f.name}/{m}/g{g}" for n, (f, m, g) in settings.items())
            raise ValueError(f"AWQ searches one smoothing scale for Linears that share an input, so they need one "
                             f"setting; per-module settings differ: {label}")
        return next(iter(settings.values()))

    @contextlib.contextmanager
    def _settings_of(self, names: Sequence[str]):
        """The grid, mode and group size of the modules ``names`` (which must share one setting)
        for the duration of the block (without per-module settings: the run's, as they are)."""
        if not self.layer_specs:
            yield
            return
        with self._using(*self._common_setting(names)):
            yield

    @contextlib.contextmanager
    def _using(self, fmt, mode: str, group_size: int):
        old = (self.fmt, self.mode, self.group_size)
        self.fmt, self.mode, self.group_size = fmt, mode, group_size
        try:
            yield
        finally:
            self.fmt, self.mode, self.group_size = old

    # -- scale search: the group's setting; group -1 -----------------------------------------
    def _search_best_scale(self, module, prev_op, layers, inp, module2inspect=None, kwargs={}):
        with self._settings_of([get_op_name(self.model, lin) for lin in layers]):
            if self.group_size > 0:
                return super()._search_best_scale(module, prev_op, layers, inp, module2inspect, kwargs)
            # AutoAWQ 0.2.9 reshapes to [-1, group_size]; a whole-row group is in_features.
            with self._using(self.fmt, self.mode, layers[0].weight.shape[1]):
                return super()._search_best_scale(module, prev_op, layers, inp, module2inspect, kwargs)

    def _compute_best_scale(self, x, w_mean, x_mean, module2inspect, linears2scale, fp16_output, kwargs={}):
        # AutoAWQ 0.2.9 on CPU corrupts the weights it means to restore (compat.snapshot_state_dict)
        with snapshot_state_dict(module2inspect):
            return super()._compute_best_scale(x, w_mean, x_mean, module2inspect, linears2scale, fp16_output, kwargs)

    # -- clip search ---------------------------------------------------------------------
    @torch.no_grad()
    def _search_best_clip(self, layer, named_linears, input_feat):
        """Each Linear's clip search on its own setting (and, for the output search, its
        energies grouped by its group size)."""
        prefix = get_op_name(self.model, layer)
        clip_list = []
        for name, lin in named_linears.items():
            with self._settings_of([f"{prefix}.{name}"]):
                clip_list += self._clip_one(layer, prefix, name, lin, input_feat)
        return clip_list

    def _clip_one(self, layer, prefix: str, name: str, lin, input_feat) -> list:
        if self._output is not None:  # energies of the inputs the quantized weights will see
            x = input_feat[name].reshape(-1, lin.weight.shape[1]).float()
            h = grouped_energies((x * x).sum(0), self._row_group).to(lin.weight.device)
            self._layer_search[f"{prefix}.{name}"] = BoundOutputSearch(self._output, h, name=f"{prefix}.{name}")
        if self.clip == "autoawq":
            return super()._search_best_clip(layer, {name: lin}, input_feat)
        if any(k in name for k in _AVOID_CLIPPING):  # as AutoAWQ: q/k feed a bmm
            return []
        if self.clip == "symmetric":
            # same candidates, score and tie rule as AutoAWQ's _compute_best_clip;
            # AutoAWQ's apply_clip clamps to [-max_val, max_val]
            return [(name, self._symmetric_clip(lin.weight.data, input_feat[name]))]
        # two-sided: applied here; apply_clip only knows [-max, max]
        lo, hi = self._two_sided_clip(lin.weight.data, input_feat[name])
        lin.weight.data = apply_two_sided_clip(lin.weight.data, lo, hi)
        return []

    def _fq(self, t: torch.Tensor) -> torch.Tensor:
        return self.pseudo_quantize_tensor(t)[0]

    def _symmetric_clip(self, w: torch.Tensor, input_feat: torch.Tensor, **kw) -> torch.Tensor:
        """AutoAWQ's clip search on this grid: core's :func:`~afpq_plugins.core.search.symmetric_clip`."""
        return symmetric_clip(w, input_feat, self._fq, self.group_size, **kw)

    def _two_sided_clip(self, w: torch.Tensor, input_feat: torch.Tensor, separable: Optional[bool] = None, **kw):
        """Independent positive/negative clipping: core's :func:`~afpq_plugins.core.search.two_sided_clip`
        (separable, 2n quantizations, in mode ``afpq``; every pair otherwise)."""
        if separable is None:
            separable = self.mode == "afpq"
        return two_sided_clip(w, input_feat, self._fq, self.group_size, separable, **kw)

    # -- AFPQ modules ------------------------------------------------------------------------
    def _apply_quant(self, module, named_linears: Dict[str, nn.Linear]):
        """The decoder layer ``module``'s Linears as AFPQ layers, validate then mutate: every
        new layer is built (its weight checked and quantized; errors name the layer) before
        the first one replaces its Linear, so a failure leaves ``module`` as it was."""
        prefix = get_op_name(self.model, module)
        built = []
        for name, lin in named_linears.items():
            full = f"{prefix}.{name}"
            search = self.search
            if self._output is not None:
                if full not in self._layer_search:
                    raise ValueError(f"{full}: scale search 'output' takes its energies in AWQ's clip step "
                                     "(apply_clip=False skips it)")
                search = self._layer_search[full]
            with self._settings_of([full]):
                qw = quantize_weight(
                    lin.weight.data, self.fmt, self._row_group, self.mode, self.scale_dtype, name=f"{full}.weight",
                    search=search,
                )
            q = AFPQLinear.from_quantized(qw, lin.bias, layout=self.layout, name=full)
            built.append((name, full, q.to(lin.weight.device)))
        for name, full, q in built:
            set_op_by_name(module, name, q)
            self.quantized_modules.append(full)

    def quantize(self):
        try:
            super().quantize()
        finally:
            self._scoped.close()
        if not self.export_compatible:
            self._attach_config()

    def pack(self):
        super().pack()
        self._attach_config()

    def afpq_config(self) -> AFPQConfigDict:
        """The checkpoint config (``layer_specs`` that differ from the top level go to ``modules``)."""
        skip = sorted({"lm_head", *self.modules_to_not_convert})
        f, mode, gs = self._top
        spec = QuantSpec(f, gs if gs > 0 else -1, mode, self.scale_dtype, self.layout, tuple(skip),
                         self._output or self.search)
        return AFPQConfigDict.from_spec(
            spec, "awq", quantized_modules=list(self.quantized_modules),
            layer_specs={n: replace(spec, fmt=s.fmt, group_size=s.group_size, mode=s.mode)
                         for n, s in self.layer_specs.items()},
            extra={"awq": {"clip": self.clip if self.apply_clip else "none", "duo_scaling": bool(self.duo_scaling),
                           "version": "gemm", "upstream": "autoawq 0.2.9"}},
        )

    def _attach_config(self) -> None:
        from .saving import make_awq_model_safe

        qc = self.afpq_config()
        self.model._afpq_config = qc
        make_awq_model_safe(self.awq_model, qc, self.tokenizer)
