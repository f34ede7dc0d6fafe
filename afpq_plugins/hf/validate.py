"""Validate an AFPQ checkpoint's safetensors file(s) against a model skeleton *before*
transformers loads it.

transformers does not protect a quantized load: a missing tensor is silently
initialized at random (4.53 and 5.x log a warning at most), and 5.x assigns a
misshapen tensor without a shape check when a quantizer is active. So the AFPQ
quantizer checks every tensor here first, with the checkpoint format's own contract
(:func:`afpq_plugins.core.checkpoint.validate_layer_tensors`, the same check
:func:`afpq_plugins.model.load_quantized` runs) and the strict safetensors reader
(:func:`afpq_plugins.core.safetensors_io.read_header`: a truncated file is an error
naming the file and the tensor). Only the headers are read up front; quantized
layers' group parameters are read one at a time (finite, never negative, zero-points on
the grid), from the files opened once (:class:`CheckpointTensors`).

A quantized layer's ``<name>.weight`` and ``<name>.qzeros`` must be the format's refusal
placeholders (``uint8 [1]``, see :mod:`afpq_plugins.core.checkpoint`) or absent
(checkpoints written before they existed); they are checked here and are not model
tensors.
"""

from __future__ import annotations

import os
from typing import Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from ..core.checkpoint import AFPQConfigDict, CheckpointError, placeholder_keys, validate_layer_tensors
from ..core.safetensors_io import DTYPES as _DTYPES
from ..core.safetensors_io import open_regular, read_header, read_tensor

__all__ = ["CheckpointTensors", "resolve_checkpoint_files", "validate_against_model"]


class CheckpointTensors(Mapping):
    """``{name: tensor}`` over one or more safetensors files, read lazily, one tensor at a time.

    ``*.qweight`` (int32) comes back as a meta tensor of the right shape and dtype: the
    validation needs only those, and reading it would double the I/O of a load.

    Opening validates every header (truncation, offsets, byte counts); a tensor name
    in two files is an error. Each file is opened once and stays open until
    :meth:`close`: every tensor read here comes from the version whose header was
    checked, and :meth:`check_unchanged` tells whether the paths still lead to it.
    """

    def __init__(self, files: Sequence[str]) -> None:
        self.files = [os.path.abspath(f) for f in files]
        self._where: Dict[str, Tuple[str, dict, int]] = {}
        self._fh: Dict[str, object] = {}
        self.metadata: Dict[str, Dict[str, str]] = {}
        try:
            for path in self.files:
                if not path.endswith(".safetensors"):
                    raise CheckpointError(f"{path}: AFPQ checkpoints are stored as safetensors")
                fh = self._fh[path] = open_regular(path, error=CheckpointError)
                header, self.metadata[path], start = read_header(fh, path)
                for name, info in header.items():
                    if name in self._where:
                        raise CheckpointError(f"{path}: tensor {name!r} also appears in {self._where[name][0]}")
                    self._where[name] = (path, info, start)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for fh in self._fh.values():
            fh.close()
        self._fh = {}

    def check_unchanged(self) -> None:
        """:class:`CheckpointError` if a path now leads to another file than the one read
        here (the checkpoint was re-saved while transformers loaded it)."""
        for path, fh in self._fh.items():
            held = os.fstat(fh.fileno())
            try:
                now = os.stat(path)
            except OSError:
                now = None
            if now is None or (now.st_dev, now.st_ino) != (held.st_dev, held.st_ino):
                raise CheckpointError(
                    f"{path}: the checkpoint was replaced while it was loading (a concurrent save); load it again"
                )

    def source(self, name: str) -> str:
        return self._where[name][0] if name in self._where else (self.files[0] if self.files else "checkpoint")

    def shape(self, name: str) -> Tuple[int, ...]:
        return tuple(int(d) for d in self._where[name][1]["shape"])

    def dtype(self, name: str) -> torch.dtype:
        return _DTYPES[self._where[name][1]["dtype"]]

    def __getitem__(self, name: str) -> torch.Tensor:
        path, info, start = self._where[name]
        dtype = _DTYPES[info["dtype"]]
        if name.endswith(".qweight") and not dtype.is_floating_point:
            # the bulk of the checkpoint: its contract is shape and dtype only (checked
            # from the header); transformers reads the data once, when it loads it
            return torch.empty(info["shape"], dtype=dtype, device="meta")
        return read_tensor(self._fh[path], info, start, path)

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, name) -> bool:  # no read
        return name in self._where


