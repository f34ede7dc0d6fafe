"""The one AFPQ checkpoint format, its writer and its validation.

The format (folder layout, ``quantization_config`` keys, per-layer tensors, refusal
placeholders) is described once, in ``docs/format.md`` section 4; this module is its
executable contract: :class:`AFPQConfigDict` validates the config, :func:`validate_layer_tensors`
one layer's tensors, :func:`write_checkpoint` writes a folder.

Why the refusal placeholders: ``quant_method: "afpq"`` alone does not stop stock
loaders (transformers without the plugin only warns "Unknown quantization type, got
afpq" and builds the float model with random quantized layers; AutoGPTQ 0.7.1 ignores
``quant_method`` in a hub repository's ``config.json`` and loads the codes into INT
layers). A one-byte ``uint8 [1]`` tensor under ``<layer>.weight`` and ``<layer>.qzeros``
makes them fail with a size mismatch (transformers 4.53 and 5.x raise ``RuntimeError``
unless ``ignore_mismatched_sizes=True``; accelerate, under AutoGPTQ and AutoAWQ, raises
``ValueError``). Every AFPQ loader checks that a placeholder is exactly that and drops
it; checkpoints written before the placeholders existed load unchanged.

Saving is atomic (a temporary sibling folder renamed into place; an existing folder
is replaced only once the new one is complete) and deterministic (same input, same
bytes).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from typing import Callable, Dict, Iterator, List, Mapping, Optional, Tuple

import torch

from .checkpoint_schema import (  # noqa: F401  (re-exported: the public names live here)
    PLACEHOLDER_NOTE,
    AFPQConfigDict,
    expected_layer_tensors,
    is_refusal_placeholder,
    placeholder_keys,
    quantized_module_names,
    refusal_placeholder,
    second_param_name,
    validate_layer_tensors,
    with_refusal_placeholders,
)
from .atomic_dir import fsync_tree, leftovers, move_into_place, parent_lock, recover_interrupted_save
from .constants import CONFIG_NAME, FORMAT_VERSION, PLACEHOLDER_SUFFIXES, QUANT_METHOD, WEIGHTS_NAME
from .errors import CheckpointError
from .safetensors_io import DTYPES, open_regular, parse_json_object, read_header, read_tensor, save_file, tensor_nbytes

log = logging.getLogger(__name__)

__all__ = [
    "QUANT_METHOD",
    "FORMAT_VERSION",
    "WEIGHTS_NAME",
    "AFPQConfigDict",
    "CheckpointError",
    "write_checkpoint",
    "check_replaceable",
    "read_quant_config",
    "read_config",
    "load_checkpoint_tensors",
    "expected_layer_tensors",
    "second_param_name",
    "validate_layer_tensors",
    "PLACEHOLDER_SUFFIXES",
    "refusal_placeholder",
    "is_refusal_placeholder",
    "placeholder_keys",
    "quantized_module_names",
    "with_refusal_placeholders",
    "safetensors_metadata",
    "is_afpq_checkpoint",
    "CheckpointSnapshot",
    "recover_interrupted_save",
    "config_stamp",
    "INDEX_NAME",
    "DEFAULT_MAX_SHARD_SIZE",
    "parse_size",
    "shard_name",
    "checkpoint_writer",
    "ShardWriter",
    "parse_index",
]

#: transformers' name of the sharded index, and its shard names (``model-00001-of-00003.safetensors``).
INDEX_NAME = "model.safetensors.index.json"
#: transformers' default ``max_shard_size`` ("5GB", decimal).
DEFAULT_MAX_SHARD_SIZE = 5 * 10**9
_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(value) -> int:
    """``"5GB"`` -> 5 * 10**9, ``"1GiB"`` -> 2**30, an int as is (transformers' spelling of
    ``max_shard_size``); anything else, or a size under 1 byte, is a ``ValueError``."""
    if isinstance(value, int) and not isinstance(value, bool):
        n = value
    else:
        m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", str(value))
        unit = m.group(2).upper() if m else None
        if m is None or unit not in _SIZE_UNITS:
            raise ValueError(f"max_shard_size {value!r}: expected a size such as 5GB, 500MB, 1GiB or a byte count")
        n = int(float(m.group(1)) * _SIZE_UNITS[unit])
    if n < 1:
        raise ValueError(f"max_shard_size {value!r} must be at least 1 byte")
    return n


def shard_name(k: int, n: int) -> str:
    """transformers' name of shard ``k`` (1-based) of ``n``."""
    return f"model-{k:05d}-of-{n:05d}.safetensors"

