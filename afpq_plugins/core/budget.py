"""Per-layer formats under a bits budget: the candidates, their storage cost, the allocator.

A *candidate* is a layer setting (format, group size, mode) applied to the run's
:class:`~afpq_plugins.core.spec.QuantSpec`. Its cost is counted exactly as the peers table
counts bits per weight: ``bits`` per weight for the codes plus, per group and output
column, the group parameters in the scale dtype (two scales for ``afpq``, one for ``sym``,
a scale and a ``bits``-bit zero-point for ``zp``, as the peers table counts INT formats; the checkpoint
stores zero-points in the scale dtype, which the model card's measured figure reflects).
A layer's cost in bits is an integer:
``out * in * bits + out * groups * extra``.

:func:`allocate` chooses one candidate per *unit* (a layer, or layers a host fuses and
therefore quantizes alike: q/k/v, gate/up) minimising the summed error subject to the
total cost staying within ``budget * weights`` bits: a multiple-choice knapsack, solved
exactly by dynamic programming over the cost when the cost range is small, else over
costs rounded *up* to a unit of ``budget / resolution`` (so the budget is never exceeded;
the choice is then optimal for the rounded costs).

:func:`fused_units` groups layer names the way vLLM fuses them
(``packed_modules_mapping``-style: the same parent, leaves in one of :data:`FUSED`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from .spec import QuantSpec, group_count

__all__ = ["Candidate", "DEFAULT_CANDIDATES", "FUSED", "layer_cost_bits", "bits_per_weight", "fused_units",
           "allocate", "Allocation"]

#: Leaf names a host fuses into one layer (vLLM's qkv_proj and gate_up_proj; Mixtral's w1/w3).
FUSED: Tuple[Tuple[str, ...], ...] = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("w1", "w3"))

_SCALE_BITS = {"float16": 16, "bfloat16": 16, "float32": 32}


@dataclass(frozen=True)
class Candidate:
    """One layer setting: a format, a group size and a mode (``None``: the format's default)."""

    fmt: str
    group_size: int
    mode: Optional[str] = None

    def spec(self, base: QuantSpec) -> QuantSpec:
        return replace(base, fmt=self.fmt, group_size=self.group_size, mode=self.mode)

    def label(self) -> str:
        return f"{self.fmt}/{self.mode or 'default'}/g{self.group_size}"


#: NF3 / NF4, groups of 32, 64 and 192 (all divide SmolLM2's 576 and 1536), two scales or one.
DEFAULT_CANDIDATES: Tuple[Candidate, ...] = tuple(
    Candidate(f, g, m) for f in ("nf3", "nf4") for g in (32, 64, 192) for m in ("afpq", "sym"))


def layer_cost_bits(spec: QuantSpec, in_features: int, out_features: int) -> int:
    """Stored bits of one ``[out, in]`` layer under ``spec`` (codes + group parameters)."""
    groups = group_count(in_features, spec.group_size)
    s = _SCALE_BITS[spec.scale_dtype]
    extra = {"afpq": 2 * s, "sym": s, "zp": s + spec.bits}[spec.mode]
    return out_features * in_features * spec.bits + out_features * groups * extra


def bits_per_weight(spec: QuantSpec, in_features: int, out_features: int) -> float:
    return layer_cost_bits(spec, in_features, out_features) / (in_features * out_features)


def fused_units(names: Sequence[str]) -> List[List[str]]:
    """The names grouped into units that get one choice: layers a host fuses (same parent,
    leaves in one :data:`FUSED` set) together, every other layer alone; in model order."""
    seen, units = set(), []
    by_name = set(names)
    for name in names:
        if name in seen:
            continue
        parent, _, leaf = name.rpartition(".")
        unit = [name]
        for group in FUSED:
            if leaf in group:
                unit = [f"{parent}.{x}" if parent else x for x in group if (f"{parent}.{x}" if parent else x) in by_name]
                break
        seen.update(unit)
        units.append(unit)
    return units


@dataclass(frozen=True)
class Allocation:
    """The chosen candidate index per unit, the summed error and the bits used."""

    choice: Tuple[int, ...]
    error: float
    bits: int
    exact: bool  # True: optimal for the exact costs; False: for costs rounded up to the DP's unit


def allocate(errors: Sequence[Sequence[float]], costs: Sequence[Sequence[int]], budget_bits: int,
             resolution: int = 20000, max_states: int = 1 << 20) -> Allocation:
    """Choose one candidate per unit minimising ``sum(errors[u][c])`` with ``sum(costs[u][c]) <= budget_bits``.

    ``errors[u][c]`` / ``costs[u][c]``: unit ``u`` under candidate ``c`` (``inf`` error: not
    allowed, e.g. a group size that does not divide the layer). ``ValueError`` when even the
    cheapest choice exceeds the budget.
    """
    if len(errors) != len(costs) or not errors:
        raise ValueError("allocate: errors and costs must list the same, non-empty units")
    cheapest = sum(min(c for e, c in zip(eu, cu) if math.isfinite(e)) for eu, cu in zip(errors, costs))
    if cheapest > budget_bits:
        raise ValueError(f"the bits budget ({budget_bits} bits) is below the cheapest choice ({cheapest} bits): "
                         "raise the budget or add cheaper candidates")
    lo = sum(min(cu) for cu in costs)
    span = budget_bits - lo  # DP over the cost above the minimum of every unit
    # Exact when the costs, in units of their greatest common step, span few enough states;
    # else costs rounded up to span / resolution (never over the budget).
    step = 0
    for cu in costs:
        for c in cu:
            step = math.gcd(step, c - min(cu))
    step = max(step, 1)
    unit = step if span // step <= max_states else max(step, math.ceil(span / resolution))
    cap = span // unit
    inf = float("inf")
    dp = torch.full((cap + 1,), inf, dtype=torch.float64)
    dp[0] = 0.0
    back = []
    for eu, cu in zip(errors, costs):
        base = min(cu)
        new = torch.full_like(dp, inf)
        arg = torch.full((cap + 1,), -1, dtype=torch.int16)
        for c, (e, cost) in enumerate(zip(eu, cu)):
            if not math.isfinite(e):
                continue
            k = math.ceil((cost - base) / unit)
            if k > cap:
                continue
            cand = torch.full_like(dp, inf)
            cand[k:] = dp[: cap + 1 - k] + e
            better = cand < new
            new = torch.where(better, cand, new)
            arg = torch.where(better, torch.tensor(c, dtype=torch.int16), arg)
        dp = new
        back.append(arg)
    end = int(torch.argmin(dp))
    if not math.isfinite(float(dp[end])):
        raise ValueError("allocate: no choice fits the budget at the DP's resolution; raise the budget")
    choice = []
    for u in range(len(errors) - 1, -1, -1):
        c = int(back[u][end])
        choice.append(c)
        end -= math.ceil((costs[u][c] - min(costs[u])) / unit)
    choice.reverse()
    total_e = math.fsum(errors[u][c] for u, c in enumerate(choice))
    total_b = sum(costs[u][c] for u, c in enumerate(choice))
    assert total_b <= budget_bits, (total_b, budget_bits)
    return Allocation(tuple(choice), total_e, total_b, exact=unit == step)


def candidate_specs(base: QuantSpec, candidates: Sequence[Candidate]) -> List[QuantSpec]:
    """The candidates as specs on ``base`` (layout, scale dtype and search kept); an invalid one
    (a mode the format does not support) is a ``ValueError`` naming it."""
    out = []
    for c in candidates:
        try:
            out.append(c.spec(base))
        except ValueError as exc:
            raise ValueError(f"candidate {c.label()}: {exc}") from None
    return out


def unit_costs(specs: Sequence[QuantSpec], shapes: Mapping[str, Tuple[int, int]], unit: Sequence[str]) -> List[int]:
    """Bits of ``unit`` (its layers' ``(in, out)``) under each spec (0 where a group size does not divide)."""
    out = []
    for s in specs:
        try:
            out.append(sum(layer_cost_bits(s, *shapes[n]) for n in unit))
        except ValueError:
            out.append(0)
    return out


__all__ += ["candidate_specs", "unit_costs"]


def summary(choice: Mapping[str, QuantSpec], shapes: Mapping[str, Tuple[int, int]]) -> Dict[str, float]:
    """``{"nf4/afpq g64": share of weights, ...}`` of a per-layer choice."""
    total = sum(i * o for i, o in shapes.values())
    out: Dict[str, float] = {}
    for name, s in choice.items():
        i, o = shapes[name]
        out[s.describe()] = out.get(s.describe(), 0.0) + i * o / total
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


__all__ += ["summary"]
