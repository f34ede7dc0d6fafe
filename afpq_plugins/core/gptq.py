"""GPTQ on an AFPQ grid: the quantizer every GPTQ engine (AutoGPTQ, GPTQModel, optimum) shares.

GPTQ engines own the algorithm (Hessian, error feedback, act-order, static groups,
``g_idx``); what differs from INT is the grid. Their per-layer ``Quantizer`` objects
share one contract: after ``find_params(W[:, cols], weight=True)`` the ``[rows, 1]``
tensors ``.scale`` / ``.zero`` are copied per group, and ``quantize(w)`` fake-quantizes a
``[rows, 1]`` column. Here:

* :class:`ColumnQuantizer`: one group's parameters and the fast column path;
* :class:`GridQuantizerMixin`: that contract on an AFPQ grid, mixed into each engine's
  ``Quantizer`` subclass (``.scale`` = s_pos and ``.zero`` = s_neg in mode ``afpq``; the
  one scale twice in ``sym``; scale and integer zero-point in ``zp``), scale search
  included (:mod:`afpq_plugins.core.search`);
* :func:`encode_gptq`: after GPTQ, the codes of a whole layer from the engine's
  ``[out, groups]`` scale / zero and ``g_idx``, their decode and the count of weights that
  do not decode back to GPTQ's value (zero when GPTQ used this quantizer).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from .formats import get_format, resolve_mode
from .quantize import _safe, check_finite, decode, decode_table, encode, find_params, round_params
from .search import ScaleSearch
from .search_registry import resolve_search

__all__ = ["ColumnQuantizer", "GridQuantizerMixin", "GPTQCodes", "encode_gptq"]


class ColumnQuantizer:
    """GPTQ's quantizer state for one group: parameters of every row, and a fast column path.

    GPTQ (AutoGPTQ's and gptqmodel's) computes a group's parameters once
    (``find_params`` on the group's columns) and then fake-quantizes one ``[rows, 1]``
    column at a time, so per-call work must be a handful of small ops. Built from the
    group's weights, this keeps ``p1`` / ``p2`` (``[rows, 1]``, storage-dtype values),
    the safe divisors, core's float32 rounding thresholds and each row's decoded value
    of every sorted grid position; :meth:`column` is then a division, one threshold
    count (compare and sum) and one ``gather``, equal to ``decode(encode(x))`` bit for bit.
    """

    def __init__(self, x: torch.Tensor, fmt, mode: Optional[str] = None, scale_dtype: torch.dtype = torch.float16,
                 perchannel: bool = True, search=None, name: str = "GPTQ weight") -> None:
        f = get_format(fmt)
        mode = resolve_mode(f, mode)
        rows = x.shape[0]
        x2 = x.flatten(1) if perchannel else x.flatten().unsqueeze(0)
        check_finite(x2, name)
        p1, p2 = round_params(*find_params(x2, f, mode, dim=-1, search=search), mode=mode, dtype=scale_dtype,
                              name=name)
        if not perchannel:
            p1, p2 = p1.expand(rows, 1), p2.expand(rows, 1)
        self._setup(f, mode, p1.reshape(rows, 1).clone(), p2.reshape(rows, 1).clone())

    @classmethod
    def from_params(cls, p1: torch.Tensor, p2: torch.Tensor, fmt, mode: Optional[str] = None) -> "ColumnQuantizer":
        """The column path for given parameters (one pair per row, any shape; already rounded to the
        storage dtype): for engines that compute the group parameters themselves (llm-compressor)."""
        self = cls.__new__(cls)
        f = get_format(fmt)
        self._setup(f, resolve_mode(f, mode), p1.reshape(-1, 1).float().clone(), p2.reshape(-1, 1).float().clone())
        return self

    def _setup(self, f, mode: str, p1: torch.Tensor, p2: torch.Tensor) -> None:
        self.fmt, self.mode, self.p1, self.p2 = f, mode, p1, p2
        self._div1, self._div2 = _safe(self.p1), _safe(self.p2)
        self._uniform = mode == "zp" and f.uniform_int
        self.table = decode_table(f, mode, self.p1.squeeze(1), self.p2.squeeze(1))  # [rows, 2**bits]
        if not self._uniform:
            dev = self.p1.device
            self._thresholds = f.thresholds(mode, dev)
            self._sorted_table = self.table.index_select(1, f.code_of_sorted(dev).long()).contiguous()

    @property
    def rows(self) -> int:
        return self.p1.shape[0]

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        return encode(x, self.fmt, self.mode, self.p1, self.p2)

    def column(self, x: torch.Tensor) -> torch.Tensor:
        """Fake-quantized ``[rows, 1]`` column (float32)."""
        x = x.float()
        if self._uniform:
            return torch.gather(self.table, 1, self.codes(x).long())
        if self.mode == "afpq":
            y = x / torch.where(x >= 0, self._div1, self._div2)  # w >= 0: s_pos, w < 0: s_neg
        elif self.mode == "sym":
            y = x / self._div1
        else:
            y = (x / self._div1).add_(self.p2)
        # the count of thresholds below y (= torch.bucketize(y, thresholds)) as one compare and one sum:
        # on a [rows, 1] column bucketize's CPU kernel splits the work over threads, whose start-up
        # dominated (ms per call on a busy 2-core machine) and made GPTQ's column loop slower than INT's
        idx = (y.unsqueeze(-1) > self._thresholds).sum(-1)
        return torch.gather(self._sorted_table, 1, idx)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Fake-quantize ``x`` (``x``'s dtype): the column path for ``[rows, 1]``, else decode(encode())."""
        if x.dim() == 2 and x.shape[1] == 1 and x.shape[0] == self.rows:
            return self.column(x).to(x.dtype)
        return decode(self.codes(x), self.fmt, self.mode, self.p1, self.p2, x.dtype)


class GridQuantizerMixin:
    """The GPTQ ``Quantizer`` contract on an AFPQ grid; mix in before the engine's ``Quantizer``.

    Call :meth:`_grid_init` from ``__init__``. The engine's GPTQ then calls
    ``find_params`` once per group and ``quantize`` once per column; parameters are
    rounded to the storage dtype before use, so GPTQ's error feedback sees exactly the
    weights the checkpoint decodes to.
    """

    def _grid_init(self, fmt, mode=None, scale_dtype: torch.dtype = torch.float16, search=None) -> None:
        self.fmt = get_format(fmt)
        self.mode = resolve_mode(self.fmt, mode)
        self.scale_dtype = scale_dtype
        self.search = resolve_search(search)
        self.perchannel = True
        self._ready = False

    def _check_bits(self, bits, trits: bool = False, who: str = "AFPQ") -> int:
        bits = self.fmt.bits if bits is None else int(bits)
        if bits != self.fmt.bits:
            raise ValueError(f"{who}: format {self.fmt.name!r} has {self.fmt.bits} bits, asked for {bits}")
        if trits:
            raise NotImplementedError(f"{who}: trits are not supported")
        return bits

    def _gptq_mse(self, grid: int = 100, maxshrink: float = 0.8, norm: float = 2.4) -> None:
        """The engine's ``mse`` option: GPTQ's own candidates as a scale search (unless one is set)."""
        if self.search is None:
            self.search = ScaleSearch.gptq_mse(grid, maxshrink, norm)

    def find_params(self, x, weight=False):
        if not weight:
            raise NotImplementedError(f"{type(self).__name__} quantizes weights only (weight=True)")
        self._q = ColumnQuantizer(x, self.fmt, self.mode, self.scale_dtype, self.perchannel, self.search)
        self.scale, self.zero = self._q.p1, self._q.p2
        self._ready = True

    def quantize(self, x):
        # GPTQ's [rows, 1] columns take the fast column path (ColumnQuantizer)
        return self._q(x) if self._ready else x

    def enabled(self):
        return True

    def ready(self):
        # A zero s_pos (a row with no positive weight) is a valid AFPQ parameter, so
        # readiness is "find_params has run", not the INT quantizers' ``all(scale != 0)``.
        return self._ready


class GPTQCodes(NamedTuple):
    codes: torch.Tensor  # [out, in] uint8
    decoded: torch.Tensor  # [out, in] what the codes decode to (the requested dtype)
    mismatches: int  # weights whose decode differs from GPTQ's value
    scales: torch.Tensor  # [groups, out] float32 (storage-dtype values)
    scales2: torch.Tensor  # [groups, out] float32: s_neg / zero / the scale again (sym)
    g_idx: torch.Tensor  # [in] int64


def encode_gptq(W: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, g_idx: Optional[torch.Tensor], fmt,
                mode: Optional[str], group_size: int, dtype: torch.dtype = torch.float32) -> GPTQCodes:
    """Codes of GPTQ's fake-quantized weight ``W`` (``[out, in]``) with the engine's group
    parameters ``scale`` / ``zero`` (``[out, groups]``) and ``g_idx`` (None: ``i // group_size``).

    ``decoded`` is the decode in ``dtype`` (the layer's dtype), ``mismatches`` the number of
    weights where it differs from ``W``.
    """
    f = get_format(fmt)
    mode = resolve_mode(f, mode)
    W = W.float()
    in_f = W.shape[1]
    p1 = scale.detach().float().t().contiguous().to(W.device)  # [groups, out]
    p2 = zero.detach().float().t().contiguous().to(W.device)
    if g_idx is None:
        gs = in_f if group_size == -1 else group_size
        g_idx = torch.arange(in_f, device=W.device) // gs
    gi = g_idx.detach().long().to(W.device)
    c1, c2 = p1[gi].t(), p2[gi].t()  # per-column parameters [out, in]
    codes = encode(W, f, mode, c1, c2)
    decoded = decode(codes, f, mode, c1, c2, dtype)
    mismatches = int((decoded.float() != W).sum())
    return GPTQCodes(codes, decoded, mismatches, p1, p2, gi)
