"""CUDA C++ source of the register-table GEMV, rendered per layer configuration.

The source is compiled by NVRTC (:mod:`.nvrtc`) at first use; everything that varies
between layers but not between calls is a macro (part of the cache key), so the device
code has no per-weight branches:

``AFPQ_BITS``   4 (8 codes in one 32-bit word) or 3 (32 codes in 3 words, the layout of
                :func:`~.planning.pack3`)
``AFPQ_MODE``   0 afpq ``v * (v > 0 ? s_pos : s_neg)``, 1 sym ``v * s``, 2 zp ``(v - z) * s``
``AFPQ_BF16``   activations (and the decoded table) in bfloat16 instead of float16
``AFPQ_S1T`` / ``AFPQ_S2T``  storage of the scales / second parameter: 0 half, 1 bf16, 2 float
``AFPQ_CH``     code blocks per prefetched chunk
``AFPQ_GRID``   the format's grid for the mode (``fmt.lut(mode)``) as exact hex float literals

How a thread works (one output column ``n``, one K-slice ``ks`` of ``KS``; a block is
``32 x KS`` threads for 32 adjacent columns, so a warp reads 128 contiguous bytes per row):
the input dimension is cut into *units* of ``BPU`` code blocks inside one group; slice ``ks``
takes units ``ks, ks + KS, ...``. At the start of a unit the thread builds the unit's decoded
table, ``2**bits`` values computed with core's float32 decode maths and rounded once to the
activation dtype, and keeps it in registers as two byte planes (low bytes, high bytes; 4 + 4
registers for 16 entries). Each 4-bit word then decodes with PTX ``prmt`` byte permutes: per
4 codes two permutes per plane (entries 0-7, 8-15) and one LOP3 select by the code's bit 3,
then two permutes interleave the planes into two half2 (21 integer instructions per 8
codes). The products are summed in half2 FMAs over 8 codes, then added in float32. Chunks
of ``AFPQ_CH`` blocks are loaded one chunk ahead (register prefetch). At the end the
``KS`` float32 partial sums of a column are added in slice order through shared memory,
plus the bias, and rounded once: one launch, deterministic.
"""

from __future__ import annotations

import struct
from typing import Sequence

__all__ = ["TEMPLATE", "render", "KERNEL_NAMES", "GATHER_NAME", "MAX_M", "MAX_THREADS", "max_threads"]

MAX_M = 8
MAX_THREADS = 512


def max_threads(m: int) -> int:
    """Threads per block the M-row kernel is built for (its ``__launch_bounds__``): 512 for
    M = 1, 256 above (ptxas then keeps the accumulators and chains in registers: no spills)."""
    return MAX_THREADS if m <= 1 else MAX_THREADS // 2
KERNEL_NAMES = tuple(f"afpq_gemv_m{m}" for m in range(1, MAX_M + 1))
GATHER_NAME = "afpq_gather_x"

