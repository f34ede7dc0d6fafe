"""NVRTC compilation (ctypes, no CUDA toolkit, no GPU needed) and the driver-API launch.

:func:`compile_source` turns a source into a cubin for ``sm_XY`` (or PTX, ``ptx=True``); it
needs only ``libnvrtc`` (the ``nvidia-cuda-nvrtc-cu12`` wheel, or the one torch ships with).
Results are cached in memory and on disk (``$AFPQ_CUDA_CACHE``, else
``~/.cache/afpq_plugins/cuda``) under the SHA-256 of the source, the options, the target and
the NVRTC version, so a fresh process pays the compile (about a second) once per configuration
and a machine once per source change.

:class:`Module` loads a cubin with ``cuModuleLoadData`` in the current device's context and
launches its functions with ``cuLaunchKernel`` on torch's current stream (capturable in a
CUDA graph). Launch arguments are packed once per call site (:class:`Launch`), so a call
costs one ctypes call.
"""

from __future__ import annotations

import ctypes
import glob
import hashlib
import os
import struct
import sys
import threading
from typing import Dict, List, Sequence, Tuple

__all__ = ["nvrtc_library", "nvrtc_version", "available", "compile_source", "cache_dir", "Module", "Launch",
           "CompileError", "cubin_resources", "supported_archs", "compile_for_device"]


class CompileError(RuntimeError):
    pass


_LOCK = threading.Lock()
_LIB: Dict[str, object] = {}


def _candidates() -> List[str]:
    env = os.environ.get("AFPQ_NVRTC")
    out = [env] if env else []
    for base in sys.path:
        if not base or not os.path.isdir(os.path.join(base, "nvidia")):
            continue
        for pat in ("nvidia/cuda_nvrtc/lib/libnvrtc.so*", "nvidia/cu13/lib/libnvrtc.so*", "nvidia/cu12/lib/libnvrtc.so*"):
            out += sorted(p for p in glob.glob(os.path.join(base, pat)) if "builtins" not in p and ".alt." not in p)
    out += ["libnvrtc.so.13", "libnvrtc.so.12", "libnvrtc.so"]
    return out


def nvrtc_library():
    """The loaded libnvrtc (ctypes), or raise OSError saying where it was looked for."""
    with _LOCK:
        if "lib" in _LIB:
            return _LIB["lib"]
        if "error" in _LIB:
            raise OSError(_LIB["error"])
        tried = _candidates()
        for name in tried:
            try:
                lib = ctypes.CDLL(name)
                lib.nvrtcVersion  # noqa: B018 (a symbol check)
            except (OSError, AttributeError):
                continue
            _LIB["lib"], _LIB["path"] = lib, name
            return lib
        _LIB["error"] = ("libnvrtc not found (pip install nvidia-cuda-nvrtc-cu12, or set AFPQ_NVRTC); tried "
                         + ", ".join(tried))
        raise OSError(_LIB["error"])


def available() -> Tuple[bool, str]:
    try:
        nvrtc_library()
    except OSError as exc:
        return False, str(exc)
    return True, ""


def nvrtc_version() -> Tuple[int, int]:
    lib = nvrtc_library()
    a, b = ctypes.c_int(), ctypes.c_int()
    _check(lib, lib.nvrtcVersion(ctypes.byref(a), ctypes.byref(b)))
    return a.value, b.value


def supported_archs() -> List[int]:
    """Compute capabilities this NVRTC can target (e.g. [50, ..., 90, ...])."""
    lib = nvrtc_library()
    n = ctypes.c_int()
    if lib.nvrtcGetNumSupportedArchs(ctypes.byref(n)) != 0:
        return []
    arr = (ctypes.c_int * n.value)()
    lib.nvrtcGetSupportedArchs(arr)
    return list(arr)


def _check(lib, res: int, prog=None):
    if res == 0:
        return
    lib.nvrtcGetErrorString.restype = ctypes.c_char_p
    msg = lib.nvrtcGetErrorString(res).decode()
    log = ""
    if prog is not None:
        size = ctypes.c_size_t()
        lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
        buf = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetProgramLog(prog, buf)
        log = buf.value.decode(errors="replace")
    raise CompileError(f"NVRTC: {msg}\n{log}")


