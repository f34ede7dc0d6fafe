"""Dev-only helpers for the Triton kernels (not part of the package).

* :func:`aot_compile`: compile the kernel a plan launches for ``sm_XY`` without a GPU
  (Triton's whole pipeline down to a cubin with its bundled ``ptxas``): a check of the
  compiled path on CPU-only machines, and a way to read register and shared-memory use.
* :func:`patch_interpreter_bf16`: a shim for Triton's CPU interpreter, which multiplies
  bfloat16 ``tl.dot`` operands as their raw bit patterns (seen with Triton 3.9). Used by
  the interpreter tests and the dry run of ``benchmarks/gpu_check.py``; compiled kernels
  are never touched.

Import with the repository root on ``sys.path``; the kernels package must already be
imported the way the caller wants it (interpreted or compiled).
"""

from __future__ import annotations

import contextlib
from typing import Tuple

import torch
import triton
import triton.language as tl

__all__ = ["SHARED_LIMIT", "aot_compile", "aot_compile_reduce", "interpreter_bf16_dot", "patch_interpreter_bf16"]

_TL_NAME = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
#: Shared memory per block that a kernel may use, by compute capability major.
SHARED_LIMIT = {8: 166912, 9: 232448}


def aot_compile(
    plan, *, bits: int, layout: str, mode: str, group_size: int, K: int, has_bias: bool = True,
    dtype: torch.dtype = torch.float16, scale_dtype: torch.dtype = torch.float16,
    capability: Tuple[int, int] = (9, 0), tk=None, aligned_ints: bool = True,
):
    """Compile the kernel ``plan`` launches for ``sm_{capability}`` without a GPU.

    For contiguous operands (unit strides specialised as at run time). ``tk`` is the
    kernels package (default :mod:`afpq_plugins.kernels.triton`), built without
    TRITON_INTERPRET. ``aligned_ints``: sizes and strides are multiples of 16, as for
    LLaMA-class layers (Triton specialises on that at run time). Returns Triton's compiled kernel (``.metadata.shared``, ``.asm``).
    """
    if tk is None:
        from afpq_plugins.kernels import triton as tk
    if tk.INTERPRET:
        raise RuntimeError("aot_compile needs the kernels built without TRITON_INTERPRET")

    cpb, wpb = tk.geometry(bits, layout)
    st = _TL_NAME[scale_dtype]
    gs = K if group_size == -1 else group_size
    if plan.path == "dequant":
        kernel = tk.afpq_dequant_kernel
        ptrs = dict(qw_ptr="i32", s1_ptr=st, s2_ptr=st, gidx_ptr="i32", lut_ptr="fp32", out_ptr=_TL_NAME[dtype])
        const = dict(stride_qn=1, stride_sn=1, stride_on=1, AWQ=layout == "awq", BITS=bits, CPB=cpb, WPB=wpb,
                     MODE=tk.MODE_ID[mode], GROUP_MODE=plan.group_mode, GROUP_SIZE=gs,
                     BLOCK_N=plan.block_n, BLOCK_R=plan.block_r)
    else:
        kernel = tk.afpq_mm_kernel
        ptrs = dict(x_ptr=_TL_NAME[dtype], qw_ptr="i32", s1_ptr=st, s2_ptr=st, gidx_ptr="i32", lut_ptr="fp32",
                    lut2_ptr="i32" if plan.use_dot else "i64",
                    bias_ptr=st, out_ptr=_TL_NAME[dtype], ws_ptr="fp32")
        const = dict(stride_xk=1, stride_qn=1, stride_sn=1, stride_on=1)
        const.update(tk.mm_constexprs(plan, bits=bits, layout=layout, mode=mode, group_size=group_size, K=K,
                                      has_bias=has_bias, dtype=dtype))
    return _compile(kernel, ptrs, const, capability, aligned_ints,
                    {"num_warps": plan.num_warps, "num_stages": plan.num_stages})


def _compile(kernel, ptrs: dict, const: dict, capability: Tuple[int, int], aligned_ints: bool, options: dict):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature, attrs = {}, {}
    for i, name in enumerate(kernel.arg_names):
        if name in const:
            signature[name] = "constexpr"
        elif name in ptrs:
            signature[name] = "*" + ptrs[name]
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            signature[name] = "i32"
            if aligned_ints and name not in ("M", "iters_per_split"):
                attrs[(i,)] = [["tt.divisibility", 16]]  # as Triton specialises multiples of 16 at run time
    target = GPUTarget("cuda", capability[0] * 10 + capability[1], 32)
    return triton.compile(ASTSource(kernel, signature, const, attrs), target=target, options=options)


def aot_compile_reduce(*, dtype: torch.dtype = torch.float16, has_bias: bool = True,
                       capability: Tuple[int, int] = (9, 0), block: int = 512, tk=None):
    """:func:`aot_compile` for the split-K reduction kernel (unit output stride)."""
    if tk is None:
        from afpq_plugins.kernels import triton as tk
    ptrs = dict(ws_ptr="fp32", bias_ptr=_TL_NAME[dtype], out_ptr=_TL_NAME[dtype])
    const = dict(stride_on=1, HAS_BIAS=has_bias, BLOCK=block)
    return _compile(tk.splitk_reduce_kernel, ptrs, const, capability, False, {"num_warps": 4})


@contextlib.contextmanager
def interpreter_bf16_dot():
    """Within the block, the interpreter's ``create_dot`` widens bfloat16 operands to
    float32 first (exact). No effect on compiled kernels."""
    import numpy as np
    from triton.runtime import interpreter as ti

    cls = ti.InterpreterBuilder
    original = cls.create_dot

    def widen(h):
        if h.dtype == tl.bfloat16:
            data = ti._convert_float(h.data, tl.bfloat16, tl.float32, None).view(np.float32)
            return ti.TensorHandle(data, tl.float32)
        return h

    def create_dot(self, a, b, d, *args, **kwargs):
        return original(self, widen(a), widen(b), d, *args, **kwargs)

    cls.create_dot = create_dot
    try:
        yield
    finally:
        cls.create_dot = original


def patch_interpreter_bf16() -> contextlib.ExitStack:
    """Install :func:`interpreter_bf16_dot` until the returned stack is closed."""
    stack = contextlib.ExitStack()
    stack.enter_context(interpreter_bf16_dot())
    return stack