TEMPLATE = r"""
typedef unsigned int u32;
typedef unsigned short u16;
#define DI __device__ __forceinline__

#if AFPQ_BITS == 4
#define CPB 8
#define WPB 1
#define NT 16
#elif AFPQ_BITS == 3
#define CPB 32
#define WPB 3
#define NT 8
#else
#error "AFPQ_BITS must be 3 or 4"
#endif

// ---- exact single operations (inline PTX: no contraction, no header dependency) ----------------
DI u32 prmt(u32 a, u32 b, u32 s) { u32 d; asm("prmt.b32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(s)); return d; }
DI u32 bsel(u32 a, u32 b, u32 m) { return (a & ~m) | (b & m); }  // byte select, one LOP3
DI float fmul(float a, float b) { float d; asm("mul.rn.f32 %0, %1, %2;" : "=f"(d) : "f"(a), "f"(b)); return d; }
DI float fsub(float a, float b) { float d; asm("sub.rn.f32 %0, %1, %2;" : "=f"(d) : "f"(a), "f"(b)); return d; }
DI float fadd(float a, float b) { float d; asm("add.rn.f32 %0, %1, %2;" : "=f"(d) : "f"(a), "f"(b)); return d; }
DI float ffma(float a, float b, float c) { float d; asm("fma.rn.f32 %0, %1, %2, %3;" : "=f"(d) : "f"(a), "f"(b), "f"(c)); return d; }
DI float u2f(u32 u) { return __uint_as_float(u); }

// two floats -> one 16-bit pair (lo in bits 0-15), round to nearest even
DI u32 pack2(float lo, float hi) {
  u32 d;
#if AFPQ_BF16
  asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(d) : "f"(hi), "f"(lo));
#else
  asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(d) : "f"(hi), "f"(lo));
#endif
  return d;
}
DI u32 hfma2(u32 a, u32 b, u32 c) {
  u32 d;
#if AFPQ_BF16
  asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
#else
  asm("fma.rn.f16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
#endif
  return d;
}
DI void unpack2(u32 h, float& lo, float& hi) {
#if AFPQ_BF16
  lo = u2f(h << 16);
  hi = u2f(h & 0xffff0000u);
#else
  asm("{.reg .b16 l, h;\n\tmov.b32 {l, h}, %2;\n\tcvt.f32.f16 %0, l;\n\tcvt.f32.f16 %1, h;}" : "=f"(lo), "=f"(hi) : "r"(h));
#endif
}
DI u16 round16(float v) {
  u16 d;
#if AFPQ_BF16
  asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(d) : "f"(v));
#else
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(d) : "f"(v));
#endif
  return d;
}
// a stored group parameter as float32 (exact)
template <int T> DI float ldparam(const void* p, long i) {
  if (T == 2) return __ldg(reinterpret_cast<const float*>(p) + i);
  u32 h = __ldg(reinterpret_cast<const u16*>(p) + i);
  if (T == 1) return u2f(h << 16);
  float f;
  asm("{.reg .b16 t;\n\tcvt.u16.u32 t, %1;\n\tcvt.f32.f16 %0, t;}" : "=f"(f) : "r"(h));
  return f;
}

// ---- the decoded table of one (column, unit), as byte planes --------------------------------------
struct Table { u32 L[NT / 4]; u32 H[NT / 4]; };

DI void build_table(float a, float b, Table& t) {
  // a, b: (s_pos, s_neg) | (s, unused) | (s, z); the grid is compile-time (AFPQ_GRID)
  const float grid[NT] = { AFPQ_GRID };
  u32 P[NT / 2];
#pragma unroll
  for (int j = 0; j < NT / 2; ++j) {
    float r[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const float g = grid[2 * j + h];
#if AFPQ_MODE == 0
      // core: max(v, 0) * s_pos + min(v, 0) * s_neg, where one term is 0 (+0) for v != 0,
      // and both are v * s for v = +-0 (the sign of a -0 grid value survives)
      r[h] = g == 0.0f ? ffma(g, a, fmul(g, b)) : ffma(g, g > 0.0f ? a : b, 0.0f);
#elif AFPQ_MODE == 1
      r[h] = fmul(g, a);
#else
      r[h] = fmul(fsub(g, b), a);
#endif
    }
    P[j] = pack2(r[0], r[1]);
  }
#pragma unroll
  for (int k = 0; k < NT / 4; ++k) {
    t.L[k] = prmt(P[2 * k], P[2 * k + 1], 0x6420);  // low bytes of entries 4k..4k+3
    t.H[k] = prmt(P[2 * k], P[2 * k + 1], 0x7531);  // high bytes
  }
}

// 4 codes (selector nibbles, bit 3 clear) -> 2 pairs, from one 8-entry half of the table
DI void look4(u32 s, u32 l0, u32 l1, u32 h0, u32 h1, u32& w01, u32& w23) {
  const u32 lo = prmt(l0, l1, s), hi = prmt(h0, h1, s);
  w01 = prmt(lo, hi, 0x5140);
  w23 = prmt(lo, hi, 0x7362);
}

#if AFPQ_BITS == 4
// one word = 8 codes (nibble i = input i) -> 4 pairs (inputs 0-1, 2-3, 4-5, 6-7)
DI void decode_block(const u32* q, const Table& t, u32 w[4 * (CPB / 8)]) {
  const u32 v = q[0];
  const u32 s = v & 0x77777777u, sh = s >> 16, v4 = v << 4;
  const u32 m0 = prmt(v, v4, 0x9D8C);  // 0xff in byte i where code i (0-3) has bit 3
  const u32 m1 = prmt(v, v4, 0xBFAE);  // codes 4-7
  u32 lo = bsel(prmt(t.L[0], t.L[1], s), prmt(t.L[2], t.L[3], s), m0);
  u32 hi = bsel(prmt(t.H[0], t.H[1], s), prmt(t.H[2], t.H[3], s), m0);
  w[0] = prmt(lo, hi, 0x5140);
  w[1] = prmt(lo, hi, 0x7362);
  lo = bsel(prmt(t.L[0], t.L[1], sh), prmt(t.L[2], t.L[3], sh), m1);
  hi = bsel(prmt(t.H[0], t.H[1], sh), prmt(t.H[2], t.H[3], sh), m1);
  w[2] = prmt(lo, hi, 0x5140);
  w[3] = prmt(lo, hi, 0x7362);
}
#else
// three words = 32 codes: word j nibble i low 3 bits = code 8j+i; bit 3 of nibble i in words
// 0, 1, 2 = bits 0, 1, 2 of code 24+i
DI void decode_block(const u32* q, const Table& t, u32 w[16]) {
  const u32 a = q[0], b = q[1], c = q[2];
  u32 s[4];
  s[0] = a & 0x77777777u;
  s[1] = b & 0x77777777u;
  s[2] = c & 0x77777777u;
  s[3] = ((a >> 3) & 0x11111111u) | ((b >> 2) & 0x22222222u) | ((c >> 1) & 0x44444444u);
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    look4(s[j], t.L[0], t.L[1], t.H[0], t.H[1], w[4 * j], w[4 * j + 1]);
    look4(s[j] >> 16, t.L[0], t.L[1], t.H[0], t.H[1], w[4 * j + 2], w[4 * j + 3]);
  }
}
#endif

// ---- the GEMV ------------------------------------------------------------------------------------
// q: codes, row r of [rows, N] int32 (block b = rows b*WPB .. b*WPB+WPB-1); s1, s2: [groups, N];
// x: [M, xs] activations (in kernel input order); bias: float [N] or null; y: [M, ys].
// U units of BPU blocks; UPG units per group.
struct Walk {  // the prefetch position: chunk pci of unit pu (group pg, pu = pg * UPG + pr)
  int pu, pg, pr, pci, blk;
};

template <int M>
DI void process(const u32* cur, const Table& t, const u16* __restrict__ x, int cblk, int xs, float acc[M]) {
  // chains of AFPQ_CHAIN consecutive codes: half2 FMAs (even inputs in the low half, odd in
  // the high), then the two halves added to the float32 sum, low first
  const u16* xc = x + (long)cblk * CPB;
  u32 h[M];
#pragma unroll
  for (int j = 0; j < AFPQ_CH; ++j) {
    u32 w[4 * (CPB / 8)];
    decode_block(cur + j * WPB, t, w);
#pragma unroll
    for (int e = 0; e < CPB / 8; ++e) {
      const int g8 = j * (CPB / 8) + e;  // 8-code group inside the chunk (compile-time)
#pragma unroll
      for (int m = 0; m < M; ++m) {
        const uint4 xv = __ldg(reinterpret_cast<const uint4*>(xc + m * (long)xs) + g8);
        u32 hm = (g8 % (AFPQ_CHAIN / 8) == 0) ? 0u : h[m];
        hm = hfma2(xv.x, w[4 * e], hm);
        hm = hfma2(xv.y, w[4 * e + 1], hm);
        hm = hfma2(xv.z, w[4 * e + 2], hm);
        hm = hfma2(xv.w, w[4 * e + 3], hm);
        h[m] = hm;
        if ((g8 + 1) % (AFPQ_CHAIN / 8) == 0) {
          float lo, hi;
          unpack2(hm, lo, hi);
          acc[m] = fadd(acc[m], lo);
          acc[m] = fadd(acc[m], hi);
        }
      }
    }
  }
}

template <int M>
DI void gemv(const u32* __restrict__ q, const void* __restrict__ s1, const void* __restrict__ s2,
             const u16* __restrict__ x, const float* __restrict__ bias, u16* __restrict__ y,
             int N, int U, int UPG, int BPU, int xs, int ys) {
  extern __shared__ float red[];
  const int lane = threadIdx.x & 31, ks = threadIdx.x >> 5, KS = blockDim.x >> 5;
  const int n = blockIdx.x * 32 + lane;
  const int nl = n < N ? n : N - 1;  // out-of-range columns compute a copy, never stored
  const int CPU = BPU / AFPQ_CH;     // chunks per unit
  const int nunits = ks < U ? (U - 1 - ks) / KS + 1 : 0;
  const int nch = nunits * CPU;
  const u32* __restrict__ qn = q + nl;
  const long rowN = (long)N;

  float acc[M];
#pragma unroll
  for (int m = 0; m < M; ++m) acc[m] = 0.0f;

  const int kq = KS / UPG, kr = KS - kq * UPG;  // unit stride KS = kq groups + kr units
  Walk p;
  p.pu = ks; p.pg = ks / UPG; p.pr = ks - p.pg * UPG; p.pci = 0; p.blk = ks * BPU;
  u32 bufa[AFPQ_CH * WPB], bufb[AFPQ_CH * WPB];
  float pa = 0.0f, pb = 0.0f;
  Table t;
  if (nch > 0) {
#pragma unroll
    for (int j = 0; j < AFPQ_CH * WPB; ++j) bufa[j] = __ldg(qn + ((long)p.blk * WPB + j) * rowN);
    pa = ldparam<AFPQ_S1T>(s1, (long)p.pg * N + nl);
#if AFPQ_MODE != 1
    pb = ldparam<AFPQ_S2T>(s2, (long)p.pg * N + nl);
#endif
  }
  // one chunk: table (first chunk of a unit), prefetch of the next chunk into nxt, FMAs on cur
#define AFPQ_STEP(cur, nxt)                                                                    \
  {                                                                                            \
    const int cblk = p.blk;                                                                    \
    if (p.pci == 0) build_table(pa, pb, t);                                                    \
    if (++p.pci == CPU) {                                                                      \
      p.pci = 0;                                                                               \
      p.pu += KS; p.pg += kq; p.pr += kr;                                                      \
      if (p.pr >= UPG) { p.pr -= UPG; ++p.pg; }                                                \
      p.blk = p.pu * BPU;                                                                      \
    } else {                                                                                   \
      p.blk += AFPQ_CH;                                                                        \
    }                                                                                          \
    if (i + 1 < nch) {                                                                         \
      _Pragma("unroll") for (int j = 0; j < AFPQ_CH * WPB; ++j)                                \
        nxt[j] = __ldg(qn + ((long)p.blk * WPB + j) * rowN);                                   \
      if (p.pci == 0) {                                                                        \
        pa = ldparam<AFPQ_S1T>(s1, (long)p.pg * N + nl);                                       \
        if (AFPQ_MODE != 1) pb = ldparam<AFPQ_S2T>(s2, (long)p.pg * N + nl);                   \
      }                                                                                        \
    }                                                                                          \
    process<M>(cur, t, x, cblk, xs, acc);                                                      \
  }
  for (int i = 0; i < nch;) {
    AFPQ_STEP(bufa, bufb)
    if (++i >= nch) break;
    AFPQ_STEP(bufb, bufa)
    ++i;
  }
#undef AFPQ_STEP
  // K-slices in order, through shared memory: deterministic
#pragma unroll
  for (int m = 0; m < M; ++m) red[(ks * M + m) * 32 + lane] = acc[m];
  __syncthreads();
  for (int idx = threadIdx.x; idx < M * 32; idx += blockDim.x) {
    const int m = idx >> 5, l = idx & 31, col = blockIdx.x * 32 + l;
    float s = 0.0f;
    for (int k = 0; k < KS; ++k) s = fadd(s, red[(k * M + m) * 32 + l]);
    if (col < N) {
      if (bias != nullptr) s = fadd(s, bias[col]);
      y[m * (long)ys + col] = round16(s);
    }
  }
}

#define AFPQ_KERNEL(MM)                                                                                  \
  extern "C" __global__ void __launch_bounds__(MM <= 1 ? AFPQ_MAX_THREADS : AFPQ_MAX_THREADS / 2)         \
  afpq_gemv_m##MM(                                                                                       \
      const u32* q, const void* s1, const void* s2, const u16* x, const float* bias, u16* y, int N,      \
      int U, int UPG, int BPU, int xs, int ys) {                                                         \
    gemv<MM>(q, s1, s2, x, bias, y, N, U, UPG, BPU, xs, ys);                                             \
  }
AFPQ_KERNEL(1)
AFPQ_KERNEL(2)
AFPQ_KERNEL(3)
AFPQ_KERNEL(4)
AFPQ_KERNEL(5)
AFPQ_KERNEL(6)
AFPQ_KERNEL(7)
AFPQ_KERNEL(8)

// act-order / padded groups: x in the kernel's input order (kmap[k] < 0: a padding input, 0)
extern "C" __global__ void afpq_gather_x(const u16* __restrict__ x, const int* __restrict__ kmap,
                                         u16* __restrict__ out, int M, int Kp, int xs) {
  const long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= (long)M * Kp) return;
  const int m = (int)(i / Kp), k = (int)(i - (long)m * Kp);
  const int src = kmap[k];
  out[i] = src >= 0 ? x[m * (long)xs + src] : (u16)0;
}
"""


