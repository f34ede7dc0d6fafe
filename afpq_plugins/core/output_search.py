"""Output-aware scale search: group scales chosen for the layer's output, not its weights.

The paper takes each group's two scales from its min and max; the ``mse`` search
(:class:`~afpq_plugins.core.quantize.ScaleSearch`) shrinks them to minimise the group's
weight error. What the model sees is the layer output ``X W^T``. For one output row
``w`` and a weight error ``e = w - w_hat``, the squared output error over calibration
inputs ``X`` is ``e^T (X^T X) e``. Keeping only the diagonal of ``X^T X`` gives the
objective used here::

    E(s) = sum_j h_j (w_j - w_hat_j(s)) ** 2,   h = diag(X^T X) (input-column energies)

so a weight on a column that carries most of the activation energy counts for more than
one on a quiet column, and large weights on loud columns are not clipped away (the
``mse`` search's failure on long groups).

* Mode ``afpq``: a positive weight is quantized with s_pos only and a negative one with
  s_neg only, so ``E`` is a positive-side term that depends on s_pos alone plus a
  negative-side term that depends on s_neg alone; each side is searched independently
  over the candidate shrink factors (``2 * grid`` evaluations for the best of
  ``grid ** 2`` pairs).
* Mode ``sym`` shrinks its one scale; mode ``zp`` shrinks both ends of the range together
  (same candidates as the ``mse`` search).
* ``objective="block"`` uses the full second moment within the group, ``e^T H_g e`` with
  ``H_g`` the group's diagonal block of ``X^T X``. The two sides then interact (cross
  terms), so mode ``afpq`` does coordinate descent from the min/max pair: best s_pos
  given s_neg, then best s_neg given s_pos, ``sweeps`` times. Costs ``group_size``
  times more than ``diag``; meant for groups of 128 columns or fewer.

Factor 1 (the unshrunk min/max pair) is the first candidate and a candidate replaces the
current best only when its objective is strictly lower, so the result is never worse
than min/max on the objective; columns with zero energy weigh nothing, and a group whose
columns all have zero energy keeps its min/max scales. Groups with one sign only, all
zeros or one element stay finite (a zero scale never divides; see
:mod:`afpq_plugins.core.quantize`).

:func:`input_energies` collects ``diag(X^T X)`` (and optionally ``X^T X``) of chosen
``nn.Linear`` inputs with forward hooks over a few calibration samples.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Dict, Iterable, Optional, Tuple

import torch

from .formats import get_format, resolve_mode
from .quantize import _minmax, _params_from_range, fake_quantize_groups, scan_scales
from .search import ScaleSearch
from .search_registry import register_search

__all__ = [
    "energy_hooks",
    "OutputSearch",
    "BoundOutputSearch",
    "ColumnCursorSearch",
    "is_output_search",
    "bind_layers",
    "gptq_column_energies",
    "resolve_output_search",
    "find_params_output",
    "output_error",
    "grouped_energies",
    "grouped_blocks",
    "input_energies",
]

_OBJECTIVES = ("diag", "block")


@dataclass(frozen=True)
class OutputSearch:
    """Output-aware search of the group scales (``search="output"``).

    Candidates shrink the min/max scale(s) by factors from 1 down to ``min_shrink``
    (``grid`` steps), as :class:`~afpq_plugins.core.quantize.ScaleSearch`; the objective
    is the energy-weighted squared error (``"diag"``) or the group's full second-moment
    quadratic form (``"block"``, ``sweeps`` rounds of coordinate descent in mode ``afpq``).
    """

    grid: int = 20
    min_shrink: float = 0.5
    objective: str = "diag"
    sweeps: int = 2

    def __post_init__(self) -> None:
        if self.grid < 1 or not 0.0 < self.min_shrink <= 1.0:
            raise ValueError(f"OutputSearch: grid must be >= 1 and 0 < min_shrink <= 1, "
                             f"got grid={self.grid}, min_shrink={self.min_shrink}")
        if self.objective not in _OBJECTIVES:
            raise ValueError(f"OutputSearch: objective must be one of {_OBJECTIVES}, got {self.objective!r}")
        if self.sweeps < 1:
            raise ValueError(f"OutputSearch: sweeps must be >= 1, got {self.sweeps}")

    def factors(self) -> list:
        """The shrink factors, 1 first (the same candidates as the ``mse`` search)."""
        return ScaleSearch(self.grid, self.min_shrink).factors()

    def to_dict(self) -> dict:
        return {"method": "output", "grid": self.grid, "min_shrink": self.min_shrink,
                "objective": self.objective, "sweeps": self.sweeps}


    def params(self, x: torch.Tensor, f, mode: str, dim: int = -1):
        raise ValueError("the output search needs calibration activations: bind the input-column energies of "
                         "the layer first (OutputSearch.bind(energies), or the method's calibration samples)")

    def bind(self, energies=None, second_moment=None) -> "BoundOutputSearch":
        """This search with the energies (broadcastable to the grouped weights) of one layer."""
        return BoundOutputSearch(self, energies, second_moment)


class BoundOutputSearch:
    """An :class:`OutputSearch` bound to one layer's energies: a scale-search object
    (``params(x, fmt, mode, dim)``, ``to_dict()``) that every quantize path accepts.

    ``energies`` must broadcast to the ``x`` the path passes (``[groups, gs]`` for RTN's
    ``[rows, groups, gs]`` chunks: see :func:`grouped_energies`).
    """

    def __init__(self, search: OutputSearch, energies=None, second_moment=None, name: str = "weight"):
        self.search, self.energies, self.second_moment, self.name = search, energies, second_moment, name

    def params(self, x: torch.Tensor, f, mode: str, dim: int = -1):
        return find_params_output(x, f, mode, self.energies, dim, self.search, self.second_moment, self.name)

    def to_dict(self) -> dict:
        return self.search.to_dict()


class ColumnCursorSearch:
    """For GPTQ engines, which find a group's parameters on ``W[:, i:i + k]`` without saying ``i``.

    Holds the energies of all ``in`` columns (in GPTQ's column order: permuted like ``W``
    under act-order) and walks them: a call on a block of ``k < in`` columns takes the next
    ``k`` energies; a call on all ``in`` columns (AutoGPTQ's first ``find_params(W)``) uses
    them all and restarts the walk at column 0. Calls must come in column order, as
    AutoGPTQ's and GPTQModel's loops (static groups included) make them.
    """

    def __init__(self, search: OutputSearch, energies: torch.Tensor, name: str = "weight"):
        self.search, self.energies, self.name = search, energies.float().reshape(-1), name
        self.pos = 0

    def params(self, x: torch.Tensor, f, mode: str, dim: int = -1):
        if dim not in (-1, x.dim() - 1):
            raise ValueError(f"{self.name}: the column walk reduces over the last dim only")
        n, k = self.energies.numel(), x.shape[-1]
        if k == n:
            h, self.pos = self.energies, 0
        else:
            if self.pos + k > n:
                raise ValueError(f"{self.name}: GPTQ asked for columns {self.pos}..{self.pos + k - 1} of {n}")
            h = self.energies[self.pos:self.pos + k]
            self.pos = (self.pos + k) % n
        return find_params_output(x, f, mode, h.to(x.device), -1, self.search, name=self.name)

    def to_dict(self) -> dict:
        return self.search.to_dict()

    def __deepcopy__(self, memo):
        # AutoGPTQ's static groups deep-copy the quantizer once per group: the copies must share the walk
        return self


def is_output_search(search) -> bool:
    """True for an unbound :class:`OutputSearch` (one that still needs calibration energies)."""
    return isinstance(search, OutputSearch)


def bind_layers(search: OutputSearch, energies: Dict[str, torch.Tensor], group_size: int) -> Dict[str, BoundOutputSearch]:
    """Per layer name, ``search`` bound to that layer's grouped energies (RTN's ``[rows, groups, gs]`` chunks)."""
    return {name: BoundOutputSearch(search, grouped_energies(h, group_size), name=name)
            for name, h in energies.items()}


def gptq_column_energies(H: torch.Tensor, actorder: bool = False) -> torch.Tensor:
    """diag(H) in the column order AutoGPTQ's ``fasterquant`` finds group parameters in
    (dead columns -> 1, then sorted by decreasing energy under act-order without static
    groups, as it does)."""
    d = torch.diag(H).clone().float()
    d[d == 0] = 1
    if actorder:
        d = d[torch.argsort(d, descending=True)]
    return d


def resolve_output_search(search) -> OutputSearch:
    """``"output"`` / ``None`` -> the default; an :class:`OutputSearch` as is; a dict from :meth:`OutputSearch.to_dict`."""
    if search is None or search == "output":
        return OutputSearch()
    if isinstance(search, OutputSearch):
        return search
    if isinstance(search, dict) and search.get("method", "output") == "output":
        return OutputSearch(**{k: v for k, v in search.items() if k != "method"})
    raise ValueError(f"output search {search!r}: expected 'output', an OutputSearch or its dict")


def _check_energies(h: torch.Tensor, shape, name: str) -> torch.Tensor:
    h = torch.as_tensor(h).float()
    try:
        h = torch.broadcast_to(h, shape)
    except RuntimeError:
        raise ValueError(f"{name}: energies of shape {tuple(h.shape)} do not broadcast to the groups' "
                         f"shape {tuple(shape)}") from None
    if not torch.isfinite(h).all() or (h < 0).any():
        raise ValueError(f"{name}: energies must be finite and non-negative (diag(X^T X) per input column)")
    return h


def _block_err(e: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """``e^T H e`` over the last dim (``e`` [..., g], ``H`` broadcastable to [..., g, g]), keepdim."""
    return ((e.unsqueeze(-2) @ H).squeeze(-2) * e).sum(-1, keepdim=True)


def output_error(x: torch.Tensor, x_hat: torch.Tensor, energies=None, second_moment=None) -> torch.Tensor:
    """The search's objective for given weights and their quantized values (float32, keepdim on the last dim)."""
    e = x.float() - x_hat.float()
    if second_moment is not None:
        return _block_err(e, second_moment.float())
    return (e * e * energies.float()).sum(-1, keepdim=True)


