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

import hashlib
import json
import logging
import os
import shutil
import tempfile
from typing import Callable, Dict, Mapping, Optional

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
from .safetensors_io import load_file, parse_json_object, read_header, save_file

log = logging.getLogger(__name__)

__all__ = [
    "QUANT_METHOD",
    "FORMAT_VERSION",
    "WEIGHTS_NAME",
    "AFPQConfigDict",
    "CheckpointError",
    "write_checkpoint",
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
]

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


def write_checkpoint(
    out_dir: str,
    tensors: Mapping[str, torch.Tensor],
    model_config: Mapping,
    qc: AFPQConfigDict,
    extra_writer: Optional[Callable[[str], None]] = None,
    overwrite: bool = False,
) -> str:
    """Write a checkpoint folder atomically and crash-safely; returns its absolute path.

    ``extra_writer(tmp_dir)`` may add files (tokenizer, generation config) before the
    folder is moved into place. The refusal placeholders of each quantized layer are
    added to ``tensors``. An existing ``out_dir`` must be an empty folder, or, with
    ``overwrite``, an AFPQ checkpoint (anything else: :class:`CheckpointError`, or
    ``FileExistsError`` without ``overwrite``); it is replaced only after the new folder
    is complete and flushed to disk. Saves to one parent folder are serialized by a lock
    on that folder; leftovers of an interrupted save are recovered or removed first
    (:func:`recover_interrupted_save`).
    """
    out_dir = os.path.abspath(out_dir)
    tensors = with_refusal_placeholders(tensors, quantized_module_names(qc, tensors))
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    with parent_lock(parent):
        recover_interrupted_save(out_dir, _locked=True)
        _check_replaceable(out_dir, overwrite)
        tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.tmp-", dir=parent)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; a checkpoint is an ordinary folder
        try:
            config = dict(model_config)
            config["quantization_config"] = qc.to_dict()
            with open(os.path.join(tmp, CONFIG_NAME), "wb") as fh:
                fh.write(_json_bytes(config))
            save_file(tensors, os.path.join(tmp, WEIGHTS_NAME), metadata=safetensors_metadata(qc))
            if extra_writer is not None:
                extra_writer(tmp)
            fsync_tree(tmp)
            move_into_place(tmp, out_dir, parent)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return out_dir


def _check_replaceable(out_dir: str, overwrite: bool) -> None:
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
    """``config.json`` and ``model.safetensors`` of one version of a checkpoint folder.

    The folder is opened once (a directory descriptor) and both files are opened
    through it, so a save that replaces the folder meanwhile cannot mix one version's
    config with another's tensors (if the old version is deleted before its files are
    open, the folder is opened again, up to ``retries`` times). The tensor file stays
    open until :meth:`close` (or the end of a ``with`` block): every tensor read comes
    from the version the config was read from. The config's stamp of the decoding keys,
    when the file has one, must match the tensors' (:func:`config_stamp`).
    """

    def __init__(self, path: str, retries: int = 5) -> None:
        self.path = str(path)
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
            self.weights_path = os.path.join(path, WEIGHTS_NAME)
            self._weights = None
            if WEIGHTS_NAME in names:
                self._weights = os.fdopen(os.open(WEIGHTS_NAME, os.O_RDONLY, dir_fd=dfd), "rb")
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
    def weights(self):
        if self._weights is None:
            raise CheckpointError(f"{self.path}: no {WEIGHTS_NAME}")
        return self._weights

    def tensors(self, device="cpu") -> Dict[str, torch.Tensor]:
        self.weights.seek(0)
        return load_file(self.weights, device=device, name=self.weights_path)

    def check_stamp(self, qc: AFPQConfigDict) -> None:
        """:class:`CheckpointError` if the tensors were written with other decoding keys."""
        _, meta, _ = read_header(self.weights, name=self.weights_path)
        stamp = meta.get(STAMP_METADATA_KEY)
        if stamp is not None and stamp != config_stamp(qc):
            raise CheckpointError(
                f"{self.path}: {CONFIG_NAME} and {WEIGHTS_NAME} come from different saves (the quantization "
                f"settings differ: {WEIGHTS_NAME} was written with another quantization_config); save it again"
            )

    def close(self) -> None:
        if self._weights is not None:
            self._weights.close()

    def __enter__(self) -> "CheckpointSnapshot":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _read_at(dfd: int, name: str) -> bytes:
    fd = os.open(name, os.O_RDONLY, dir_fd=dfd)
    with os.fdopen(fd, "rb") as fh:
        return fh.read()


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
        with open(cfg, encoding="utf-8") as fh:
            config = json.load(fh)
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
    """Every tensor of a checkpoint folder's ``model.safetensors`` (opened once)."""
    with CheckpointSnapshot(path) as snap:
        return snap.tensors(device)