def hex_float(v: float) -> str:
    """An exact C++17 float literal of a float32 value."""
    f = struct.unpack("<f", struct.pack("<f", float(v)))[0]
    if f != f or f in (float("inf"), float("-inf")):
        raise ValueError(f"grid value {v!r} is not finite")
    return f"{f.hex()}f"


def render(*, bits: int, mode: int, bf16: bool, s1t: int, s2t: int, ch: int, chain: int, grid: Sequence[float]) -> str:
    """The full source for one configuration (macros first, then :data:`TEMPLATE`)."""
    nt = 1 << bits
    if chain not in (8, 16) or (bits == 4 and chain == 16 and ch % 2):
        raise ValueError(f"chain {chain} codes with {bits} bits and chunks of {ch} blocks")
    if len(grid) != nt:
        raise ValueError(f"a {bits}-bit grid needs {nt} values, got {len(grid)}")
    head = [
        f"#define AFPQ_BITS {bits}",
        f"#define AFPQ_MODE {mode}",
        f"#define AFPQ_BF16 {1 if bf16 else 0}",
        f"#define AFPQ_S1T {s1t}",
        f"#define AFPQ_S2T {s2t}",
        f"#define AFPQ_CH {ch}",
        f"#define AFPQ_CHAIN {chain}",
        f"#define AFPQ_MAX_THREADS {MAX_THREADS}",
        "#define AFPQ_GRID " + ", ".join(hex_float(v) for v in grid),
    ]
    return "\n".join(head) + "\n" + TEMPLATE
