"""Fused Triton kernels: AFPQ LUT dequantize + matmul, reading the packed codes directly.

``y = x @ W.T (+ bias)`` in one pass with float32 accumulation, where ``W`` is never
materialised: each program loads packed int32 words, extracts the codes, looks them
up in the format's table (``fmt.lut(mode)``), applies the group parameters and feeds
the result straight into the reduction. Layouts are exactly the ones core writes
(:mod:`afpq_plugins.core.packing`):

``gptq``  ``qweight[in * bits / 32, out]``; along the input dim a little-endian bit
          stream of ``bits``-bit codes in 32-bit words (3 bits: 32 codes per 3 words,
          codes 10 and 21 spill across a word boundary). ``g_idx`` (act-order) honoured.
``awq``   4 bits, ``qweight[in, out / 8]``; nibble ``i`` of word ``j`` holds output
          column ``8 j + (0, 2, 4, 6, 1, 3, 5, 7)[i]``.

Decoding (core's :func:`~afpq_plugins.core.quantize.decode`, same float32 ops):
``afpq``: ``v * (s_pos if v > 0 else s_neg)``; ``sym``: ``v * s``; ``zp``: ``(v - z) * s``.

How a K-tile is walked (both layouts share one skeleton). The input dimension is cut
into *code blocks* of ``CPB`` consecutive codes stored in ``WPB`` consecutive words of
one column (gptq 4-bit: 8 codes / 1 word; 3-bit: 32 / 3; 2-bit: 16 / 1; 8-bit: 4 / 1;
awq: 1 code per row, the word shared by 8 columns). An iteration loads the words of
``BLOCK_R`` code blocks x ``BLOCK_N`` columns once (no redundant word loads along K),
then, for each of the ``CPB`` code positions ``j`` (a static loop), extracts a
``[BLOCK_R, BLOCK_N]`` slice whose row ``r`` is input column ``CPB * r + j``, decodes it
and multiplies it with the matching strided ``[BLOCK_M, BLOCK_R]`` slice of ``x``. The
order of the input columns inside a K-tile is irrelevant to the sum, so no shuffle of
the unpacked codes is ever needed.

Paths (chosen by :func:`~.planning.plan_matmul`, overridable with ``path=``). On CUDA
"auto" takes ``gemv`` for M = 1 and ``dequant`` from M = 2 on (measured on an H200:
benchmarks/RESULTS.md, GPU); without CUDA (the interpreter) ``gemv`` up to M = 16, then
``gemm``.

``gemv``     split-K over a 2-D grid ``(tiles, SPLIT_K)``. One row (``block_m`` < 16):
             CUDA-core FMAs, by default *folded* (the group parameters applied once per
             K-tile to two partial sums, one per sign: about half the instructions per
             weight); 2..16 rows: ``tl.dot`` with ``BLOCK_M = 16``, folded too when a
             K-tile lies in one group. With ``SPLIT_K > 1`` each split stores its float32
             partial tile in a workspace and a second small kernel adds the splits in
             order, adds the bias and casts: deterministic, CUDA-graph capturable.
``gemm``     tiled ``tl.dot`` with grouped program ordering for L2 reuse (split-K too
             when the tiles would not cover the SMs).
``dequant``  a Triton kernel writes ``W.T`` once in the activation dtype, then cuBLAS
             multiplies (``torch.addmm``).

Group parameters per K-tile: ``GROUP_MODE`` 0 = the whole tile lies in one group (one
``[BLOCK_N]`` load of each scale per iteration); 1 = the group depends on the code block
only (a ``[BLOCK_R, BLOCK_N]`` gather per iteration); 2 = per input column, read from
``g_idx`` (act-order; a gather per code position).

Modules: :mod:`.jit` (device code), :mod:`.planning` (the tile planner), :mod:`.launching`
(checks, launches, layer entry points). Which kernel runs a layer is decided in one place,
the registry in :mod:`afpq_plugins.kernels`. Dev-only helpers (ahead-of-time compilation
without a GPU, the interpreter's bfloat16 shim) live in ``benchmarks/triton_dev.py``.

Importing this package raises :class:`ImportError` when Triton is missing or broken (the
registry relies on that). Triton picks "interpreter or compiler" when a function is
decorated, so to run on CPU set ``TRITON_INTERPRET=1`` before ``triton`` itself is first
imported (its library functions such as ``tl.cdiv`` are decorated then) and before this
package is.
"""

from __future__ import annotations

try:  # guarded: the registry treats ImportError as "backend unavailable"
    import triton  # noqa: F401
    import triton.language  # noqa: F401
except Exception as exc:  # ImportError, or a broken install raising something else
    raise ImportError(f"afpq_plugins.kernels.triton needs a working triton: {exc!r}") from exc

from .jit import INTERPRET, MODE_ID, afpq_dequant_kernel, afpq_mm_kernel, splitk_reduce_kernel
from .launching import afpq_matmul, dequantize, dequantize_layer, linear
from .planning import DEQUANT_MIN_M, GEMV_MAX_M, PATHS, MatmulPlan, device_info, geometry, mm_constexprs, plan_matmul

__all__ = [
    "INTERPRET", "MODE_ID", "PATHS", "DEQUANT_MIN_M", "GEMV_MAX_M", "MatmulPlan", "plan_matmul", "mm_constexprs",
    "geometry", "device_info", "afpq_mm_kernel", "splitk_reduce_kernel", "afpq_dequant_kernel", "afpq_matmul",
    "dequantize", "linear",
    "dequantize_layer",
]
