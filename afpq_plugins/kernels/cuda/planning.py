"""Host-side planning and the one-time repack of the CUDA GEMV (pure torch, any device).

Terms (see :mod:`.source` for the device side):

* *code block*: the codes one thread decodes together: 4 bits, one int32 word = 8
  consecutive inputs of one column (AutoGPTQ's layout as stored); 3 bits, three words = 32
  inputs (:func:`pack3`).
* every group is contiguous in the kernel's input order and has the same number of blocks
  ``bpg``; a group is cut into ``upg`` *units* of ``bpu`` blocks (one decoded table each);
  ``U = groups * upg`` units, unit ``u`` = blocks ``u*bpu .. u*bpu + bpu - 1``.
* a launch has ``ceil(N / 32)`` thread blocks of ``32 * ks`` threads: 32 adjacent columns x
  ``ks`` K-slices; slice ``s`` takes units ``s, s + ks, ...``, chunks of ``ch`` blocks.

Repack (:func:`prepare_buffers`), done once per layer:

============================  ===================================================  ==================
layer                         kernel buffers                                       extra memory
============================  ===================================================  ==================
gptq, 4 bits, default order,  ``qweight`` itself (no copy)                         0
group size a multiple of 8
awq (4 bits)                  codes repacked to the gptq nibble layout             one copy of qweight
3 bits                        codes repacked to :func:`pack3` (same size)          one copy of qweight
act-order ``g_idx``, or a     inputs sorted by group (stable), every group padded  codes of ``Kp``
group size the block does     to ``gp`` (a multiple of the block) with a zero      inputs + ``4 Kp``
not divide                    code; ``kmap`` gathers ``x`` per call (second        bytes (kmap) + per
                              launch, ``2 M Kp`` bytes)                           call ``2 M Kp``
============================  ===================================================  ==================

plus a float32 copy of the bias (``4 N`` bytes) where the layer has one. Scales and the
second parameter are read in place (``[groups, N]``, any of fp16 / bf16 / fp32).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Tuple

import torch

from ...core.packing import unpack_kn

__all__ = ["MODES", "SCALE_TYPES", "GemvPlan", "Prepared", "chunk_blocks", "chain_codes", "split_group",
           "slices", "input_order", "pack3", "unpack3", "pack4", "prepare_buffers", "layer_key"]

MODES = {"afpq": 0, "sym": 1, "zp": 2}
SCALE_TYPES = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2}
#: Output columns repacked at a time (bounds the unpacked temporary: K x 2048 int32).
_COLS = 2048
#: At least this many units in a layer (so that up to 16 K-slices all have work).
MIN_UNITS = 16


def codes_per_block(bits: int) -> int:
    return 8 if bits == 4 else 32


def words_per_block(bits: int) -> int:
    return 1 if bits == 4 else 3


def chunk_blocks(bits: int, bpu: int, m: int = 1, bf16: bool = False) -> int:
    """Blocks per prefetched chunk (the chunk must divide the unit): up to 16 words in flight
    per thread at 4 bits (4 x 3 at 3 bits) for M <= 2 (bf16: M = 1), half that above (registers:
    no spills, checked by ``tests/test_cuda_gemv.py`` and ``benchmarks/cuda_sass.py``)."""
    big = m <= (1 if bf16 else 2)
    top = (16 if big else 8) if bits == 4 else (4 if big else 2)
    ch = top
    while ch > 1 and bpu % ch:
        ch //= 2
    return ch


def chain_codes(bits: int, bf16: bool, ch: int) -> int:
    """Codes summed in one half2 FMA chain before the float32 add: 16 for fp16 (8 products per
    half), 8 for bf16 (its 8-bit mantissa), 8 when a 4-bit chunk is one block."""
    if bf16:
        return 8
    return 16 if (bits == 3 or ch % 2 == 0) else 8


def split_group(groups: int, bpg: int) -> int:
    """Units per group: 1, or the smallest divisor of ``bpg`` giving ``MIN_UNITS`` units
    (one group per row, ``group_size = -1``, still spreads over the K-slices)."""
    if groups >= MIN_UNITS:
        return 1
    for d in range(1, bpg + 1):
        if bpg % d == 0 and (groups * d >= MIN_UNITS or bpg // d <= 8):
            return d
    return bpg


def slices(n_out: int, units: int, sms: int, m: int = 1) -> int:
    """K-slices (warps) per thread block: about 32 warps per SM over the grid, 4..16 (8 above
    M = 1: the kernel's launch bounds), never more slices than units."""
    blocks = -(-n_out // 32)
    want = max(1, -(-32 * sms // blocks))
    top = 16 if m <= 1 else 8
    ks = 4
    while ks < want and ks < top:
        ks *= 2
    while ks > 1 and ks > units:
        ks //= 2
    return ks


@dataclass(frozen=True)
class GemvPlan:
    bits: int
    groups: int
    gp: int     # inputs per group in the kernel order (padded)
    bpg: int    # blocks per group
    upg: int    # units per group
    bpu: int    # blocks per unit
    kp: int     # inputs in the kernel order (groups * gp)

    @property
    def units(self) -> int:
        return self.groups * self.upg

    def ch(self, m: int, bf16: bool = False) -> int:
        """Blocks per prefetched chunk for an M-row call."""
        return chunk_blocks(self.bits, self.bpu, m, bf16)

    @property
    def cpb(self) -> int:
        return codes_per_block(self.bits)

    @property
    def wpb(self) -> int:
        return words_per_block(self.bits)


def make_plan(bits: int, groups: int, gp: int) -> GemvPlan:
    cpb = codes_per_block(bits)
    if gp % cpb:
        raise ValueError(f"padded group size {gp} is not a multiple of {cpb}")
    bpg = gp // cpb
    upg = split_group(groups, bpg)
    bpu = bpg // upg
    return GemvPlan(bits, groups, gp, bpg, upg, bpu, groups * gp)


def input_order(in_f: int, group_size: int, groups: int, g_idx: Optional[torch.Tensor], default: bool,
                cpb: int) -> Tuple[Optional[torch.Tensor], int]:
    """``(kmap or None, gp)``: kernel position ``p`` reads input ``kmap[p]`` (-1: padding).

    Groups are contiguous, in group order, inputs in their original order inside a group
    (stable sort by group), each padded to ``gp`` = the largest group rounded up to ``cpb``.
    None when that is the identity (no gather)."""
    gs = in_f if group_size == -1 else group_size
    if default:
        g_of_k = torch.arange(in_f, dtype=torch.int64) // gs
    else:
        g_of_k = g_idx.detach().to("cpu", torch.int64)
        if g_of_k.numel() != in_f:
            raise ValueError(f"g_idx has {g_of_k.numel()} entries, in_features is {in_f}")
        if in_f and (int(g_of_k.min()) < 0 or int(g_of_k.max()) >= groups):
            raise ValueError(f"g_idx values must lie in [0, {groups}), got [{int(g_of_k.min())}, {int(g_of_k.max())}]")
    counts = torch.bincount(g_of_k, minlength=groups)
    gp = max(cpb, -(-int(counts.max()) // cpb) * cpb)
    order = torch.sort(g_of_k, stable=True).indices
    sorted_g = g_of_k[order]
    start = torch.cumsum(counts, 0) - counts
    rank = torch.arange(in_f, dtype=torch.int64) - start[sorted_g]
    pos = sorted_g * gp + rank
    kmap = torch.full((groups * gp,), -1, dtype=torch.int64)
    kmap[pos] = order
    if groups * gp == in_f and torch.equal(kmap, torch.arange(in_f)):
        return None, gp
    return kmap.to(torch.int32), gp


def pack4(codes_kn: torch.Tensor) -> torch.Tensor:
    """``[K, n]`` codes (0..15) -> ``[K / 8, n]`` int32, nibble ``i`` of word ``r`` = input ``8r + i``
    (AutoGPTQ's 4-bit layout)."""
    k, n = codes_kn.shape
    c = codes_kn.to(torch.int64).view(k // 8, 8, n)
    shifts = (torch.arange(8, device=c.device, dtype=torch.int64) * 4).view(1, 8, 1)
    w = (c << shifts).sum(1)
    return torch.where(w >= 2**31, w - 2**32, w).to(torch.int32)


def pack3(codes_kn: torch.Tensor) -> torch.Tensor:
    """``[K, n]`` 3-bit codes (K a multiple of 32) -> ``[3 K / 32, n]`` int32, the kernel's layout:
    per block of 32 inputs, words ``3b + j`` (``j`` = 0, 1, 2) hold in nibble ``i`` (bits 0-2)
    the code of input ``32b + 8j + i`` and in bit 3 of nibble ``i`` bit ``j`` of the code of
    input ``32b + 24 + i``."""
    k, n = codes_kn.shape
    c = codes_kn.to(torch.int64).view(k // 32, 4, 8, n)  # [block, j, i, n]
    shifts = (torch.arange(8, device=c.device, dtype=torch.int64) * 4).view(1, 8, 1)
    words = []
    for j in range(3):
        low = c[:, j] & 7
        extra = ((c[:, 3] >> j) & 1) << 3
        words.append(((low | extra) << shifts).sum(1))
    w = torch.stack(words, 1).reshape(k // 32 * 3, n)
    return torch.where(w >= 2**31, w - 2**32, w).to(torch.int32)


def unpack3(words: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack3` (tests)."""
    r, n = words.shape
    w = words.to(torch.int64).view(r // 3, 3, 1, n) & 0xFFFFFFFF
    shifts = (torch.arange(8, device=w.device, dtype=torch.int64) * 4).view(1, 1, 8, 1)
    nib = (w >> shifts) & 0xF  # [block, j, i, n]
    low = nib & 7
    top = ((nib[:, 0] >> 3) & 1) | (((nib[:, 1] >> 3) & 1) << 1) | (((nib[:, 2] >> 3) & 1) << 2)
    return torch.cat([low[:, 0], low[:, 1], low[:, 2], top], 1).reshape(r // 3 * 32, n).to(torch.int32)


def _tensor_key(t: Optional[torch.Tensor]):
    if t is None:
        return None
    try:
        return (id(t), t.data_ptr(), t._version)
    except RuntimeError:  # inference tensors keep no version counter: only new tensors / storage count
        return (id(t), t.data_ptr(), None)


def layer_key(layer) -> Tuple:
    """Identity of the buffers a :class:`Prepared` was built from (in-place edits, new tensors).
    Called on every forward: an ``nn.Module``'s buffers are read from its ``_buffers`` dict
    (attribute access goes through ``Module.__getattr__``, about 1 us each)."""
    d = getattr(layer, "__dict__", {})
    bufs = d.get("_buffers")
    if bufs is not None and "qweight" in bufs:
        def get(name):
            return bufs[name] if name in bufs else d.get(name)

        second = layer.second
        return (layer.mode, layer.bits, layer.layout, layer.group_size, id(d.get("fmt")),
                _tensor_key(bufs["qweight"]), _tensor_key(bufs["scales"]), _tensor_key(second),
                _tensor_key(get("g_idx")), _tensor_key(get("bias")))
    return (layer.mode, layer.bits, layer.layout, layer.group_size, id(getattr(layer, "fmt", None)),
            _tensor_key(layer.qweight), _tensor_key(layer.scales), _tensor_key(layer.second),
            _tensor_key(getattr(layer, "g_idx", None)), _tensor_key(layer.bias))


@dataclass
class Prepared:
    """Everything a launch needs, built once per layer by :func:`prepare_buffers`."""

    plan: GemvPlan
    q: torch.Tensor                 # int32 [kp / cpb * wpb, N]
    s1: torch.Tensor                # [groups, N] (scales, contiguous)
    s2: torch.Tensor                # [groups, N] (second parameter, or s1 for sym)
    bias: Optional[torch.Tensor]    # float32 [N]
    kmap: Optional[torch.Tensor]    # int32 [kp] (None: x used as is)
    mode: int
    s1t: int
    s2t: int
    grid: Tuple[float, ...]         # fmt.lut(mode), float32 values
    in_features: int
    out_features: int
    extra_bytes: int                # device memory held beyond the layer's own buffers
    key: Tuple = ()
    keep: Tuple = field(default=(), repr=False)  # the layer tensors the key's ids refer to
    launches: dict = field(default_factory=dict, repr=False)  # (device, bf16, M) -> launch tuple (host cache)


def pad_code(fmt, mode: str) -> int:
    """Code written at padding positions (x is 0 there): one whose value is 0 where the grid has one."""
    vals = fmt.lut(mode).tolist()
    return next((c for c, v in enumerate(vals) if v == 0.0), 0)


def prepare_buffers(layer) -> Prepared:
    """Plan and repack ``layer`` (AFPQLinear-like) for the GEMV. Runs on the layer's device."""
    bits, in_f, out_f = layer.bits, layer.in_features, layer.out_features
    if bits not in (3, 4):
        raise ValueError(f"the CUDA GEMV covers 3- and 4-bit codes, not {bits}")
    if layer.mode not in MODES:
        raise ValueError(f"unknown mode {layer.mode!r}")
    cpb = codes_per_block(bits)
    groups = layer.scales.shape[0]
    default = layer.has_default_order()
    kmap, gp = input_order(in_f, layer.group_size, groups, layer.g_idx, default, cpb)
    plan = make_plan(bits, groups, gp)
    dev = layer.qweight.device
    extra = 0
    if kmap is None and bits == 4 and layer.layout == "gptq":
        q = layer.qweight if layer.qweight.is_contiguous() else layer.qweight.contiguous()
    else:
        pc = pad_code(layer.fmt, layer.mode)
        src = None if kmap is None else kmap.to(dev, torch.int64)
        rows = plan.kp // cpb * words_per_block(bits)
        q = torch.empty(rows, out_f, dtype=torch.int32, device=dev)
        for n0 in range(0, out_f, _COLS):
            n1 = min(n0 + _COLS, out_f)
            if layer.layout == "awq":
                cols = unpack_kn(layer.qweight[:, n0 // 8: (n1 + 7) // 8], bits, "awq")[:, : n1 - n0]
            else:
                cols = unpack_kn(layer.qweight[:, n0:n1], bits, "gptq")
            if src is not None:
                cols = torch.where((src >= 0).unsqueeze(1), cols.index_select(0, src.clamp(min=0)),
                                   torch.full_like(cols[:1], pc))
            q[:, n0:n1] = pack4(cols) if bits == 4 else pack3(cols)
        extra += q.numel() * 4
    s1 = layer.scales if layer.scales.is_contiguous() else layer.scales.contiguous()
    second = layer.second if layer.second is not None else layer.scales
    s2 = second if second.is_contiguous() else second.contiguous()
    for name, t in (("scales", s1), ("second parameter", s2)):
        if t.dtype not in SCALE_TYPES:
            raise ValueError(f"{name} in {t.dtype}: float16, bfloat16 or float32 only")
    bias = None
    if layer.bias is not None:
        bias = layer.bias.detach().to(dev, torch.float32).contiguous()
        extra += bias.numel() * 4
    if kmap is not None:
        kmap = kmap.to(dev)
        extra += kmap.numel() * 4
    grid = tuple(float(v) for v in layer.fmt.lut(layer.mode).tolist())
    return Prepared(plan=plan, q=q, s1=s1, s2=s2, bias=bias, kmap=kmap, mode=MODES[layer.mode],
                    s1t=SCALE_TYPES[s1.dtype], s2t=SCALE_TYPES[s2.dtype], grid=grid, in_features=in_f,
                    out_features=out_f, extra_bytes=extra, key=layer_key(layer),
                    keep=(layer.qweight, layer.scales, layer.second, getattr(layer, "g_idx", None), layer.bias))
