"""Peers of AFPQ as fake-quantization baselines, with their bits per weight counted alike.

What a user choosing a 3-4 bit weight format compares AFPQ with:

* ``nvfp4``: NVIDIA's NVFP4. E2M1 codes, one FP8 (E4M3) scale per block of 16 weights,
  and one FP32 scale per tensor that maps the largest block scale onto E4M3's range
  (``global = amax(|W|) / (6 * 448)``; block scale ``e4m3(amax(block) / 6 / global)``;
  decoded weight ``code * block_scale * global``).
* ``mxfp4``: the OCP Microscaling format. E2M1 codes and one E8M0 (power-of-two) scale per
  block of 32: ``X = 2 ** (floor(log2(amax(block))) - 2)`` (2 = E2M1's largest exponent),
  elements ``w / X`` rounded to E2M1, values beyond 6 saturated to 6.
* ``bnb-nf4`` / ``bnb-nf4-dq``: bitsandbytes' NF4 (absmax per block of 64 in float32; with
  double quantization the absmaxes are themselves 8-bit quantized in blocks of 256), run
  through the ``bitsandbytes`` package's CPU path.
* ``hqq3`` / ``hqq4``: HQQ (half-quadratic optimisation of the zero-point and scale, group
  64, HQQ's default settings for the bit width) through the ``hqq`` package; scale and
  zero stored as float16 (as HQQ stores them).

E2M1 rounding is to the nearest value, ties to the even code (the spec's
round-to-nearest-even), saturating at +-6.

Bits per weight (:func:`bits_per_weight`) count the codes and every scale or zero
stored per group, per block or per tensor; the per-tensor terms are amortised over the
tensor. AFPQ's count is ``bits + 2 * 16 / group`` (two float16 scales); INT with scale +
zero is ``bits + (16 + bits) / group`` (a float16 scale and a ``bits``-bit zero-point, as
AutoGPTQ packs them).

The optional packages live in the ``bench`` extra (``pip install afpq-plugins[bench]``);
a peer whose package is missing raises :class:`PeerUnavailable` naming it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional

import torch

__all__ = [
    "E2M1_MAGNITUDES",
    "PeerUnavailable",
    "Peer",
    "PEERS",
    "round_e2m1",
    "round_e4m3",
    "nvfp4_fake_quantize",
    "mxfp4_fake_quantize",
    "bnb_nf4_fake_quantize",
    "hqq_fake_quantize",
    "bits_per_weight",
    "peer_available",
    "apply_peer",
    "peers_table",
]

E2M1_MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
E4M3_MAX = 448.0
E2M1_MAX = 6.0


class PeerUnavailable(RuntimeError):
    """A peer's optional package is not installed (or cannot run here)."""


def round_e2m1(y: torch.Tensor) -> torch.Tensor:
    """Round to the nearest E2M1 value (ties to the even code), saturating at +-6; float32."""
    y = y.float()
    mags = torch.tensor(E2M1_MAGNITUDES, dtype=torch.float32, device=y.device)
    a = y.abs().clamp(max=E2M1_MAX)
    mids = (mags[1:] + mags[:-1]) / 2  # exact in float32
    i = torch.bucketize(a, mids)  # mids[i-1] < a <= mids[i]: a midpoint goes to the lower index
    on_mid = (i < 7) & (a == mids[i.clamp(max=6)])
    i = torch.where(on_mid & (i % 2 == 1), i + 1, i)  # ties to the even code
    return torch.copysign(mags[i], y)


def round_e4m3(x: torch.Tensor) -> torch.Tensor:
    """Round positive scales to FP8 E4M3 (round-to-nearest-even, saturating at 448); float32."""
    return x.float().clamp(max=E4M3_MAX).to(torch.float8_e4m3fn).float()


def _blocks(w: torch.Tensor, block: int, name: str) -> torch.Tensor:
    if w.dim() != 2 or w.shape[1] % block:
        raise ValueError(f"{name}: needs a 2-D weight whose input width is a multiple of {block}, "
                         f"got shape {tuple(w.shape)}")
    return w.float().reshape(w.shape[0], -1, block)


