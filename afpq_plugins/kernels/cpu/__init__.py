"""Native CPU kernel for AFPQ linear layers (C++, AVX-512 / AVX2 / portable, chosen at run time).

``x @ W.T`` straight from the packed codes: per (group, output column) the decoded values of
all codes form a 16- (or 8-, 4-) entry table, built with core's float32 decode maths, and each
weight is decoded by a register permute. Three paths, by batch rows ``M``:

* ``M <= REG_ROWS``: GEMV, codes decoded in registers, never written out;
* ``M <= SMALL_ROWS`` (a server's batched decoding, speculative decoding, beam search): each
  thread decodes a tile of 16 columns once into an L2-resident float32 buffer and multiplies
  every row block of the batch by it (a 4 x 4 register-blocked micro-kernel; AVX-512);
* larger ``M`` (prefill, evaluation): column chunks decoded and multiplied by ``at::mm``. Where
  the CPU multiplies bfloat16 natively (AVX512_BF16 / AMX) the chunks are decoded to bfloat16
  and the product runs on oneDNN's bf16 matmul (inputs rounded to bf16, fp32 accumulation,
  output rounded to bf16): for bfloat16 activations always, for float32 activations by default
  (``AFPQ_CPU_PREFILL``); elsewhere in float32.

The first two paths accumulate in float32 whatever the activations' dtype (bf16 / fp16 inputs
are widened exactly). Any layout (gptq 2/3/4 bits, awq 4 bits), mode (afpq, sym, zp), group
size and act-order ``g_idx``; ``torch.get_num_threads()`` threads, one parallel region per
call on the first two paths.

The weights are repacked once per layer (:mod:`.repack`, cached on the layer and rebuilt when
its buffers change); the C++ source is compiled on first use (:mod:`.build`).

Environment:

``AFPQ_CPU_ISA``  ``auto`` (default: the best the CPU has), ``avx512``, ``avx2`` or ``scalar``:
                  force a narrower path (tests cover each one the machine can run).
``AFPQ_CPU_PREFILL``  how float32 activations above ``SMALL_ROWS`` rows multiply: ``auto`` (default:
                  as torch's ``torch.set_float32_matmul_precision``: float32 at ``"highest"``, its
                  default, bf16 products at ``"high"`` / ``"medium"`` where the CPU has native bf16),
                  ``bf16`` (bf16 products) or ``fp32`` (float32 products). bfloat16 activations always
                  use the bf16 matmul where the CPU has native bf16.
``AFPQ_KERNEL=torch``  skip this kernel (the registry's switch).

The settings are read when the registry binds the kernel to a layer (the first forward of a
kind of call, and again after any of these variables changes).
"""

from __future__ import annotations

import functools
import os
import warnings
from typing import Tuple

import torch

from . import build
from .repack import Pack, build_pack, get_pack

__all__ = ["available", "isa", "can_implement", "linear", "bind", "decode_packed", "native_bf16", "prefill_bf16",
           "ISAS", "Pack", "build_pack", "REG_ROWS", "SMALL_ROWS"]

ISAS = {"scalar": 0, "avx2": 1, "avx512": 2}
_NAMES = {v: k for k, v in ISAS.items()}
#: Largest batch decoded in registers (GEMV): float32 products, and bfloat16 activations without AMX.
REG_ROWS = 8
#: With AMX, bfloat16 batches above this many rows go to the AMX tiles (measured crossover: the
#: GEMV is faster up to 6 rows on SmolLM2's and 4096x4096 layers, AMX from 8).
REG_ROWS_AMX = 6
#: Largest batch on the small-batch paths; above it, chunks are decoded and multiplied by at::mm.
SMALL_ROWS = 64
_PREFILL = ("auto", "bf16", "fp32")

_warned = False


