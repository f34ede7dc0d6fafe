"""Offline repack of an AFPQ layer's buffers into the native CPU kernel's layout.

Done once per layer (cached on it, see :func:`get_pack`); the checkpoint buffers are not
changed. The layout (described at the top of ``afpq_cpu.cpp``):

* inputs reordered so each group is contiguous (act-order ``g_idx``: stable sort by group;
  default order: unchanged), each group padded to a multiple of ``lanes`` inputs, the whole
  to a multiple of ``8 * lanes``; ``kmap[k']`` is the original input of position ``k'`` (-1:
  padding, reads 0), empty when the order is the identity;
* codes as 4-bit nibbles, ``[out4, Kp / 8]`` int32 (``out4``: ``out`` rounded up to 4, extra
  columns all zero codes): word ``(c, j)`` of a column holds, in nibble ``i``, the code of input
  ``k' = (8c + i) * lanes + j``; columns are stored in tiles of 4, chunk-interleaved (chunk ``c``
  of column ``4u + q`` at word ``((u * chunks + c) * 4 + q) * lanes``), so one tile is one
  contiguous stream. 2- and 3-bit codes take a nibble each too (the spill of 3-bit words is
  undone here, once);
* group parameters transposed to ``[out, groups]`` float32.

Unpacking and packing are core's (:func:`~afpq_plugins.core.packing.unpack_kn`,
:func:`~afpq_plugins.core.packing.pack_gptq`); the grid is the format's ``lut`` for the mode.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from ...core.packing import pack_gptq, unpack_kn

MODES = {"afpq": 0, "sym": 1, "zp": 2}
#: Output columns repacked at a time (bounds the temporary unpacked codes).
_COLS = 2048


@dataclass
class Pack:
    codes: torch.Tensor   # int32 [N, Kp / 8]
    p1: torch.Tensor      # float32 [N, G]
    p2: torch.Tensor      # float32 [N, G]
    lut: torch.Tensor     # float32 [16]
    gstep: torch.Tensor   # int32 [G + 1]
    kmap: torch.Tensor    # int32 [Kp] or empty
    bias: Optional[torch.Tensor]
    keep: Tuple           # the layer's buffers the key was taken from (their ids stay valid)
    mode: int
    nent: int
    lanes: int
    key: Tuple

    @property
    def padded_in(self) -> int:
        return self.codes.shape[1] * 8


def _tensor_key(t: Optional[torch.Tensor]):
    if t is None:
        return None
    # Inference tensors (created under torch.inference_mode) keep no version counter: for them
    # only a new tensor or new storage is noticed.
    return (id(t), None if t.is_inference() else t._version)


def layer_key(layer, lanes: int) -> Tuple:
    """Identity of the buffers a pack was built from: in-place edits (``_version``), new
    tensors (``id``; the pack keeps the old ones alive, so ids are not reused), and the layer's format all invalidate it."""
    return (
        lanes, layer.mode, layer.bits, layer.layout, layer.group_size,
        _tensor_key(layer.qweight), _tensor_key(layer.scales), _tensor_key(layer.second),
        _tensor_key(getattr(layer, "g_idx", None)), _tensor_key(layer.bias),
    )


def _input_order(layer, lanes: int):
    """(kmap or None, gstep): reordered, padded input positions and each group's steps."""
    in_f = layer.in_features
    gs = in_f if layer.group_size == -1 else layer.group_size
    groups = layer.scales.shape[0]
    default = layer.has_default_order()
    if default:
        g_of_k = torch.arange(in_f, dtype=torch.int64) // gs
        order = torch.arange(in_f, dtype=torch.int64)
    else:
        g_of_k = layer.g_idx.detach().to("cpu", torch.int64)
        if int(g_of_k.min()) < 0 or int(g_of_k.max()) >= groups:
            raise ValueError(
                f"AFPQLinear({in_f}->{layer.out_features}): g_idx values must lie in [0, {groups}), "
                f"got [{int(g_of_k.min())}, {int(g_of_k.max())}]"
            )
        order = torch.sort(g_of_k, stable=True).indices
    counts = torch.bincount(g_of_k, minlength=groups)
    steps = (counts + lanes - 1) // lanes
    total = int(steps.sum())
    chunk_steps = 8
    padded_steps = (total + chunk_steps - 1) // chunk_steps * chunk_steps
    gstep = torch.zeros(groups + 1, dtype=torch.int64)
    gstep[1:] = torch.cumsum(steps, 0)
    gstep[-1] = padded_steps  # the tail padding belongs to the last group (reads x = 0)
    kp = padded_steps * lanes
    # Position of each reordered input: its group's first slot + its rank inside the group.
    sorted_g = g_of_k[order]
    group_start = torch.cumsum(counts, 0) - counts
    rank = torch.arange(in_f, dtype=torch.int64) - group_start[sorted_g]
    pos = gstep[:-1][sorted_g] * lanes + rank
    kmap = torch.full((kp,), -1, dtype=torch.int64)
    kmap[pos] = order
    identity = bool(torch.equal(kmap[:in_f], torch.arange(in_f))) and bool((kmap[in_f:] == -1).all())
    return (None if identity else kmap), gstep.to(torch.int32), kp