def nvfp4_fake_quantize(w: torch.Tensor, block: int = 16, name: str = "weight") -> torch.Tensor:
    """NVFP4 quantize-dequantize of a 2-D ``[out, in]`` weight (blocks of 16 input columns)."""
    g = _blocks(w, block, name)
    amax_t = g.abs().max()
    if amax_t == 0:
        return torch.zeros_like(w)
    glob = amax_t / (E2M1_MAX * E4M3_MAX)  # per-tensor FP32 scale
    bs = round_e4m3(g.abs().amax(-1, keepdim=True) / E2M1_MAX / glob)  # E4M3 block scale
    eff = bs * glob
    q = round_e2m1(g / torch.where(eff == 0, torch.ones_like(eff), eff))
    return (q * eff).reshape(w.shape).to(w.dtype)


def mxfp4_fake_quantize(w: torch.Tensor, block: int = 32, name: str = "weight") -> torch.Tensor:
    """MXFP4 quantize-dequantize of a 2-D ``[out, in]`` weight (blocks of 32 input columns)."""
    g = _blocks(w, block, name)
    amax = g.abs().amax(-1, keepdim=True)
    _, e = torch.frexp(amax)  # amax = m * 2**e, m in [0.5, 1): floor(log2(amax)) = e - 1
    exp = (e - 1 - 2).clamp(-127, 127).float()  # E8M0 range
    x = torch.where(amax == 0, torch.ones_like(amax), torch.exp2(exp))
    q = round_e2m1(g / x)
    return (q * x).reshape(w.shape).to(w.dtype)


def bnb_nf4_fake_quantize(w: torch.Tensor, blocksize: int = 64, double_quant: bool = False,
                          name: str = "weight") -> torch.Tensor:
    """bitsandbytes NF4 quantize-dequantize (its CPU path); blocks run along rows, so with
    ``in % blocksize == 0`` each block is ``blocksize`` consecutive input columns."""
    try:
        import bitsandbytes.functional as F
    except Exception as exc:  # ImportError, or a broken native library
        raise PeerUnavailable(f"bitsandbytes is not usable here ({exc}); pip install 'afpq-plugins[bench]'") from None
    _blocks(w, blocksize, name)
    x = w.detach().float().contiguous().cpu()
    q, state = F.quantize_4bit(x, blocksize=blocksize, quant_type="nf4", compress_statistics=double_quant)
    return F.dequantize_4bit(q, state).reshape(w.shape).to(device=w.device, dtype=w.dtype)


def hqq_fake_quantize(w: torch.Tensor, bits: int, group_size: int = 64, name: str = "weight") -> torch.Tensor:
    """HQQ quantize-dequantize with HQQ's default settings for ``bits`` (groups of input columns);
    scale and zero rounded to float16 as HQQ stores them."""
    try:
        from hqq.core.quantize import BaseQuantizeConfig, Quantizer
    except Exception as exc:
        raise PeerUnavailable(f"hqq is not usable here ({exc}); pip install 'afpq-plugins[bench]'") from None
    _blocks(w, group_size, name)
    p = dict(BaseQuantizeConfig(nbits=bits, group_size=group_size)["weight_quant_params"])
    p.pop("view_as_float", None)
    wq, meta = Quantizer.quantize(w.detach().float().cpu(), bitpack=False, device="cpu", **p)
    scale, zero = meta["scale"].half().float(), meta["zero"].half().float()
    out = ((wq.float() - zero) * scale).reshape(w.shape)
    return out.to(device=w.device, dtype=w.dtype)


@dataclass(frozen=True)
class Peer:
    """A peer format: how it fake-quantizes a weight, its bit width and its bits per weight."""

    name: str
    label: str
    bits: int
    fn: Callable[[torch.Tensor, str], torch.Tensor]
    package: Optional[str] = None


PEERS: Dict[str, Peer] = {p.name: p for p in (
    Peer("nvfp4", "NVFP4 (E2M1, E4M3 scale / 16, FP32 / tensor)", 4, lambda w, n: nvfp4_fake_quantize(w, name=n)),
    Peer("mxfp4", "MXFP4 (E2M1, E8M0 scale / 32)", 4, lambda w, n: mxfp4_fake_quantize(w, name=n)),
    Peer("bnb-nf4", "bitsandbytes NF4 (absmax / 64)", 4,
         lambda w, n: bnb_nf4_fake_quantize(w, 64, False, name=n), "bitsandbytes"),
    Peer("bnb-nf4-dq", "bitsandbytes NF4 + double quant", 4,
         lambda w, n: bnb_nf4_fake_quantize(w, 64, True, name=n), "bitsandbytes"),
    Peer("hqq4", "HQQ 4-bit g64", 4, lambda w, n: hqq_fake_quantize(w, 4, 64, name=n), "hqq"),
    Peer("hqq3", "HQQ 3-bit g64", 3, lambda w, n: hqq_fake_quantize(w, 3, 64, name=n), "hqq"),
)}