def available() -> Tuple[bool, str]:
    """``(True, "")`` once the extension is built and loaded, else ``(False, reason)``."""
    ok, why = build.load()
    global _warned
    if not ok and not _warned:
        _warned = True
        warnings.warn(
            f"AFPQ: the native CPU kernel is unavailable ({why}); AFPQ layers on CPU use the slower "
            "torch path (about 10x slower). Fix: install a C++ compiler (e.g. `apt install g++`) and "
            "`pip install ninja` (a dependency of afpq-plugins), then start a new process.",
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


@functools.lru_cache(maxsize=None)
def native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX512_BF16; every AMX CPU has it)."""
    return bool(torch.ops.afpq_cpu.native_bf16())


def prefill_bf16(dtype: torch.dtype) -> bool:
    """Whether batches above :data:`SMALL_ROWS` rows of ``dtype`` activations multiply in bf16.

    bfloat16 activations: always where the CPU has native bf16. float32 activations: as torch
    decides for its own float32 matmuls, ``torch.get_float32_matmul_precision()`` (``"highest"``,
    torch's default: float32 products; ``"high"`` or ``"medium"``: bf16 products allowed), unless
    ``AFPQ_CPU_PREFILL`` says ``bf16`` or ``fp32``."""
    want = os.environ.get("AFPQ_CPU_PREFILL", "auto").strip().lower() or "auto"
    if want not in _PREFILL:
        raise ValueError(f"AFPQ_CPU_PREFILL={want!r} is not one of {', '.join(_PREFILL)}")
    if dtype == torch.bfloat16:
        return native_bf16()  # without native bf16 the float32 matmul is the faster one
    if dtype != torch.float32 or want == "fp32":
        return False
    if want == "bf16":
        if not native_bf16():
            raise RuntimeError("AFPQ_CPU_PREFILL=bf16 but this CPU has no native bfloat16 (AVX512_BF16 / AMX)")
        return True
    return native_bf16() and torch.get_float32_matmul_precision() != "highest"


@functools.lru_cache(maxsize=None)
def amx_usable() -> bool:
    """Whether the AMX tiles can run here (the CPU has AMX-BF16 and the OS granted its state)."""
    return bool(torch.ops.afpq_cpu.amx_usable())


def settings(dtype: torch.dtype, isa_code: int) -> Tuple[int, int]:
    """``(rows decoded in registers, path flags)`` for activations of ``dtype`` on ISA ``isa_code``.

    Flags: bit 0, batches above :data:`SMALL_ROWS` multiply in bfloat16 (:func:`prefill_bf16`);
    bit 1, bfloat16 batches of ``REG_ROWS_AMX + 1`` to ``SMALL_ROWS`` rows run on AMX."""
    amx = dtype == torch.bfloat16 and isa_code == ISAS["avx512"] and amx_usable()
    flags = int(prefill_bf16(dtype)) | (2 if amx else 0)
    return (REG_ROWS_AMX if amx else REG_ROWS), flags


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


def _versioned(tensors) -> tuple:
    """The tensors whose in-place edits a version counter records (inference tensors keep none)."""
    return tuple(t for t in tensors if t is not None and not t.is_inference())


def _version_sum(tensors) -> int:
    v = 0
    for t in tensors:
        v += t._version  # counters only grow: any edit changes the sum
    return v


def bind(x: torch.Tensor, layer):
    """``run(x) = layer(x)`` with the native kernel, for calls like ``x`` (dtype, device): the ISA,
    the repacked weights and the settings resolved once (:func:`can_implement` first). ``run``
    checks that the layer still holds the tensors it was packed from, unedited, and repacks
    otherwise (an identity and version-counter check per call)."""
    code, lanes = _run_isa()
    reg_rows, flags = settings(x.dtype, code)
    op = torch.ops.afpq_cpu.linear.default
    # AFPQLinear drops the registry's cached runner itself when a buffer is replaced
    # (invalidate()); other layer objects (an engine's LayerView) get an identity check per call.
    watch_ids = not callable(getattr(layer, "invalidate", None))
    state = []

    def tensors():
        return (layer.qweight, layer.scales, layer.second, getattr(layer, "g_idx", None), layer.bias)

    def refresh():
        pack = get_pack(layer, lanes)
        versioned = _versioned(pack.keep)
        state[:] = [pack.keep if watch_ids else None, versioned, _version_sum(versioned),
                    (pack.codes, pack.p1, pack.p2, pack.lut, pack.gstep, pack.kmap, pack.bias,
                     pack.mode, pack.nent, lanes, code, reg_rows, SMALL_ROWS, flags)]

    refresh()

    def run(x: torch.Tensor) -> torch.Tensor:
        keep, versioned, v, args = state
        if _version_sum(versioned) != v or (keep is not None and any(a is not b for a, b in zip(tensors(), keep))):
            refresh()
            args = state[3]
        return op(x, *args)

    return run


def linear(x: torch.Tensor, layer) -> torch.Tensor:
    """``layer(x)`` with the native kernel (call :func:`can_implement` first; the registry
    binds it once per layer instead, see :func:`bind`)."""
    return bind(x, layer)(x)


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
