"""A small, strict reader and deterministic writer of the safetensors format.

The files are ordinary safetensors (any safetensors reader opens them). Our own
implementation exists for two reasons: the writer is byte-for-byte deterministic
(tensors in sorted name order, header with sorted keys, no padding surprises), and
the reader turns a damaged file into an error that names the file and the tensor
(a truncated download, an offset past the end, a byte count that does not match the
shape) instead of a bare deserialisation failure.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Dict, Mapping, Optional, Tuple

import torch

__all__ = ["save_file", "load_file", "read_header", "SafetensorsError"]

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
_NAMES = {v: k for k, v in _DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024


class SafetensorsError(ValueError):
    """A safetensors file is malformed; the message names the file and the tensor."""


def save_file(tensors: Mapping[str, torch.Tensor], path: str, metadata: Optional[Dict[str, str]] = None) -> None:
    """Write ``tensors`` to ``path`` (same input, same bytes)."""
    header: Dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in sorted(metadata.items())}
    blobs = []
    offset = 0
    for name in sorted(tensors):
        t = tensors[name]
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a tensor, got {type(t).__name__}")
        if t.dtype not in _NAMES:
            raise SafetensorsError(f"{path}: tensor {name!r} has unsupported dtype {t.dtype}")
        data = _tensor_bytes(t)
        header[name] = {"dtype": _NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    hbytes = json.dumps(header, separators=(",", ":"), sort_keys=True).encode("utf-8")
    hbytes += b" " * (-len(hbytes) % 8)  # align the data section to 8 bytes
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(hbytes)))
        fh.write(hbytes)
        for data in blobs:
            fh.write(data)


def _tensor_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().to("cpu").contiguous()
    if t.numel() == 0:
        return b""
    return t.reshape(-1).view(torch.uint8).numpy().tobytes()


def read_header(path: str) -> Tuple[Dict[str, dict], Dict[str, str], int]:
    """(tensor entries, metadata, data start offset), validated against the file size."""
    size = os.path.getsize(path)
    with open(path, "rb") as fh:
        raw = fh.read(8)
        if len(raw) < 8:
            raise SafetensorsError(f"{path}: file is truncated ({size} bytes, no header)")
        (hlen,) = struct.unpack("<Q", raw)
        if hlen > _MAX_HEADER or 8 + hlen > size:
            raise SafetensorsError(f"{path}: header length {hlen} runs past the end of the file ({size} bytes): truncated?")
        try:
            header = json.loads(fh.read(hlen).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise SafetensorsError(f"{path}: header is not valid JSON ({exc})") from None
    if not isinstance(header, dict):
        raise SafetensorsError(f"{path}: header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    start = 8 + hlen
    for name, info in header.items():
        try:
            dtype = _DTYPES[info["dtype"]]
            shape = [int(d) for d in info["shape"]]
            begin, end = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise SafetensorsError(f"{path}: tensor {name!r} has a malformed header entry {info!r}") from None
        numel = 1
        for d in shape:
            numel *= d
        expect = numel * torch.empty((), dtype=dtype).element_size()
        if end - begin != expect or begin < 0:
            raise SafetensorsError(
                f"{path}: tensor {name!r} ({info['dtype']}{shape}) needs {expect} bytes, its offsets give {end - begin}"
            )
        if start + end > size:
            raise SafetensorsError(
                f"{path}: tensor {name!r} ends at byte {start + end} but the file has {size} bytes: truncated file"
            )
    return header, metadata, start


def load_file(path: str, device="cpu") -> Dict[str, torch.Tensor]:
    """All tensors of ``path`` (validated first; see :func:`read_header`)."""
    header, _, start = read_header(path)
    out: Dict[str, torch.Tensor] = {}
    with open(path, "rb") as fh:
        for name, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            begin, end = info["data_offsets"]
            fh.seek(start + begin)
            buf = bytearray(fh.read(end - begin))
            dtype = _DTYPES[info["dtype"]]
            if buf:
                t = torch.frombuffer(buf, dtype=dtype).reshape(info["shape"])
            else:
                t = torch.empty(info["shape"], dtype=dtype)
            out[name] = t.to(device) if device != "cpu" else t
    return out