def cache_dir() -> str:
    return os.environ.get("AFPQ_CUDA_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "afpq_plugins", "cuda")


_MEM: Dict[str, bytes] = {}


def _key(source: str, arch: int, opts: Sequence[str], ptx: bool) -> str:
    h = hashlib.sha256()
    for part in (source, str(arch), "\0".join(opts), "ptx" if ptx else "cubin", repr(nvrtc_version())):
        h.update(part.encode())
        h.update(b"\1")
    return h.hexdigest()


def default_options(arch: int, ptx: bool = False) -> List[str]:
    target = f"--gpu-architecture={'compute' if ptx else 'sm'}_{arch}"
    return [target, "--std=c++17", "--fmad=false", "-default-device"]


def compile_source(source: str, arch: int, *, ptx: bool = False, options: Sequence[str] = (),
                   name: str = "afpq_gemv.cu", use_cache: bool = True) -> bytes:
    """Cubin (or PTX text as bytes) of ``source`` for compute capability ``arch`` (e.g. 90)."""
    lib = nvrtc_library()
    opts = default_options(arch, ptx) + list(options)
    key = _key(source, arch, opts, ptx)
    if use_cache and key in _MEM:
        return _MEM[key]
    path = os.path.join(cache_dir(), key + (".ptx" if ptx else ".cubin"))
    if use_cache and os.path.exists(path):
        with open(path, "rb") as f:
            data = f.read()
        _MEM[key] = data
        return data
    prog = ctypes.c_void_p()
    _check(lib, lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), name.encode(), 0, None, None))
    try:
        copts = (ctypes.c_char_p * len(opts))(*[o.encode() for o in opts])
        _check(lib, lib.nvrtcCompileProgram(prog, len(opts), copts), prog)
        size = ctypes.c_size_t()
        if ptx:
            _check(lib, lib.nvrtcGetPTXSize(prog, ctypes.byref(size)))
            buf = ctypes.create_string_buffer(size.value)
            _check(lib, lib.nvrtcGetPTX(prog, buf))
            data = buf.raw[: size.value].rstrip(b"\0")
        else:
            _check(lib, lib.nvrtcGetCUBINSize(prog, ctypes.byref(size)))
            buf = ctypes.create_string_buffer(size.value)
            _check(lib, lib.nvrtcGetCUBIN(prog, buf))
            data = buf.raw[: size.value]
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))
    _MEM[key] = data
    if use_cache:
        try:
            os.makedirs(cache_dir(), exist_ok=True)
            tmp = f"{path}.{os.getpid()}.tmp"
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except OSError:
            pass  # a read-only home: the in-memory cache still holds
    return data


def compile_for_device(source: str, capability: Tuple[int, int]) -> Tuple[bytes, bool]:
    """(image, is_ptx): a cubin for the device's arch when this NVRTC knows it, else PTX for the
    newest arch it knows (the driver JIT-compiles it for the device)."""
    arch = capability[0] * 10 + capability[1]
    archs = supported_archs()
    if not archs or arch in archs:
        return compile_source(source, arch), False
    older = [a for a in archs if a <= arch]
    if not older:
        raise CompileError(f"this NVRTC cannot target sm_{arch} (it knows {archs})")
    return compile_source(source, max(older), ptx=True), True