def find_params_output(
    x: torch.Tensor, fmt, mode: Optional[str] = None, energies=None, dim: int = -1, search=None,
    second_moment: Optional[torch.Tensor] = None, name: str = "weight",
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-group parameters of ``x`` (reducing over ``dim``, kept) minimising the output error.

    ``energies``: the input-column energies ``diag(X^T X)``, broadcastable to ``x`` (e.g.
    ``[groups, group_size]`` for ``x`` of shape ``[rows, groups, group_size]``).
    ``second_moment``: for ``objective="block"``, the group blocks of ``X^T X``,
    broadcastable to ``x.shape + (group_size,)`` along the reduced dim (``[groups, gs, gs]``).
    Same return convention as :func:`~afpq_plugins.core.quantize.find_params`.
    """
    f = get_format(fmt)
    mode = resolve_mode(f, mode)
    search = resolve_output_search(search)
    x = x.float()
    moved = dim not in (-1, x.dim() - 1)
    if moved and search.objective == "block":
        raise ValueError(f"{name}: the block objective reduces over the last dim only (got dim={dim})")
    if energies is not None and search.objective == "diag":
        energies = _check_energies(energies, x.shape, name)  # in x's own layout
    if moved:
        x = x.movedim(dim, -1)
        energies = None if energies is None else energies.movedim(dim, -1)
    if search.objective == "block":
        if second_moment is None:
            raise ValueError(f"{name}: the block objective needs second_moment (the group blocks of X^T X)")
        H = second_moment.float()
        if not torch.isfinite(H).all():
            raise ValueError(f"{name}: second_moment must be finite")
        err_of = lambda e: _block_err(e, H)  # noqa: E731
    else:
        if energies is None:
            raise ValueError(f"{name}: the output search needs the input-column energies diag(X^T X) "
                             "(calibration activations)")
        h = energies
        err_of = lambda e: (e * e * h).sum(-1, keepdim=True)  # noqa: E731
    xmax, xmin = _minmax(x, -1)
    factors = search.factors()

    def candidate(a: float, b: float):
        p1, p2 = _params_from_range(f, mode, xmax * a, xmin * b)
        return p1, p2, x - fake_quantize_groups(x, f, mode, p1, p2, torch.float32)

    if mode != "afpq" or search.objective == "diag":
        if mode == "afpq":  # separable: each side's error depends on its own scale only
            pos = (x > 0).float()
            neg = 1.0 - pos

            def side_errors(e):
                eh = e.mul_(e).mul_(h)
                return (eh * pos).sum(-1, keepdim=True), (eh * neg).sum(-1, keepdim=True)
        else:
            def side_errors(e):
                err = err_of(e)
                return err, err

        best1, best2 = scan_scales(x, f, mode, factors, side_errors, -1)
        return _restore(best1, dim, x), _restore(best2, dim, x)

    # afpq + block objective: coordinate descent from the min/max pair.
    pos = (x > 0).float()
    neg = 1.0 - pos
    p1, p2, e = candidate(1.0, 1.0)
    e_pos, e_neg = e * pos, e * neg
    cur = err_of(e)
    for _sweep in range(search.sweeps):
        for side in (0, 1):
            for a in factors:
                if side == 0:
                    q1, _q2, ec = candidate(a, 1.0)
                    e_try = ec * pos + e_neg
                else:
                    _q1, q2, ec = candidate(1.0, a)
                    e_try = e_pos + ec * neg
                err = err_of(e_try)
                take = err < cur
                cur = torch.where(take, err, cur)
                if side == 0:
                    p1 = torch.where(take, q1, p1)
                    e_pos = torch.where(take, ec * pos, e_pos)
                else:
                    p2 = torch.where(take, q2, p2)
                    e_neg = torch.where(take, ec * neg, e_neg)
    return _restore(p1, dim, x), _restore(p2, dim, x)


def _restore(p: torch.Tensor, dim: int, x: torch.Tensor) -> torch.Tensor:
    if dim in (-1, x.dim() - 1):
        return p
    return p.movedim(-1, dim)


# -- calibration energies ---------------------------------------------------------------------
def grouped_energies(h: torch.Tensor, group_size: int) -> torch.Tensor:
    """``[in]`` column energies -> ``[groups, group_size]`` (broadcasts over ``[rows, groups, gs]``)."""
    gs = h.numel() if group_size == -1 else group_size
    return h.reshape(-1, gs)


def grouped_blocks(H: torch.Tensor, group_size: int) -> torch.Tensor:
    """``[in, in]`` second moment -> its diagonal blocks ``[groups, gs, gs]``."""
    n = H.shape[0]
    gs = n if group_size == -1 else group_size
    g = n // gs
    idx = torch.arange(g, device=H.device)
    return H.reshape(g, gs, g, gs)[idx, :, idx, :]


def input_energies(
    model: torch.nn.Module, modules: Dict[str, torch.nn.Module], samples: Iterable[torch.Tensor],
    second_moment: bool = False, progress: bool = False,
) -> Dict[str, torch.Tensor]:
    """Run ``samples`` (token-id tensors) through ``model``; per module of ``modules``,
    return the energy of each input column, ``diag(X^T X)`` (float32 ``[in]``), or, with
    ``second_moment=True``, the whole ``X^T X`` (``[in, in]``), summed over every token.

    Forward pre-hooks on the given modules; removed afterwards even on error.
    """
    samples = list(samples)
    it = samples
    if progress:
        try:
            from tqdm.auto import tqdm

            it = tqdm(samples, desc="calibration energies", leave=False)
        except ImportError:
            pass
    with energy_hooks(modules, second_moment) as acc:
        dev = next(model.parameters()).device
        with torch.no_grad():
            for s in it:
                s = torch.as_tensor(s)
                model(s.reshape(1, -1).to(dev) if s.dim() == 1 else s.to(dev))
    return acc


@contextlib.contextmanager
def energy_hooks(modules: Dict[str, torch.nn.Module], second_moment: bool = False):
    """Yield ``{name: energies}`` that forward pre-hooks on ``modules`` fill while the block
    runs (what :func:`input_energies` sums: ``diag(X^T X)`` float32 ``[in]`` of each call's
    first argument, or ``X^T X``); the hooks are removed on exit even on error, and a module
    no input reached is a ``ValueError`` naming it."""
    acc: Dict[str, torch.Tensor] = {}

    def hook_for(name: str):
        def hook(mod, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            v = x.t() @ x if second_moment else (x * x).sum(0)
            if name in acc:
                acc[name] += v
            else:
                acc[name] = v
        return hook

    handles = [m.register_forward_pre_hook(hook_for(n)) for n, m in modules.items()]
    try:
        yield acc
    finally:
        for h in handles:
            h.remove()
    missing = [n for n in modules if n not in acc]
    if missing:
        raise ValueError(f"no calibration input reached module(s) {missing[:3]} (not called in the forward pass)")


register_search("output", lambda kw: OutputSearch(**kw))