def resolve_checkpoint_files(model, checkpoint_files: Optional[Sequence[str]] = None) -> List[str]:
    """The safetensors files transformers is about to load.

    transformers 5.x passes them to the quantizer (``checkpoint_files``); 4.53 does
    not, so they are found from ``model.name_or_path`` (a local folder, or the hub
    cache that ``from_pretrained`` has just filled), through the sharded index if any.
    """
    if checkpoint_files:
        return [str(f) for f in checkpoint_files]
    src = getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", None)
    if not src:
        raise CheckpointError("cannot find the checkpoint files of this AFPQ model (no name_or_path)")
    src = str(src)
    if os.path.isdir(src):  # the project's reader: regular files only, strict index and headers
        from ..core.checkpoint import CheckpointSnapshot

        with CheckpointSnapshot(src) as snap:
            snap.headers()  # CheckpointError naming the shard, the tensor or the index entry
            return snap.files
    from transformers.utils import cached_file

    from ..core.checkpoint import INDEX_NAME, WEIGHTS_NAME, parse_index

    idx = cached_file(src, INDEX_NAME, _raise_exceptions_for_missing_entries=False)
    one = None if idx else cached_file(src, WEIGHTS_NAME, _raise_exceptions_for_missing_entries=False)
    if idx:
        with open(idx, "rb") as fh:
            weight_map = parse_index(fh.read(), idx)
        return [os.path.join(os.path.dirname(idx), f) for f in sorted(set(weight_map.values()))]
    if one:
        return [one]
    raise CheckpointError(f"{src}: no model.safetensors (AFPQ checkpoints are stored as safetensors)")


def _tied_names(model: nn.Module) -> set:
    from ..nn.skeleton import tied_parameter_names

    names = set(tied_parameter_names(model))
    extra = getattr(model, "all_tied_weights_keys", None)  # transformers 5.x
    if isinstance(extra, Mapping):
        names |= set(extra.keys())
    return names


def validate_against_model(
    tensors: CheckpointTensors, model: nn.Module, qc: AFPQConfigDict,
    layers: Mapping[str, Tuple[int, int, bool]],
    geometries: Optional[Mapping] = None,
) -> None:
    """Raise :class:`CheckpointError` naming the tensor unless the checkpoint fits ``model``.

    ``layers``: ``{name: (in_features, out_features, has_bias)}`` of the quantized layers;
    ``model`` already holds the AFPQ modules (so its state-dict keys are the checkpoint's).
    ``geometries``: ``{name: LayerGeometry}`` already checked by the skeleton's plan.
    """
    for name, (in_f, out_f, bias) in layers.items():
        validate_layer_tensors(name, tensors, qc, in_f, out_f, bias, source=tensors.source(f"{name}.qweight"),
                               geometry=(geometries or {}).get(name))
    sd = model.state_dict()
    expected = set(sd)
    tied = _tied_names(model)
    missing = sorted(expected - set(tensors) - tied)
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"{tensors.source(missing[0])}: tensor {missing[0]!r} is missing{more}")
    quant_prefixes = tuple(f"{n}." for n in layers)
    placeholders = set(placeholder_keys(layers))  # checked by validate_layer_tensors
    for key in sorted(set(tensors) - expected - placeholders):
        if key.startswith(quant_prefixes):
            raise CheckpointError(
                f"{tensors.source(key)}: unexpected tensor {key!r} in a quantized layer "
                f"(mode {qc.mode!r}, layout {qc.layout!r} has no such tensor)"
            )
    for key, ref in sd.items():
        if key in tensors and tensors.shape(key) != tuple(ref.shape):
            raise CheckpointError(
                f"{tensors.source(key)}: tensor {key!r} has shape {tensors.shape(key)}, expected {tuple(ref.shape)}"
            )