# -- writing ---------------------------------------------------------------------------------
def _json_bytes(obj) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8")


#: The ``quantization_config`` keys that decide how the tensors decode; their digest is
#: written into ``model.safetensors`` so a reader can tell config and tensors of two saves apart.
STAMP_KEYS = ("format", "bits", "group_size", "mode", "layout", "scale_dtype", "table")
STAMP_METADATA_KEY = "afpq_config_sha256"


def config_stamp(qc: AFPQConfigDict) -> str:
    d = qc.to_dict()
    keys = STAMP_KEYS + (("modules",) if d.get("modules") else ())  # uniform checkpoints: the stamp as before
    blob = json.dumps({k: d[k] for k in keys}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def safetensors_metadata(qc: Optional[AFPQConfigDict] = None) -> Dict[str, str]:
    """The ``__metadata__`` of an AFPQ ``model.safetensors`` (with ``qc``: its stamp)."""
    meta = {"format": "pt", "quant_method": QUANT_METHOD, "afpq_placeholder": PLACEHOLDER_NOTE}
    if qc is not None:
        meta[STAMP_METADATA_KEY] = config_stamp(qc)
    return meta


class ShardWriter:
    """Tensors in, safetensors shards out, as they come: a shard is written (and its
    tensors dropped) as soon as the next tensor would take it past ``max_shard_size``, so at
    most one shard is held in memory. :meth:`finish` names the files as transformers does
    (``model.safetensors`` when one file holds everything, else ``model-0000k-of-0000n``
    and ``model.safetensors.index.json``). Each file carries ``metadata`` (the config stamp)."""

    def __init__(self, folder: str, max_shard_size=None, metadata: Optional[Dict[str, str]] = None) -> None:
        self.folder = folder
        self.max = parse_size(DEFAULT_MAX_SHARD_SIZE if max_shard_size is None else max_shard_size)
        self.metadata = dict(metadata or {})
        self.pending: Dict[str, torch.Tensor] = {}
        self.pending_size = 0
        self.parts: List[List[str]] = []
        self.seen: set = set()
        self.total = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self.seen:
            raise CheckpointError(f"tensor {name!r} is written twice")
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{name}: expected a tensor, got {type(tensor).__name__}")
        size = tensor_nbytes(tensor)
        if self.pending and self.pending_size + size > self.max:
            self.flush()
        self.seen.add(name)
        self.pending[name] = tensor
        self.pending_size += size
        self.total += size

    def flush(self) -> None:
        """Write the pending tensors as the next shard."""
        if not self.pending and self.parts:
            return
        save_file(self.pending, self._part(len(self.parts)), metadata=self.metadata)
        self.parts.append(sorted(self.pending))
        self.pending, self.pending_size = {}, 0

    def _part(self, i: int) -> str:
        return os.path.join(self.folder, f".part-{i:05d}.safetensors")

    def finish(self) -> List[str]:
        """Write the last shard, name the files, write the index; returns the file names."""
        if self.pending or not self.parts:
            self.flush()
        n = len(self.parts)
        if n == 1:
            os.replace(self._part(0), os.path.join(self.folder, WEIGHTS_NAME))
            return [WEIGHTS_NAME]
        names, weight_map = [], {}
        for i, keys in enumerate(self.parts):
            name = shard_name(i + 1, n)
            os.replace(self._part(i), os.path.join(self.folder, name))
            names.append(name)
            weight_map.update({k: name for k in keys})
        meta = {"total_size": self.total}
        if STAMP_METADATA_KEY in self.metadata:
            meta[STAMP_METADATA_KEY] = self.metadata[STAMP_METADATA_KEY]
        with open(os.path.join(self.folder, INDEX_NAME), "wb") as fh:
            fh.write(_json_bytes({"metadata": meta, "weight_map": weight_map}))
        return names + [INDEX_NAME]


@contextlib.contextmanager
def checkpoint_writer(
    out_dir: str, model_config: Mapping, qc: AFPQConfigDict,
    extra_writer: Optional[Callable[[str], None]] = None, overwrite: bool = False, max_shard_size=None,
) -> Iterator[ShardWriter]:
    """The one way a checkpoint folder is written: ``with checkpoint_writer(...) as w:
    w.add(name, tensor) ...``. Tensors go to shards in a temporary sibling folder as they
    come (:class:`ShardWriter`); when the block ends without an error the index,
    ``config.json`` (``model_config`` plus ``quantization_config``) and ``extra_writer``'s
    files are added, everything is flushed to disk and the folder takes ``out_dir``'s place
    in one step (the rules of :func:`write_checkpoint`). An error, or a crash, leaves
    ``out_dir`` as it was. The caller adds the refusal placeholders
    (:func:`with_refusal_placeholders`); ``w.path`` is the final path."""
    out_dir = os.path.abspath(out_dir)
    max_shard_size = parse_size(DEFAULT_MAX_SHARD_SIZE if max_shard_size is None else max_shard_size)
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    with parent_lock(parent):
        recover_interrupted_save(out_dir, _locked=True)
        check_replaceable(out_dir, overwrite)
        tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.tmp-", dir=parent)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; a checkpoint is an ordinary folder
        try:
            writer = ShardWriter(tmp, max_shard_size, safetensors_metadata(qc))
            writer.path = out_dir
            yield writer
            writer.finish()
            config = dict(model_config)
            config["quantization_config"] = qc.to_dict()
            with open(os.path.join(tmp, CONFIG_NAME), "wb") as fh:
                fh.write(_json_bytes(config))
            if extra_writer is not None:
                extra_writer(tmp)
            fsync_tree(tmp)
            move_into_place(tmp, out_dir, parent)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def write_checkpoint(
    out_dir: str,
    tensors: Mapping[str, torch.Tensor],
    model_config: Mapping,
    qc: AFPQConfigDict,
    extra_writer: Optional[Callable[[str], None]] = None,
    overwrite: bool = False,
    max_shard_size=None,
) -> str:
    """Write a checkpoint folder atomically and crash-safely; returns its absolute path.

    ``extra_writer(tmp_dir)`` may add files (tokenizer, generation config) before the
    folder is moved into place. The refusal placeholders of each quantized layer are
    added to ``tensors``. Tensors go, in name order, into shards of at most
    ``max_shard_size`` (bytes or ``"5GB"``-style, default 5GB as transformers; a tensor
    larger than that gets a shard of its own): one ``model.safetensors`` when they fit,
    else ``model-0000k-of-0000n.safetensors`` and ``model.safetensors.index.json``. An
    existing ``out_dir`` must be an empty folder, or, with ``overwrite``, an AFPQ
    checkpoint (anything else: :class:`CheckpointError`, or ``FileExistsError`` without
    ``overwrite``); it is replaced only after the new folder is complete and flushed to
    disk. Saves to one parent folder are serialized by a lock on that folder; leftovers of
    an interrupted save are recovered or removed first (:func:`recover_interrupted_save`).
    """
    tensors = with_refusal_placeholders(tensors, quantized_module_names(qc, tensors))
    with checkpoint_writer(out_dir, model_config, qc, extra_writer, overwrite, max_shard_size) as w:
        for name in sorted(tensors):
            w.add(name, tensors[name])
    return w.path


def check_replaceable(out_dir: str, overwrite: bool) -> None:
    """``out_dir`` may take a new checkpoint: absent, an empty folder, or (``overwrite``) an AFPQ
    checkpoint; else ``FileExistsError`` / :class:`CheckpointError` (the writer checks it again)."""
    if not os.path.lexists(out_dir):
        return
    empty_dir = os.path.isdir(out_dir) and not os.path.islink(out_dir) and not os.listdir(out_dir)
    if empty_dir:
        return
    if not overwrite:
        raise FileExistsError(f"{out_dir} already exists and is not empty; pass overwrite=True (CLI: --overwrite)")
    if os.path.islink(out_dir) or not os.path.isdir(out_dir) or not is_afpq_checkpoint(out_dir):
        what = "a file" if not os.path.isdir(out_dir) else ("a link" if os.path.islink(out_dir) else "a folder that is not an AFPQ checkpoint")
        raise CheckpointError(
            f"{out_dir} is {what}: overwrite=True replaces only an AFPQ checkpoint or an empty folder; "
            "choose another output path or remove it yourself"
        )


# -- reading: one version of a folder ---------------------------------------------------------
class CheckpointSnapshot:
    """``config.json`` and the tensor file(s) of one version of a checkpoint folder.

    The tensors are ``model.safetensors``, or the shards ``model.safetensors.index.json``
    lists (transformers' layout; a folder with both is refused: which one is meant?). The
    folder is opened once (a directory descriptor) and every file is opened through it, so
    a save that replaces the folder meanwhile cannot mix one version's config with
    another's tensors (if the old version is deleted before its files are open, the folder
    is opened again, up to ``retries`` times). The files stay open until :meth:`close` (or
    the end of a ``with`` block): every tensor read comes from the version the config was
    read from. Only regular files are opened (a FIFO, device or socket is a named error,
    never a blocked read). Headers are read strictly (:func:`read_header`); the index and
    the shards must agree key for key; each file's stamp of the decoding keys, when it has
    one, must match the config's (:meth:`check_stamp`).
    """

    def __init__(self, path: str, retries: int = 5) -> None:
        self.path = str(path)
        self._files: List[Tuple[str, object]] = []
        self._headers: Optional[Dict[str, Tuple[str, dict, int]]] = None
        self._meta: Dict[str, Dict[str, str]] = {}
        try:
            recover_interrupted_save(self.path)
        except OSError as exc:  # a read-only parent folder, say: reading goes on without it
            log.warning("%s: could not clean up after an interrupted save (%s)", self.path, exc)
        last = None
        for _ in range(retries):
            try:
                self._open()
                break
            except FileNotFoundError as exc:  # the version we opened was deleted under us
                self.close()
                last = exc
        else:
            raise CheckpointError(f"{self.path}: the folder kept changing while it was opened ({last})")

    def _open(self) -> None:
        path = self.path
        if not os.path.isdir(path):
            if leftovers(path, "old") or leftovers(path, "tmp"):  # a save is moving it: wait, retry
                recover_interrupted_save(path)
                raise FileNotFoundError(path)
            raise CheckpointError(f"{path}: not a folder")
        dfd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            names = set(os.listdir(dfd))
            self.config_path = os.path.join(path, CONFIG_NAME)
            self._config = _parse_config(_read_at(dfd, CONFIG_NAME), self.config_path) if CONFIG_NAME in names else None
            self.index_path = os.path.join(path, INDEX_NAME)
            self.weights_path = os.path.join(path, WEIGHTS_NAME)
            self.index: Optional[Dict[str, str]] = None
            self._index_stamp = None
            self._files = []
            if WEIGHTS_NAME in names and INDEX_NAME in names:
                raise CheckpointError(
                    f"{path}: holds both {WEIGHTS_NAME} and {INDEX_NAME}: one checkpoint has one or the other; "
                    "remove the stale one"
                )
            if INDEX_NAME in names:
                raw = _read_at(dfd, INDEX_NAME)
                self.index = parse_index(raw, self.index_path)
                meta = json.loads(raw.decode("utf-8")).get("metadata")
                self._index_stamp = meta.get(STAMP_METADATA_KEY) if isinstance(meta, dict) else None
                self.weights_path = self.index_path  # what error messages name
                for shard in sorted(set(self.index.values())):
                    if shard not in names:
                        raise CheckpointError(f"{os.path.join(path, shard)}: shard listed in {INDEX_NAME} is missing")
                    self._files.append((os.path.join(path, shard), open_regular(shard, dfd, CheckpointError)))
            elif WEIGHTS_NAME in names:
                self._files.append((self.weights_path, open_regular(WEIGHTS_NAME, dfd, CheckpointError)))
        finally:
            os.close(dfd)

    # -- config -------------------------------------------------------------------------
    @property
    def config(self) -> dict:
        if self._config is None:
            raise CheckpointError(f"{self.path}: no {CONFIG_NAME}")
        return self._config

    def quant_config(self) -> AFPQConfigDict:
        qd = self.config.get("quantization_config")
        if qd is None:
            raise CheckpointError(f"{self.config_path}: no quantization_config: this is not a quantized checkpoint")
        return AFPQConfigDict.from_dict(qd, source=f"{self.config_path} quantization_config")

    # -- tensors ------------------------------------------------------------------------
    @property
    def sharded(self) -> bool:
        return self.index is not None

    @property
    def has_files(self) -> bool:
        """True when the folder has ``model.safetensors`` or an index (the files are open)."""
        return bool(self._files)

    @property
    def files(self) -> List[str]:
        """The tensor files' paths (one, or the shards)."""
        self._need_files()
        return [p for p, _ in self._files]

    def _need_files(self) -> None:
        if not self._files:
            raise CheckpointError(f"{self.path}: no {WEIGHTS_NAME} or {INDEX_NAME} (AFPQ checkpoints and "
                                  "streamed models are safetensors)")

    def headers(self) -> Dict[str, Tuple[str, dict, int]]:
        """``{tensor: (file, header entry, data start)}`` over every file, each header read
        strictly once; the index (when sharded) must list exactly each shard's tensors."""
        if self._headers is not None:
            return self._headers
        self._need_files()
        where: Dict[str, Tuple[str, dict, int]] = {}
        for path, fh in self._files:
            header, self._meta[path], start = read_header(fh, path)
            shard = os.path.basename(path)
            for name, info in header.items():
                if name in where:
                    raise CheckpointError(f"{path}: tensor {name!r} also appears in {where[name][0]}")
                if self.index is not None and self.index.get(name) != shard:
                    listed = self.index.get(name)
                    raise CheckpointError(
                        f"{path}: holds tensor {name!r}, which {INDEX_NAME} "
                        + (f"puts in {listed}" if listed else "does not list")
                        + " (a shard of another checkpoint?)"
                    )
                where[name] = (path, info, start)
        if self.index is not None:
            lost = sorted(k for k in self.index if k not in where)
            if lost:
                raise CheckpointError(
                    f"{os.path.join(self.path, self.index[lost[0]])}: does not hold tensor {lost[0]!r}, which "
                    f"{INDEX_NAME} puts there" + (f" (and {len(lost) - 1} more)" if len(lost) > 1 else "")
                )
        self._headers = where
        return where

    def keys(self) -> List[str]:
        return list(self.headers())

    def dtype(self, name: str) -> torch.dtype:
        return DTYPES[self.headers()[name][1]["dtype"]]

    def shape(self, name: str) -> Tuple[int, ...]:
        return tuple(int(d) for d in self.headers()[name][1]["shape"])

    def source(self, name: str) -> str:
        """The file holding tensor ``name`` (for error messages)."""
        h = self.headers().get(name)
        return h[0] if h else self.weights_path

    def read(self, name: str, device="cpu") -> torch.Tensor:
        """One tensor, read from its file (no other tensor is read)."""
        path, info, start = self.headers()[name]
        fh = dict(self._files)[path]
        t = read_tensor(fh, info, start, path)
        return t.to(device) if str(device) != "cpu" else t

    def tensors(self, device="cpu") -> Dict[str, torch.Tensor]:
        """Every tensor of every file, in file order."""
        h = self.headers()
        order = sorted(h, key=lambda k: (self.files.index(h[k][0]), h[k][1]["data_offsets"][0]))
        return {k: self.read(k, device) for k in order}

    @property
    def weights(self):
        """The open ``model.safetensors`` (single-file checkpoints)."""
        self._need_files()
        if self.sharded:
            raise CheckpointError(f"{self.path}: a sharded checkpoint has no single {WEIGHTS_NAME}")
        return self._files[0][1]

    def check_stamp(self, qc: AFPQConfigDict) -> None:
        """:class:`CheckpointError` if a tensor file was written with other decoding keys."""
        self.headers()
        want = config_stamp(qc)
        if self._index_stamp is not None and self._index_stamp != want:
            raise CheckpointError(f"{self.index_path}: written with another quantization_config than {CONFIG_NAME} "
                                  "(the files come from different saves); save it again")
        for path, _ in self._files:
            stamp = self._meta[path].get(STAMP_METADATA_KEY)
            if stamp is not None and stamp != want:
                raise CheckpointError(
                    f"{path}: {CONFIG_NAME} and {os.path.basename(path)} come from different saves (the quantization "
                    f"settings differ: {os.path.basename(path)} was written with another quantization_config); "
                    "save it again"
                )

    def close(self) -> None:
        for _, fh in self._files:
            fh.close()
        self._files = []

    def __enter__(self) -> "CheckpointSnapshot":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _read_at(dfd: int, name: str) -> bytes:
    with open_regular(name, dfd, CheckpointError) as fh:
        return fh.read()


def parse_index(raw: bytes, where: str) -> Dict[str, str]:
    """``weight_map`` of a ``model.safetensors.index.json``: tensor name -> shard file name
    (a plain ``*.safetensors`` name in the folder)."""
    obj = parse_json_object(raw, where, CheckpointError)
    wm = obj.get("weight_map")
    if not isinstance(wm, dict) or not wm:
        raise CheckpointError(f"{where}: weight_map must be a non-empty JSON object of tensor -> shard file")
    for key, shard in wm.items():
        if (not isinstance(shard, str) or shard in (".", "..") or os.path.basename(shard) != shard
                or "\\" in shard or not shard.endswith(".safetensors")):
            raise CheckpointError(
                f"{where}: weight_map[{key!r}] is {shard!r:.200}, not a .safetensors file name in the checkpoint folder"
            )
    return wm


def _parse_config(raw: bytes, where: str) -> dict:
    return parse_json_object(raw, where, CheckpointError)


def is_afpq_checkpoint(path) -> bool:
    """True when ``path`` is a folder whose ``config.json`` says ``quant_method: "afpq"``
    (an unreadable or malformed ``config.json`` is simply not one)."""
    if path is None:
        return False
    cfg = os.path.join(str(path), CONFIG_NAME)
    if not os.path.isfile(cfg):
        return False
    try:
        with open_regular(cfg, error=CheckpointError) as fh:
            config = json.loads(fh.read().decode("utf-8"))
    except (OSError, ValueError, RecursionError):
        return False
    qc = config.get("quantization_config") if isinstance(config, dict) else None
    return isinstance(qc, dict) and qc.get("quant_method") == QUANT_METHOD


def read_config(path: str) -> dict:
    """A checkpoint or model folder's ``config.json`` (a JSON object, else :class:`CheckpointError`)."""
    with CheckpointSnapshot(path) as snap:
        return snap.config


def read_quant_config(path: str) -> tuple:
    """(model config dict, :class:`AFPQConfigDict`) of a checkpoint folder."""
    with CheckpointSnapshot(path) as snap:
        return snap.config, snap.quant_config()


def load_checkpoint_tensors(path: str, device="cpu") -> Dict[str, torch.Tensor]:
    """Every tensor of a checkpoint folder (``model.safetensors`` or its shards, opened once)."""
    with CheckpointSnapshot(path) as snap:
        return snap.tensors(device)