def cubin_resources(cubin: bytes) -> Dict[str, Dict[str, int]]:
    """{kernel: {"regs": registers per thread, "frame": local-memory frame bytes}} from the
    cubin's ``.nv.info`` attributes (EIATTR_REGCOUNT 0x2f, EIATTR_FRAME_SIZE 0x11)."""
    out: Dict[str, Dict[str, int]] = {}
    if cubin[:4] != b"\x7fELF" or cubin[4] != 2:
        return out
    shoff, = struct.unpack_from("<Q", cubin, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", cubin, 0x3A)
    secs = [struct.unpack_from("<IIQQQQIIQQ", cubin, shoff + i * shentsize) for i in range(shnum)]

    def cstr(off: int) -> str:
        return cubin[off:cubin.index(b"\0", off)].decode()

    names = [cstr(secs[shstrndx][4] + s[0]) for s in secs]
    if ".symtab" not in names or ".nv.info" not in names:
        return out
    sym, strtab = secs[names.index(".symtab")], secs[names.index(".strtab")]
    syms = [cstr(strtab[4] + struct.unpack_from("<I", cubin, sym[4] + 24 * i)[0]) for i in range(sym[5] // 24)]
    info = secs[names.index(".nv.info")]
    o, end = info[4], info[4] + info[5]
    while o < end:
        fmt, attr = cubin[o], cubin[o + 1]
        if fmt == 4:  # EIFMT_SVAL: u16 size, data
            size, = struct.unpack_from("<H", cubin, o + 2)
            if size == 8 and attr in (0x2F, 0x11):
                si, v = struct.unpack_from("<II", cubin, o + 4)
                out.setdefault(syms[si], {})["regs" if attr == 0x2F else "frame"] = v
            o += 4 + size
        elif fmt == 3:
            o += 4
        elif fmt == 2:
            o += 3
        else:
            o += 2
    return out


# -- driver API ------------------------------------------------------------------------------------

_CUDA: Dict[str, object] = {}


def _libcuda():
    if "lib" not in _CUDA:
        _CUDA["lib"] = ctypes.CDLL("libcuda.so.1")
    return _CUDA["lib"]


def _cu_check(res: int, what: str):
    if res != 0:
        lib = _libcuda()
        s = ctypes.c_char_p()
        lib.cuGetErrorString(res, ctypes.byref(s))
        raise RuntimeError(f"CUDA driver: {what}: {s.value.decode() if s.value else res}")


class Module:
    """A loaded cubin/PTX image on one device; ``function(name)`` gives a CUfunction handle."""

    def __init__(self, image: bytes, device_index: int):
        import torch

        lib = _libcuda()
        with torch.cuda.device(device_index):
            torch.cuda.current_stream()  # the runtime makes the device's primary context current
            ctx = ctypes.c_void_p()
            _cu_check(lib.cuCtxGetCurrent(ctypes.byref(ctx)), "cuCtxGetCurrent")
            if not ctx.value:
                dev = ctypes.c_int()
                _cu_check(lib.cuDeviceGet(ctypes.byref(dev), device_index), "cuDeviceGet")
                _cu_check(lib.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev), "cuDevicePrimaryCtxRetain")
                _cu_check(lib.cuCtxSetCurrent(ctx), "cuCtxSetCurrent")
            self.handle = ctypes.c_void_p()
            _cu_check(lib.cuModuleLoadData(ctypes.byref(self.handle), ctypes.c_char_p(image)), "cuModuleLoadData")
        self.device_index = device_index
        self._funcs: Dict[str, ctypes.c_void_p] = {}

    def function(self, name: str) -> ctypes.c_void_p:
        f = self._funcs.get(name)
        if f is None:
            f = ctypes.c_void_p()
            _cu_check(_libcuda().cuModuleGetFunction(ctypes.byref(f), self.handle, name.encode()),
                      f"cuModuleGetFunction({name})")
            self._funcs[name] = f
        return f


class Launch:
    """Arguments of one kernel signature, packed once: ``set(i, value)`` then ``__call__``.

    ``types`` is a sequence of ``"p"`` (pointer), ``"i"`` (int32)."""

    def __init__(self, types: str):
        self.vals = [ctypes.c_void_p() if t == "p" else ctypes.c_int() for t in types]
        self.array = (ctypes.c_void_p * len(types))(*[ctypes.cast(ctypes.pointer(v), ctypes.c_void_p)
                                                      for v in self.vals])

    def set(self, i: int, value: int) -> None:
        self.vals[i].value = value

    def __call__(self, func, grid: Tuple[int, int, int], block: Tuple[int, int, int], smem: int, stream: int):
        _cu_check(_libcuda().cuLaunchKernel(func, grid[0], grid[1], grid[2], block[0], block[1], block[2],
                                            smem, ctypes.c_void_p(stream), self.array, None), "cuLaunchKernel")