def build_pack(layer, lanes: int) -> Pack:
    """Repack ``layer`` (anything with AFPQLinear's attributes) for ``lanes`` SIMD lanes."""
    if lanes not in (8, 16):
        raise ValueError(f"lanes must be 8 or 16, got {lanes}")
    bits, out_f = layer.bits, layer.out_features
    kmap, gstep, kp = _input_order(layer, lanes)
    src = kmap.clamp(min=0) if kmap is not None else None
    pad = (kmap < 0) if kmap is not None else None
    nchunk = kp // (8 * lanes)
    out4 = (out_f + 3) // 4 * 4
    codes = torch.zeros(out4, kp // 8, dtype=torch.int32)
    q = layer.qweight.detach().cpu()
    for n0 in range(0, out_f, _COLS):
        n1 = min(n0 + _COLS, out_f)
        if layer.layout == "awq":
            cols = unpack_kn(q[:, n0 // 8: (n1 + 7) // 8], bits, "awq")[:, : n1 - n0]
        else:
            cols = unpack_kn(q[:, n0:n1], bits, "gptq")  # int32 [K, n]
        if src is not None:
            cols = cols.index_select(0, src)
            cols[pad] = 0
        elif kp > cols.shape[0]:
            cols = torch.cat([cols, cols.new_zeros(kp - cols.shape[0], cols.shape[1])])
        # k' = (8c + i) * lanes + j  ->  [n, c, j, i]; eight nibbles i per word.
        c = cols.view(nchunk, 8, lanes, n1 - n0).permute(3, 0, 2, 1).reshape(-1, 8)
        words = pack_gptq(c, 4, name=f"AFPQLinear({layer.in_features}->{out_f}).qweight").view(n1 - n0, nchunk, lanes)
        b1 = (n1 + 3) // 4 * 4  # blocks start at multiples of 4 (_COLS is one); the last one is padded
        if b1 > n1:
            words = torch.cat([words, words.new_zeros(b1 - n1, nchunk, lanes)])
        # [tile, q, chunk, lane] -> [tile, chunk, q, lane]: a tile's four columns chunk-interleaved
        tiles = words.view((b1 - n0) // 4, 4, nchunk, lanes).permute(0, 2, 1, 3)
        codes[n0:b1] = tiles.reshape(b1 - n0, -1)
    p1 = layer.scales.detach().to("cpu", torch.float32).t().contiguous()
    second = layer.second
    p2 = p1 if second is None else second.detach().to("cpu", torch.float32).t().contiguous()
    lut = torch.zeros(16, dtype=torch.float32)
    grid = layer.fmt.lut(layer.mode, "cpu", torch.float32)
    lut[: grid.numel()] = grid
    bias = None if layer.bias is None else layer.bias.detach().to("cpu", torch.float32).contiguous()
    return Pack(
        codes=codes, p1=p1, p2=p2, lut=lut, gstep=gstep,
        kmap=kmap.to(torch.int32) if kmap is not None else torch.empty(0, dtype=torch.int32),
        bias=bias, keep=(layer.qweight, layer.scales, layer.second, getattr(layer, "g_idx", None), layer.bias),
        mode=MODES[layer.mode], nent=1 << bits, lanes=lanes, key=layer_key(layer, lanes),
    )


_SIDE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_ATTR = "_afpq_cpu_pack"


def get_pack(layer, lanes: int) -> Pack:
    """The layer's cached pack, rebuilt when its buffers changed (see :func:`layer_key`)."""
    pack = getattr(layer, _ATTR, None)
    if pack is None:
        try:
            pack = _SIDE.get(layer)
        except TypeError:
            pack = None
    if pack is not None and pack.key == layer_key(layer, lanes):
        return pack
    pack = build_pack(layer, lanes)
    try:
        object.__setattr__(layer, _ATTR, pack)
    except (AttributeError, TypeError):
        _SIDE[layer] = pack  # layer objects without a writable __dict__ (slots)
    return pack
