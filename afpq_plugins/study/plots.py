"""The study's figures: perplexity against group size, and one real group's histogram with the grids."""

from __future__ import annotations

import os
from typing import Sequence, Tuple

import torch

from .plan import cell_ppl, rows_for, table_blocks, table_groups


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise RuntimeError("the plots need matplotlib (pip install matplotlib)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_results(sec: dict, path: str) -> str:
    """Perplexity against group size: one panel per method and bit width, one line per format."""
    plt = _pyplot()
    cells, fp32 = sec["cells"], (sec.get("fp32") or {}).get("ppl")
    blocks = table_blocks(cells)
    if not blocks:
        raise ValueError("no finished cells to plot")
    groups = sorted(table_groups(cells), key=lambda g: (g == -1, g))  # small groups left, whole rows right
    xs = {g: i for i, g in enumerate(groups)}
    fig, axes = plt.subplots(1, len(blocks), figsize=(3.6 * len(blocks), 3.6), squeeze=False)
    colors = {"int": "tab:gray", "fp": "tab:blue", "nf": "tab:red"}
    styles = {"afpq": "-", "sym": ":", "zp": "--"}
    handles = {}
    for ax, (method, bits) in zip(axes[0], blocks):
        for r in rows_for(method):
            pts = [(xs[g], cell_ppl(cells, method, r, bits, g)) for g in groups]
            pts = [(x, y) for x, y in pts if y is not None]
            if not pts:
                continue
            label = f"{r.family.upper()} {r.mode}" + (f" + {r.search} search" if r.search else "")
            (h,) = ax.plot([p[0] for p in pts], [p[1] for p in pts], styles[r.mode], color=colors[r.family],
                           marker={"mse": "s", "output": "^"}.get(r.search, "o"), markerfacecolor="none" if r.search else None,
                           alpha=0.6 if r.search else 1.0, label=label)
            handles.setdefault(label, h)
        if fp32 is not None:
            handles.setdefault("fp32", ax.axhline(fp32, color="black", lw=0.8, ls="-."))
        ax.set_yscale("log")
        ax.set_xticks(range(len(groups)))
        ax.set_xticklabels([str(g) if g != -1 else "-1 (row)" for g in groups])
        ax.set_xlim(-0.3, len(groups) - 0.7)
        ax.set_xlabel("group size")
        ax.set_title(f"{method.upper()} {bits}-bit", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("perplexity (log scale)")
    fig.legend(list(handles.values()), list(handles), loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)
    fig.suptitle(f"{'SmolLM2-135M (weights from a Q4_1 GGUF)' if sec['settings'].get('model') == 'default' else sec['settings'].get('model')}: "
                 "perplexity vs group size (lower is better)", fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    fig.savefig(path, dpi=80, bbox_inches="tight")
    plt.close(fig)
    return path


def _grid_points(w: torch.Tensor, fmt: str, mode: str, scale_dtype=torch.float16) -> torch.Tensor:
    """The values one group ``w`` (1-D) can take under ``fmt``/``mode`` with min/max scales."""
    from ..core.formats import get_format
    from ..core.quantize import decode_table, find_params, round_params

    f = get_format(fmt)
    p1, p2 = find_params(w.reshape(1, -1).float(), f, mode)
    p1, p2 = round_params(p1, p2, mode, scale_dtype)
    return torch.unique(decode_table(f, mode, p1.reshape(1), p2.reshape(1)).reshape(-1))


def pick_group(weight: torch.Tensor, group_size: int, quantile: float = 0.9) -> Tuple[int, int, float]:
    """(row, group index, skew) of the group at ``quantile`` of the skew ``|max + min| / (max - min)``.

    A typical skewed group, not the most extreme one: the rule is stated in the figure.
    """
    g = weight.detach().float().reshape(weight.shape[0], -1, group_size)
    mx, mn = g.amax(-1), g.amin(-1)
    skew = ((mx + mn).abs() / (mx - mn).clamp_min(1e-12)).reshape(-1)
    order = torch.argsort(skew)
    idx = int(order[min(len(order) - 1, int(quantile * len(order)))])
    ngroups = g.shape[1]
    return idx // ngroups, idx % ngroups, float(skew[idx])


def plot_group_histogram(weight: torch.Tensor, path: str, layer: str = "layer", group_size: int = 64,
                         quantile: float = 0.9, bits: Sequence[int] = (3, 4)) -> dict:
    """One group's weight histogram with INT, one-scale FP and two-scale FP grid points over it.

    Columns: bit widths; rows: INT (scale + zero), FP one scale (sym), FP two scales (AFPQ).
    Each panel names the group's mean squared rounding error and the layer's mean. Returns
    the numbers drawn (for the report).
    """
    from ..core.quantize import fake_quantize

    plt = _pyplot()
    row, gi, skew = pick_group(weight, group_size, quantile)
    weight = weight.detach()
    w = weight[row, gi * group_size:(gi + 1) * group_size].float()
    kinds = (("int", "zp", "INT (scale + zero-point)"), ("fp", "sym", "FP, one scale"), ("fp", "afpq", "FP, two scales (AFPQ)"))
    fig, axes = plt.subplots(len(kinds), len(bits), figsize=(5.2 * len(bits), 2.1 * len(kinds)), sharex=True, squeeze=False)
    info = {"layer": layer, "row": row, "group": gi, "group_size": group_size, "skew": skew, "quantile": quantile,
            "min": float(w.min()), "max": float(w.max()), "mse": {}}
    for j, b in enumerate(bits):
        for i, (fam, mode, title) in enumerate(kinds):
            ax = axes[i][j]
            fmt = f"{fam}{b}"
            pts = _grid_points(w, fmt, mode)
            wq = fake_quantize(w.reshape(1, -1), fmt, group_size, mode).reshape(-1)
            mse = float(((w - wq) ** 2).mean())
            layer_mse = float(((weight.float() - fake_quantize(weight.float(), fmt, group_size, mode)) ** 2).mean())
            info["mse"][f"{fmt}/{mode}"] = {"group": mse, "layer": layer_mse}
            ax.hist(w.numpy(), bins=32, color="0.75")
            for p in pts.tolist():
                ax.axvline(p, color="tab:red" if mode == "afpq" else ("tab:blue" if mode == "sym" else "tab:gray"), lw=1.2)
            ax.set_title(f"{fmt} {title}: {len(pts)} levels; MSE group {mse:.2e}, layer {layer_mse:.2e}", fontsize=8)
            ax.tick_params(labelsize=7)
    fig.suptitle(f"{layer}, row {row}, columns {gi * group_size}-{(gi + 1) * group_size - 1} (the group at the "
                 f"{int(quantile * 100)}th percentile of skew |max+min|/(max-min) = {skew:.2f}); "
                 f"SmolLM2 weights from a Q4_1 GGUF", fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return info