def bits_per_weight(kind: str, bits: int = 4, group_size: int = 64, numel: Optional[int] = None,
                    in_features: Optional[int] = None) -> float:
    """Stored bits per weight: codes plus every scale / zero-point, per group, block or tensor.

    ``kind``: a peer name, ``"afpq"`` (two float16 scales per group), ``"sym"`` (one),
    ``"zp"`` (float16 scale + ``bits``-bit zero-point). ``numel`` (default: amortised away)
    spreads per-tensor terms; ``in_features`` resolves ``group_size=-1``.
    """
    per_tensor = 0.0 if numel is None else 1.0 / numel
    g = group_size
    if kind in ("afpq", "sym", "zp"):
        if g == -1:
            if in_features is None:
                raise ValueError("bits_per_weight: group_size -1 needs in_features")
            g = in_features
        extra = {"afpq": 32, "sym": 16, "zp": 16 + bits}[kind]
        return bits + extra / g
    if kind == "nvfp4":
        return 4 + 8 / 16 + 32 * per_tensor
    if kind == "mxfp4":
        return 4 + 8 / 32
    if kind == "bnb-nf4":
        return 4 + 32 / 64
    if kind == "bnb-nf4-dq":  # 8-bit absmax per 64, float32 absmax per 256 blocks, float32 offset per tensor
        return 4 + 8 / 64 + 32 / (64 * 256) + 32 * per_tensor
    if kind in ("hqq4", "hqq3"):
        return int(kind[-1]) + 2 * 16 / 64
    raise ValueError(f"bits_per_weight: unknown kind {kind!r}")


def peer_available(name: str) -> Optional[str]:
    """None when the peer can run here, else the reason (its package is missing)."""
    peer = PEERS[name]
    if peer.package is None:
        return None
    import importlib.util

    if importlib.util.find_spec(peer.package) is None:
        return f"{peer.package} is not installed (pip install 'afpq-plugins[bench]')"
    return None


def apply_peer(model: torch.nn.Module, name: str) -> None:
    """Fake-quantize every ``nn.Linear`` of ``model`` but ``lm_head`` with peer ``name`` (in place)."""
    from ..model import find_linears

    if name not in PEERS:
        raise ValueError(f"unknown peer {name!r}; choose one of {', '.join(PEERS)}")
    peer = PEERS[name]
    with torch.no_grad():
        for lname, lin in find_linears(model).items():
            lin.weight.copy_(peer.fn(lin.weight, lname))


# -- the report's table ----------------------------------------------------------------------------
#: AFPQ / INT / one-scale rows compared with the peers: (cell key, label, bits-per-weight kind, bits, group).
_OURS = (
    ("rtn/nf{b}/afpq/minmax/g64", "NF{b} AFPQ g64 (two fp16 scales)", "afpq", 64, False),
    ("rtn/nf{b}/afpq/output/g64", "NF{b} AFPQ g64 + output search", "afpq", 64, True),
    ("rtn/nf{b}/afpq/minmax/g192", "NF{b} AFPQ g192", "afpq", 192, False),
    ("rtn/nf{b}/afpq/output/g192", "NF{b} AFPQ g192 + output search", "afpq", 192, True),
    ("rtn/fp{b}/afpq/minmax/g64", "FP{b} AFPQ g64", "afpq", 64, False),
    ("rtn/nf{b}/sym/minmax/g32", "NF{b} one scale g32", "sym", 32, False),
    ("rtn/nf{b}/sym/minmax/g64", "NF{b} one scale g64", "sym", 64, False),
    ("rtn/int{b}/zp/minmax/g64", "INT{b} scale + zero g64", "zp", 64, False),
    ("rtn/int{b}/zp/minmax/g32", "INT{b} scale + zero g32", "zp", 32, False),
    ("rtn/int{b}/zp/output/g64", "INT{b} scale + zero g64 + output search", "zp", 64, True),
)


