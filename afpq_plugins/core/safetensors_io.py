"""A small, strict reader and deterministic writer of the safetensors format.

The files are ordinary safetensors (any safetensors reader opens them). Our own
implementation exists for two reasons: the writer is byte-for-byte deterministic
(tensors in sorted name order, header with sorted keys, no padding surprises), and
the reader turns a damaged file into an error that names the file and the tensor
(a truncated download, an offset past the end, a byte count that does not match the
shape) instead of a bare deserialisation failure.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import struct
from typing import BinaryIO, Dict, Iterator, Mapping, Optional, Tuple

import torch

from .errors import SafetensorsError

__all__ = ["save_file", "load_file", "read_header", "read_tensor", "parse_json_object", "open_regular", "tensor_nbytes",
           "SafetensorsError", "DTYPES"]

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
_NAMES = {v: k for k, v in _DTYPES.items()}
DTYPES = _DTYPES  #: safetensors dtype name -> torch dtype (the ones this reader supports)
_MAX_HEADER = 100 * 1024 * 1024


def save_file(tensors: Mapping[str, torch.Tensor], path: str, metadata: Optional[Dict[str, str]] = None) -> None:
    """Write ``tensors`` to ``path`` (same input, same bytes). The header is computed from
    the shapes first and each tensor's bytes are written straight from its storage, so
    writing a file holds no second copy of its data."""
    header: Dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in sorted(metadata.items())}
    offset = 0
    names = sorted(tensors)
    for name in names:
        t = tensors[name]
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a tensor, got {type(t).__name__}")
        if t.dtype not in _NAMES:
            raise SafetensorsError(f"{path}: tensor {name!r} has unsupported dtype {t.dtype}")
        n = t.numel() * t.element_size()
        header[name] = {"dtype": _NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    hbytes = json.dumps(header, separators=(",", ":"), sort_keys=True).encode("utf-8")
    hbytes += b" " * (-len(hbytes) % 8)  # align the data section to 8 bytes
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(hbytes)))
        fh.write(hbytes)
        for name in names:
            fh.write(_tensor_view(tensors[name]))


def _tensor_view(t: torch.Tensor):
    """The tensor's bytes as a buffer (no copy for a contiguous CPU tensor)."""
    t = t.detach().to("cpu").contiguous()
    if t.numel() == 0:
        return b""
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def tensor_nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def open_regular(path: str, dir_fd: Optional[int] = None, error=SafetensorsError) -> BinaryIO:
    """``path`` opened for binary reading, if it is a regular file; a FIFO, device or socket
    is ``error`` naming it (it is opened non-blocking, so a FIFO without a writer cannot
    hang the reader)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0), dir_fd=dir_fd)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kind = ("a FIFO" if stat.S_ISFIFO(st.st_mode) else "a socket" if stat.S_ISSOCK(st.st_mode)
                    else "a device" if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode)
                    else "a folder" if stat.S_ISDIR(st.st_mode) else "not a regular file")
            where = path if dir_fd is None else os.path.join(_dir_name(dir_fd), path)
            raise error(f"{where} is {kind}, not a regular file: a checkpoint file must be an ordinary file")
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _dir_name(dir_fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{dir_fd}")
    except OSError:
        return "<folder>"


_MAX_DIM = (1 << 63) - 1


def _reject_duplicates(pairs):
    out = {}
    for k, v in pairs:
        if k in out:
            raise _Duplicate(k)
        out[k] = v
    return out


class _Duplicate(Exception):
    pass


def _uint(v) -> bool:
    return type(v) is int and 0 <= v <= _MAX_DIM


def parse_json_object(raw: bytes, where: str, error=SafetensorsError, object_pairs_hook=None) -> dict:
    """``raw`` as a JSON object; anything else (bad UTF-8 or JSON, deep nesting, another
    JSON type) is ``error`` naming ``where``."""
    try:
        obj = json.loads(raw.decode("utf-8"), object_pairs_hook=object_pairs_hook)
    except RecursionError:
        raise error(f"{where}: nested too deeply") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise error(f"{where}: not valid JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise error(f"{where}: must hold a JSON object, got {type(obj).__name__}")
    return obj


@contextlib.contextmanager
def _reading(src, name: Optional[str] = None) -> Iterator[Tuple[BinaryIO, str]]:
    """``(binary file, name)`` of a path (opened here, closed after) or of an open file."""
    if isinstance(src, (str, os.PathLike)):
        with open_regular(os.fspath(src)) as fh:
            yield fh, name or os.fspath(src)
    else:
        yield src, name or str(getattr(src, "name", "<file>"))


def read_header(src, name: Optional[str] = None) -> Tuple[Dict[str, dict], Dict[str, str], int]:
    """(tensor entries, metadata, data start offset) of a path or an open binary file,
    validated as strictly as the safetensors library does: a JSON object without
    duplicate keys, ``__metadata__`` a map of strings, every entry a known dtype, a
    shape of non-negative integers and integer offsets; the tensors' byte ranges tile the
    data section exactly (in offset order, no gap, no overlap, no trailing bytes), and
    each range holds ``numel * itemsize`` bytes. Any violation is a
    :class:`SafetensorsError` naming the file (and the tensor)."""
    with _reading(src, name) as (fh, path):
        size = os.fstat(fh.fileno()).st_size
        fh.seek(0)
        raw = fh.read(8)
        if len(raw) < 8:
            raise SafetensorsError(f"{path}: file is truncated ({size} bytes, no header)")
        (hlen,) = struct.unpack("<Q", raw)
        if hlen > _MAX_HEADER or 8 + hlen > size:
            raise SafetensorsError(f"{path}: header length {hlen} runs past the end of the file ({size} bytes): truncated?")
        hbytes = fh.read(hlen)
    try:
        header = parse_json_object(hbytes, f"{path}: header", SafetensorsError, _reject_duplicates)
    except _Duplicate as dup:
        raise SafetensorsError(f"{path}: header names tensor {dup.args[0]!r} twice") from None
    metadata = header.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise SafetensorsError(f"{path}: __metadata__ must map strings to strings, got {metadata!r:.200}")
    start = 8 + hlen
    spans = []
    for name, info in header.items():
        if not isinstance(info, dict):
            raise SafetensorsError(f"{path}: tensor {name!r} has a malformed header entry {info!r:.200}")
        dtype = _DTYPES.get(info.get("dtype")) if isinstance(info.get("dtype"), str) else None
        if dtype is None:
            raise SafetensorsError(f"{path}: tensor {name!r} has an unknown or unsupported dtype {info.get('dtype')!r:.50}")
        shape, offsets = info.get("shape"), info.get("data_offsets")
        if not isinstance(shape, list) or not all(_uint(d) for d in shape):
            raise SafetensorsError(f"{path}: tensor {name!r} shape must be a list of non-negative integers, got {shape!r:.200}")
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(_uint(o) for o in offsets):
            raise SafetensorsError(
                f"{path}: tensor {name!r} data_offsets must be two non-negative integers, got {offsets!r:.200}"
            )
        begin, end = offsets
        numel = 1
        for d in shape:
            numel *= d
        expect = numel * torch.empty((), dtype=dtype).element_size()
        if end < begin or end - begin != expect:
            raise SafetensorsError(
                f"{path}: tensor {name!r} ({info['dtype']}{shape}) needs {expect} bytes, its offsets give {end - begin}"
            )
        if start + end > size:
            raise SafetensorsError(
                f"{path}: tensor {name!r} ends at byte {start + end} but the file has {size} bytes: truncated file"
            )
        spans.append((begin, end, name))
    pos = 0
    for begin, end, name in sorted(spans):
        if begin != pos:
            what = "overlaps the previous tensor" if begin < pos else f"leaves a gap of {begin - pos} bytes before it"
            raise SafetensorsError(f"{path}: tensor {name!r} (data_offsets [{begin}, {end}]) {what}")
        pos = end
    if start + pos != size:
        raise SafetensorsError(f"{path}: {size - start - pos} trailing bytes after the last tensor")
    return header, metadata, start


def read_into(fd: int, buf: bytearray, offset: int) -> int:
    """Fill ``buf`` from ``fd`` at ``offset`` (``preadv`` straight into it: no intermediate copy,
    so the peak is the tensor once); returns the bytes read (fewer only at the end of the file).
    One read returns at most about 2 GiB on Linux, so a large tensor takes several."""
    view, done = memoryview(buf), 0
    while done < len(buf):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n <= 0:
            break
        done += n
    return done


def read_tensor(fh: BinaryIO, info: dict, start: int, name: Optional[str] = None) -> torch.Tensor:
    """One tensor of an open file whose header :func:`read_header` validated."""
    begin, end = info["data_offsets"]
    dtype = _DTYPES[info["dtype"]]
    buf = bytearray(end - begin)
    if read_into(fh.fileno(), buf, start + begin) != end - begin:
        raise SafetensorsError(f"{name or getattr(fh, 'name', '<file>')}: short read (the file changed while it was read)")
    if not buf:
        return torch.empty(info["shape"], dtype=dtype)
    return torch.frombuffer(buf, dtype=dtype).reshape(info["shape"])


def load_file(src, device="cpu", name: Optional[str] = None) -> Dict[str, torch.Tensor]:
    """All tensors of a path or an open binary file (validated first, see
    :func:`read_header`); a path is opened once, so header and data are one version.
    ``name``: the file's name in error messages (default: the path)."""
    out: Dict[str, torch.Tensor] = {}
    with _reading(src, name) as (fh, path):
        header, _, start = read_header(fh, path)
        for key, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            t = read_tensor(fh, info, start, path)
            out[key] = t.to(device) if device != "cpu" else t
    return out
