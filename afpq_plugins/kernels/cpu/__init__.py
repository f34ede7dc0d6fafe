"""Native CPU kernel for AFPQ linear layers (C++, AVX-512 / AVX2 / portable, chosen at run time).

``x @ W.T`` straight from the packed codes: per (group, output column) the decoded values of
all codes form a 16- (or 8-, 4-) entry table, built with core's float32 decode maths, and each
weight is decoded by a register permute. Small batches (``M <= GEMV_MAX_ROWS``) run a GEMV
that never writes the weight out; larger ones decode column tiles into a small buffer and
multiply with ``at::mm``. Any layout (gptq 2/3/4 bits, awq 4 bits), mode (afpq, sym, zp),
group size and act-order ``g_idx``; float32 / bfloat16 / float16 activations, float32
accumulation; ``torch.get_num_threads()`` threads.

The weights are repacked once per layer (:mod:`.repack`, cached on the layer and rebuilt when
its buffers change); the C++ source is compiled on first use (:mod:`.build`).

Environment:

``AFPQ_CPU_ISA``  ``auto`` (default: the best the CPU has), ``avx512``, ``avx2`` or ``scalar``:
                  force a narrower path (tests cover each one the machine can run).
``AFPQ_KERNEL=torch``  skip this kernel (the registry's switch).
"""

from __future__ import annotations

import functools
import os
import warnings
from typing import Tuple

import torch

from . import build
from .repack import Pack, build_pack, get_pack

__all__ = ["available", "isa", "can_implement", "linear", "decode_packed", "ISAS", "Pack", "build_pack"]

ISAS = {"scalar": 0, "avx2": 1, "avx512": 2}
_NAMES = {v: k for k, v in ISAS.items()}
#: Largest batch that takes the GEMV path; above it, tiles are decoded and multiplied by at::mm.
GEMV_MAX_ROWS = 8

_warned = False


def available() -> Tuple[bool, str]:
    """``(True, "")`` once the extension is built and loaded, else ``(False, reason)``."""
    ok, why = build.load()
    global _warned
    if not ok and not _warned:
        _warned = True
        warnings.warn(
            f"AFPQ: the native CPU kernel is unavailable ({why}); AFPQ layers on CPU use the slower "
            "torch path. Install a C++ compiler and ninja to enable it.",
            RuntimeWarning,
            stacklevel=3,
        )
    return ok, why


@functools.lru_cache(maxsize=None)
def _supported() -> int:
    return int(torch.ops.afpq_cpu.isa_supported())


def isa() -> Tuple[str, str]:
    """``(name, "")`` of the ISA to run, or ``("", reason)`` when the requested one is missing."""
    ok, why = build.load()
    if not ok:
        return "", why
    return _resolve_isa(os.environ.get("AFPQ_CPU_ISA", "auto"))


@functools.lru_cache(maxsize=None)
def _resolve_isa(want: str) -> Tuple[str, str]:
    want = want.strip().lower() or "auto"
    best = _supported()
    if want == "auto":
        return _NAMES[best], ""
    if want not in ISAS:
        return "", f"AFPQ_CPU_ISA={want!r} is not one of auto, {', '.join(ISAS)}"
    if ISAS[want] > best:
        return "", f"AFPQ_CPU_ISA={want} but this CPU's best is {_NAMES[best]}"
    return want, ""


def lanes_of(isa_name: str) -> int:
    return 16 if isa_name == "avx512" else 8


def can_implement(x: torch.Tensor, layer) -> Tuple[bool, str]:
    if x.device.type != "cpu":
        return False, f"input on {x.device.type}"
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False, f"activations in {x.dtype} (float32, bfloat16 or float16 only)"
    if layer.bits not in (2, 3, 4):
        return False, f"{layer.bits}-bit codes (2, 3 or 4 only)"
    if x.requires_grad and torch.is_grad_enabled():
        return False, "input requires grad (the native kernel has no backward)"
    if layer.qweight.device.type != "cpu":
        return False, f"weights on {layer.qweight.device.type}"
    ok, why = available()
    if not ok:
        return False, why
    name, why = isa()
    if not name:
        return False, why
    return True, ""


def _run_isa() -> Tuple[int, int]:
    ok, why = build.load()
    if not ok:
        raise RuntimeError(f"AFPQ native CPU kernel unavailable: {why}")
    name, why = isa()
    if not name:
        raise RuntimeError(why)
    return ISAS[name], lanes_of(name)


def linear(x: torch.Tensor, layer) -> torch.Tensor:
    """``layer(x)`` with the native kernel (call :func:`can_implement` first)."""
    code, lanes = _run_isa()
    pack = get_pack(layer, lanes)
    flat = x.dim() != 2
    y = torch.ops.afpq_cpu.linear(
        x.reshape(-1, layer.in_features) if flat else x, pack.codes, pack.p1, pack.p2, pack.lut, pack.gstep, pack.kmap, pack.bias,
        pack.mode, pack.nent, lanes, code, GEMV_MAX_ROWS,
    )
    return y.reshape(*x.shape[:-1], layer.out_features) if flat else y


def decode_packed(pack: Pack, in_features: int, isa_name: str = "scalar") -> torch.Tensor:
    """The decoded weight ``[out, in]`` of a pack, in the original input order (tests, checks)."""
    w = torch.ops.afpq_cpu.decode(
        pack.codes, pack.p1, pack.p2, pack.lut, pack.gstep, pack.mode, pack.nent, pack.lanes, ISAS[isa_name]
    )
    if pack.kmap.numel() == 0:
        return w[:, :in_features]
    valid = pack.kmap >= 0
    out = w.new_empty(w.shape[0], in_features)
    out[:, pack.kmap[valid].long()] = w[:, valid]
    return out