def _fmt(x: float) -> str:
    return f"{x:.0f}" if x >= 1000 else f"{x:.2f}"


def _fmt_se(c: dict) -> str:
    se = c.get("ppl_se")
    return _fmt(c["ppl"]) + (f" +- {se:.2f}" if se is not None else "")


def _verdict(ours: dict, peer: dict) -> str:
    """AFPQ wins / loses / ties against the peer: by the paired per-window NLL difference and its
    standard error when both cells have per-window NLLs (same windows), else by the perplexities."""
    from ..evaluate import compare

    if ours.get("window_nll") and peer.get("window_nll") and len(ours["window_nll"]) == len(peer["window_nll"]):
        c = compare(ours, peer)
        word = {"a": "AFPQ wins", "b": "AFPQ loses", "tie": "a tie"}[c["winner"]]
        return (f"{word} (paired NLL difference {c['nll_diff']:+.4f} +- {c['nll_diff_se']:.4f}; "
                f"unpaired combined error of the perplexities {c['ppl_combined_se']:.2f})")
    return ("AFPQ wins" if ours["ppl"] < peer["ppl"] else "AFPQ loses") + " (no per-window NLLs: no error bar)"


def peers_table(sec: dict) -> str:
    """Per bit width: every peer and AFPQ/INT/one-scale row with its bits per weight and perplexity
    (RTN-style: no weight update; rows marked *calibrated* use the calibration inputs), then the
    winner within each bits-per-weight budget of a peer. Empty when no peer cell was run."""
    cells = sec["cells"]
    if not any(c.get("method") == "peer" for c in cells.values()):
        return ""
    out = []
    for bits in (4, 3):
        rows = []
        for p in PEERS.values():
            c = cells.get(f"peer/{p.name}/peer/minmax/g{({'nvfp4': 16, 'mxfp4': 32}).get(p.name, 64)}")
            if p.bits == bits and c is not None:
                rows.append((p.label, bits_per_weight(p.name), False, c["ppl"], True, c))
        for key, label, kind, g, calibrated in _OURS:
            c = cells.get(key.format(b=bits))
            if c is not None:
                rows.append((label.format(b=bits), bits_per_weight(kind, bits, g), calibrated, c["ppl"], False, c))
        for key, c in sorted(cells.items()):  # budgeted mixtures (afpq quantize --bits-budget)
            if c.get("budget") is not None and bits - 1 < c["budget"] <= bits + 0.75:
                rows.append((c.get("label", key), c["bits_per_weight"], bool(c.get("calibrated")), c["ppl"], False, c))
        if not any(r[4] for r in rows):
            continue
        rows.sort(key=lambda r: (r[1], r[3]))
        out += [f"**{bits}-bit** (RTN-style; perplexity +- standard error over windows, lower is better)", "",
                "| format | bits / weight | calibration | ppl |", "|---|---|---|---|"]
        out += [f"| {'peer: ' if r[4] else ''}{r[0]} | {r[1]:.3f} | {'yes (8 x 256 tokens)' if r[2] else 'no'} | "
                f"{_fmt_se(r[5])} |" for r in rows]
        out.append("")
        for budget in sorted({round(r[1], 3) for r in rows if r[4]}):
            within = [r for r in rows if r[1] <= budget + 1e-9]
            best = min(within, key=lambda r: r[3])
            free = [r for r in within if not r[2]]
            best_free = min(free, key=lambda r: r[3]) if free else None
            line = f"- within {budget:.3f} bits/weight: **{best[0]}** ({_fmt(best[3])})"
            if best_free is not None and best_free is not best:
                line += f"; without calibration: **{best_free[0]}** ({_fmt(best_free[3])})"
            peers_in = [r for r in within if r[4]]
            bp = min(peers_in, key=lambda r: r[3])
            ours = [r for r in within if not r[4] and r[0].split()[1:2] == ["AFPQ"]]
            if ours:
                ba = min(ours, key=lambda r: r[3])
                line += f". Best peer {bp[0]} {_fmt(bp[3])} vs best AFPQ {ba[0]} {_fmt(ba[3])}: {_verdict(ba[5], bp[5])}"
            out.append(line)
        out.append("")
    return "\n".join(out).rstrip()
