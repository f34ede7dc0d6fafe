// Native CPU kernel for AFPQ linear layers: y = x @ W.T straight from packed 4-bit codes.
//
// Weight layout (built once per layer by repack.py, "lanes" L = 8 for AVX2 / scalar, 16 for AVX-512):
//   the input dimension is reordered so every group is contiguous (act-order g_idx) and padded to a
//   multiple of L (padding inputs read x = 0), then cut into *steps* of L inputs. A column's codes are
//   chunks of L int32 words; chunk c holds 8 steps: word (c, j) keeps, in nibble i, the code of input
//   k' = (8c + i) * L + j. So step i of a chunk is one vector shift of the chunk's L words, and the
//   inputs of a step are L consecutive floats of the (reordered) activation row. Columns are stored in
//   tiles of 4 (the output padded to a multiple of 4 with zero codes), chunk-interleaved: chunk c of
//   column 4u + q is at word ((u * chunks + c) * 4 + q) * L, so the GEMV, which reads a tile's four
//   columns chunk by chunk, reads one contiguous stream (the hardware prefetcher follows it; four
//   2 KB streams per tile left M = 1 at half its speed when the weights come from memory).
//   gstep[g] .. gstep[g + 1] are the steps of group g; p1 / p2 are [N, G] float32 group parameters
//   (s_pos / s_neg for afpq, s / unused for sym, s / zero for zp).
//
// Decode: per (group, column) the 2**bits decoded values form a table built with the same float32
// operations as core's decode (afpq: v * (v < 0 ? s_neg : s_pos); sym: v * s; zp: (v - z) * s), so a
// weight is one table lookup: a register permute (AVX-512: one vpermps over 16 floats; AVX2: two 8-entry
// permutes and a blend on the code's top bit). Compiled with -ffp-contract=off, so decoded weights are
// bit-identical to core's.
//
// Paths (one parallel region per call for M <= m_small):
//   M <= m_reg: GEMV, codes decoded in registers and multiplied into up to 4 rows at a time;
//   M <= m_small: each thread decodes a tile of columns once into an L2-resident float32 buffer and runs
//     a register-blocked 4 x 4 micro-kernel over every row block of the batch (small batches);
//   larger M: decode column chunks (float32, or bfloat16 where the CPU multiplies bf16 natively and
//     the caller asks for it) and multiply with at::mm (oneDNN; AMX / AVX512_BF16 for bf16).
// ISA chosen at run time.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#define AFPQ_X86 1
#include <immintrin.h>
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif
#else
#define AFPQ_X86 0
#endif

#ifndef AFPQ_PF
#define AFPQ_PF 8  // chunks of look-ahead in the GEMV
#endif
namespace afpq_cpu {

enum Mode : int64_t { AFPQ = 0, SYM = 1, ZP = 2 };
enum Isa : int64_t { SCALAR = 0, AVX2 = 1, AVX512 = 2 };

struct Problem {
  const float* x;         // [M, Kp] activations (reordered, padded), row stride ldx
  int64_t ldx;
  const int32_t* codes;   // [N4, Kp / 8], N4 = N rounded up to 4, column tiles chunk-interleaved
  const float* p1;        // [N, G]
  const float* p2;        // [N, G]
  const float* lut;       // [16] grid value of each code (zero-padded)
  const int32_t* gstep;   // [G + 1]
  int64_t N, G, Kp, lanes, mode;
  float* y;               // [M, N] float32
  int64_t ldy;
  int64_t words() const { return Kp / 8; }
  int64_t steps() const { return Kp / lanes; }
  // Chunk c of column n is col(n) + c * cstride().
  int64_t cstride() const { return 4 * lanes; }
  const int32_t* col(int64_t n) const { return codes + (n >> 2) * 4 * words() + (n & 3) * lanes; }
};

// ---------------------------------------------------------------------------------------------
// Portable path (any lane count; also decodes the AVX-512 layout on machines without AVX-512).

static inline float table_entry(int64_t mode, float v, float a, float b) {
  if (mode == AFPQ) return v * (std::signbit(v) ? b : a);
  if (mode == SYM) return v * a;
  return (v - b) * a;
}

static void build_table_scalar(const Problem& P, int64_t n, int64_t g, float* tab) {
  const float a = P.p1[n * P.G + g], b = P.p2[n * P.G + g];
  for (int e = 0; e < 16; ++e) tab[e] = table_entry(P.mode, P.lut[e], a, b);
}

// Calls f(step, code_of_lane(j), table) for every step of column n.
template <typename F>
static inline void walk_column_scalar(const Problem& P, int64_t n, F&& f) {
  const uint32_t* w = reinterpret_cast<const uint32_t*>(P.col(n));
  const int64_t L = P.lanes, steps = P.steps(), cs = P.cstride();
  float tab[16];
  int64_t g = -1, gend = 0;
  for (int64_t t = 0; t < steps; ++t) {
    if (t >= gend) {
      do { ++g; gend = P.gstep[g + 1]; } while (t >= gend);
      build_table_scalar(P, n, g, tab);
    }
    const uint32_t* cw = w + (t >> 3) * cs;
    const int sh = 4 * int(t & 7);
    f(t, cw, sh, tab);
  }
}

static void decode_col_scalar(const Problem& P, int64_t n, float* out) {
  const int64_t L = P.lanes;
  walk_column_scalar(P, n, [&](int64_t t, const uint32_t* cw, int sh, const float* tab) {
    for (int64_t j = 0; j < L; ++j) out[t * L + j] = tab[(cw[j] >> sh) & 15u];
  });
}

static void gemv_scalar(const Problem& P, int64_t n, int64_t m0, int64_t mr) {
  const int64_t L = P.lanes;
  float acc[4][16] = {};
  walk_column_scalar(P, n, [&](int64_t t, const uint32_t* cw, int sh, const float* tab) {
    for (int64_t j = 0; j < L; ++j) {
      const float w = tab[(cw[j] >> sh) & 15u];
      for (int64_t r = 0; r < mr; ++r) acc[r][j] += P.x[(m0 + r) * P.ldx + t * L + j] * w;
    }
  });
  for (int64_t r = 0; r < mr; ++r) {
    float s = 0.f;
    for (int64_t j = 0; j < L; ++j) s += acc[r][j];
    P.y[(m0 + r) * P.ldy + n] = s;
  }
}

#if AFPQ_X86
// ---------------------------------------------------------------------------------------------
// AVX2 + FMA: 8 lanes; a 16-entry table is two registers (entries 0-7, 8-15).

#define AFPQ_AVX2 __attribute__((target("avx2,fma")))

struct Tab8 { __m256 lo, hi; };

AFPQ_AVX2 static inline Tab8 build_table_avx2(const Problem& P, int64_t n, int64_t g) {
  const __m256 a = _mm256_set1_ps(P.p1[n * P.G + g]);
  const __m256 b = _mm256_set1_ps(P.p2[n * P.G + g]);
  const __m256 llo = _mm256_loadu_ps(P.lut), lhi = _mm256_loadu_ps(P.lut + 8);
  Tab8 t;
  if (P.mode == AFPQ) {  // v * (v < 0 ? s_neg : s_pos); blendv reads the sign bit of v
    t.lo = _mm256_mul_ps(llo, _mm256_blendv_ps(a, b, llo));
    t.hi = _mm256_mul_ps(lhi, _mm256_blendv_ps(a, b, lhi));
  } else if (P.mode == SYM) {
    t.lo = _mm256_mul_ps(llo, a);
    t.hi = _mm256_mul_ps(lhi, a);
  } else {
    t.lo = _mm256_mul_ps(_mm256_sub_ps(llo, b), a);
    t.hi = _mm256_mul_ps(_mm256_sub_ps(lhi, b), a);
  }
  return t;
}

template <bool T16>
AFPQ_AVX2 static inline __m256 lookup_avx2(const Tab8& t, __m256i w, int i) {
  const __m256i idx = _mm256_srli_epi32(w, 4 * i);  // vpermps reads the low 3 bits
  const __m256 lo = _mm256_permutevar8x32_ps(t.lo, idx);
  if (!T16) return lo;
  const __m256 hi = _mm256_permutevar8x32_ps(t.hi, idx);
  const __m256 sel = _mm256_castsi256_ps(_mm256_slli_epi32(w, 28 - 4 * i));  // code bit 3 -> sign
  return _mm256_blendv_ps(lo, hi, sel);
}

AFPQ_AVX2 static inline float hsum_avx2(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

template <bool T16>
AFPQ_AVX2 static void decode_col_avx2(const Problem& P, int64_t n, float* out) {
  const int32_t* w = P.col(n);
  const int64_t chunks = P.words() / 8, cs = P.cstride();
  Tab8 tab{};
  int64_t g = -1, gend = 0;
  for (int64_t c = 0; c < chunks; ++c) {
    const __m256i wc = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + c * cs));
#pragma GCC unroll 8
    for (int i = 0; i < 8; ++i) {
      const int64_t t = c * 8 + i;
      if (t >= gend) {
        do { ++g; gend = P.gstep[g + 1]; } while (t >= gend);
        tab = build_table_avx2(P, n, g);
      }
      _mm256_storeu_ps(out + t * 8, lookup_avx2<T16>(tab, wc, i));
    }
  }
}

// MR rows x NC columns: codes decoded once per step, multiplied into every row.
template <bool T16, int MR, int NC>
AFPQ_AVX2 static void gemv_avx2(const Problem& P, int64_t n0, int64_t m0) {
  const int64_t chunks = P.words() / 8, cs = P.cstride();
  __m256 acc[MR][NC];
  for (int r = 0; r < MR; ++r)
    for (int q = 0; q < NC; ++q) acc[r][q] = _mm256_setzero_ps();
  Tab8 tab[NC];
  for (int q = 0; q < NC; ++q) tab[q] = Tab8{_mm256_setzero_ps(), _mm256_setzero_ps()};
  int64_t g = -1, gend = 0;
  const float* x0 = P.x + m0 * P.ldx;
  for (int64_t c = 0; c < chunks; ++c) {
    __m256i wc[NC];
    for (int q = 0; q < NC; ++q)
      wc[q] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(P.col(n0 + q) + c * cs));
#pragma GCC unroll 8
    for (int i = 0; i < 8; ++i) {
      const int64_t t = c * 8 + i;
      if (t >= gend) {
        do { ++g; gend = P.gstep[g + 1]; } while (t >= gend);
        for (int q = 0; q < NC; ++q) tab[q] = build_table_avx2(P, n0 + q, g);
      }
      __m256 xv[MR];
      for (int r = 0; r < MR; ++r) xv[r] = _mm256_loadu_ps(x0 + r * P.ldx + t * 8);
      for (int q = 0; q < NC; ++q) {
        const __m256 v = lookup_avx2<T16>(tab[q], wc[q], i);
        for (int r = 0; r < MR; ++r) acc[r][q] = _mm256_fmadd_ps(xv[r], v, acc[r][q]);
      }
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int q = 0; q < NC; ++q) P.y[(m0 + r) * P.ldy + n0 + q] = hsum_avx2(acc[r][q]);
}

// ---------------------------------------------------------------------------------------------
// AVX-512F: 16 lanes; the whole 16-entry table is one register, a lookup is one vpermps.
// (Compiled everywhere, run only where the CPU reports AVX-512F.)

#define AFPQ_AVX512 __attribute__((target("avx512f")))

// Touch the group-parameter rows of columns [n, n + nc) (p1 and p2: G floats each).
static inline void prefetch_params(const Problem& P, int64_t n, int64_t nc) {
  if (n >= P.N) return;
  nc = std::min(nc, P.N - n);
  const char* a = reinterpret_cast<const char*>(P.p1 + n * P.G);
  const char* b = reinterpret_cast<const char*>(P.p2 + n * P.G);
  const int64_t bytes = nc * P.G * 4;
  for (int64_t o = 0; o < bytes; o += 64) {
    _mm_prefetch(a + o, _MM_HINT_T0);
    if (b != a) _mm_prefetch(b + o, _MM_HINT_T0);
  }
}

AFPQ_AVX512 static inline __m512 build_table_avx512(const Problem& P, int64_t n, int64_t g) {
  const __m512 a = _mm512_set1_ps(P.p1[n * P.G + g]);
  const __m512 b = _mm512_set1_ps(P.p2[n * P.G + g]);
  const __m512 l = _mm512_loadu_ps(P.lut);
  if (P.mode == AFPQ) {
    const __mmask16 neg = _mm512_cmplt_epi32_mask(_mm512_castps_si512(l), _mm512_setzero_si512());
    return _mm512_mul_ps(l, _mm512_mask_blend_ps(neg, a, b));
  }
  if (P.mode == SYM) return _mm512_mul_ps(l, a);
  return _mm512_mul_ps(_mm512_sub_ps(l, b), a);
}

AFPQ_AVX512 static inline __m512 lookup_avx512(__m512 tab, __m512i w, int i) {
  return _mm512_permutexvar_ps(_mm512_srli_epi32(w, 4 * i), tab);  // reads the low 4 bits
}

// Column n decoded in the kernel's input order: float32 (Out = float), or bfloat16 bits (Out = uint16_t,
// VCVTNEPS2BF16: round to nearest even as c10::BFloat16 rounds, except that float32 subnormals,
// |w| < 2**-126, which no float16 scale can produce, become 0; run only where the CPU has AVX512_BF16).
#define AFPQ_BF16 __attribute__((target("avx512f,avx512bf16")))
template <typename Out>
AFPQ_BF16 static void decode_col_avx512(const Problem& P, int64_t n, Out* out) {
  const int32_t* w = P.col(n);
  const int64_t chunks = P.words() / 16, cs = P.cstride();
  __m512 tab = _mm512_setzero_ps();
  int64_t g = -1, gend = 0;
  for (int64_t c = 0; c < chunks; ++c) {
    const __m512i wc = _mm512_loadu_si512(w + c * cs);
#pragma GCC unroll 8
    for (int i = 0; i < 8; ++i) {
      const int64_t t = c * 8 + i;
      if (t >= gend) {
        do { ++g; gend = P.gstep[g + 1]; } while (t >= gend);
        tab = build_table_avx512(P, n, g);
      }
      const __m512 v = lookup_avx512(tab, wc, i);
      if constexpr (sizeof(Out) == 4) {
        _mm512_storeu_ps(out + t * 16, v);
      } else {
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + t * 16), (__m256i)_mm512_cvtneps_pbh(v));
      }
    }
  }
}

template <int MR, int NC>
AFPQ_AVX512 static void gemv_avx512(const Problem& P, int64_t n0, int64_t m0) {
  const int64_t chunks = P.words() / 16, cs = P.cstride();
  prefetch_params(P, n0 + 4, NC);  // the next tile's group parameters: short rows the prefetcher misses
  __m512 acc[MR][NC];
  for (int r = 0; r < MR; ++r)
    for (int q = 0; q < NC; ++q) acc[r][q] = _mm512_setzero_ps();
  __m512 tab[NC];
  for (int q = 0; q < NC; ++q) tab[q] = _mm512_setzero_ps();
  int64_t g = -1, gend = 0;
  const float* x0 = P.x + m0 * P.ldx;
  for (int64_t c = 0; c < chunks; ++c) {
    __m512i wc[NC];
    for (int q = 0; q < NC; ++q) wc[q] = _mm512_loadu_si512(P.col(n0 + q) + c * cs);
    {  // the tile's chunk AFPQ_PF ahead (256 bytes, all four columns): look-ahead for weights from memory
      const char* ahead = reinterpret_cast<const char*>(P.col(n0 & ~int64_t(3)) + (c + AFPQ_PF) * cs);
      for (int l = 0; l < 4; ++l) _mm_prefetch(ahead + 64 * l, _MM_HINT_T0);
    }
#pragma GCC unroll 8
    for (int i = 0; i < 8; ++i) {
      const int64_t t = c * 8 + i;
      if (t >= gend) {
        do { ++g; gend = P.gstep[g + 1]; } while (t >= gend);
        for (int q = 0; q < NC; ++q) tab[q] = build_table_avx512(P, n0 + q, g);
      }
      __m512 xv[MR];
      for (int r = 0; r < MR; ++r) xv[r] = _mm512_loadu_ps(x0 + r * P.ldx + t * 16);
      for (int q = 0; q < NC; ++q) {
        const __m512 v = lookup_avx512(tab[q], wc[q], i);
        for (int r = 0; r < MR; ++r) acc[r][q] = _mm512_fmadd_ps(xv[r], v, acc[r][q]);
      }
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int q = 0; q < NC; ++q) P.y[(m0 + r) * P.ldy + n0 + q] = _mm512_reduce_add_ps(acc[r][q]);
}
// ---------------------------------------------------------------------------------------------
// Small batches (AVX-512): a tile of NB columns decoded once into a buffer, then MR x 4 blocks.

constexpr int NB = 16;  // columns per small-batch tile (4 quads of 4)

template <int MR>
AFPQ_AVX512 static void block_avx512(const float* x, int64_t ldx, const float* w, int64_t Kp, int nq, float* y,
                                     int64_t ldy) {
  __m512 acc[MR][4];
  for (int r = 0; r < MR; ++r)
    for (int q = 0; q < 4; ++q) acc[r][q] = _mm512_setzero_ps();
  for (int64_t k = 0; k < Kp; k += 16) {
    __m512 wv[4];
    for (int q = 0; q < 4; ++q) wv[q] = _mm512_loadu_ps(w + q * Kp + k);
    for (int r = 0; r < MR; ++r) {
      const __m512 xv = _mm512_loadu_ps(x + r * ldx + k);
      for (int q = 0; q < 4; ++q) acc[r][q] = _mm512_fmadd_ps(xv, wv[q], acc[r][q]);
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int q = 0; q < nq; ++q) y[r * ldy + q] = _mm512_reduce_add_ps(acc[r][q]);
}

AFPQ_AVX512 static void rows_avx512(const float* x, int64_t ldx, int64_t M, const float* w, int64_t Kp, int nq,
                                    float* y, int64_t ldy) {
  int64_t m = 0;
  for (; m + 4 <= M; m += 4) block_avx512<4>(x + m * ldx, ldx, w, Kp, nq, y + m * ldy, ldy);
  switch (M - m) {
    case 1: block_avx512<1>(x + m * ldx, ldx, w, Kp, nq, y + m * ldy, ldy); break;
    case 2: block_avx512<2>(x + m * ldx, ldx, w, Kp, nq, y + m * ldy, ldy); break;
    case 3: block_avx512<3>(x + m * ldx, ldx, w, Kp, nq, y + m * ldy, ldy); break;
    default: break;
  }
}

// ---------------------------------------------------------------------------------------------
// AMX (bf16 tiles) for small batches of bfloat16 activations: C^T = W' . X^T per 16-column tile.
// A = 16 decoded columns x 32 inputs (bf16, straight from the tile buffer: a column's inputs are
// contiguous), B = X^T in AMX's pair-interleaved layout (built once per call, 16 rows per block, rows
// past M are zero), C = 16 columns x 16 rows float32, accumulated over the whole input dimension.

#define AFPQ_AMX __attribute__((target("avx512f,avx512bw,amx-tile,amx-bf16")))

struct alignas(64) TileConfig {
  uint8_t palette_id = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

static bool amx_usable_impl() {
#if defined(__linux__) && defined(SYS_arch_prctl)
  __builtin_cpu_init();
  if (!__builtin_cpu_supports("amx-bf16") || !__builtin_cpu_supports("amx-tile")) return false;
  if (!__builtin_cpu_supports("avx512bf16")) return false;  // the tiles are filled by the bf16 decode
  // Linux hands out the AMX register state only on request (ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA).
  return syscall(SYS_arch_prctl, 0x1023, 18) == 0;
#else
  return false;
#endif
}

bool amx_usable() {
  static const bool yes = amx_usable_impl();
  return yes;
}

// X^T tiles: xt[((mb * nkb + kb) * 16 + p) * 32 + 2 * m + e] = x[16 mb + m][32 kb + 2 p + e] (bf16 bits).
static void build_xt(const uint16_t* x, int64_t M, int64_t Kp, uint16_t* xt) {
  const int64_t nkb = Kp / 32, nmb = (M + 15) / 16;
  std::memset(xt, 0, sizeof(uint16_t) * nmb * nkb * 512);
  const uint32_t* xd = reinterpret_cast<const uint32_t*>(x);
  uint32_t* td = reinterpret_cast<uint32_t*>(xt);
  for (int64_t m = 0; m < M; ++m) {
    const int64_t mb = m / 16, mi = m % 16;
    const uint32_t* row = xd + m * (Kp / 2);
    for (int64_t kb = 0; kb < nkb; ++kb) {
      uint32_t* tile = td + (mb * nkb + kb) * 256;
      for (int64_t p = 0; p < 16; ++p) tile[p * 16 + mi] = row[kb * 16 + p];
    }
  }
}

template <int NMB>
AFPQ_AMX static void amx_tile(const uint16_t* a, int64_t Kp, int64_t lda, const uint16_t* xt, float* c) {
  const int64_t nkb = Kp / 32;
  _tile_zero(0);
  if (NMB > 1) _tile_zero(1);
  if (NMB > 2) _tile_zero(2);
  if (NMB > 3) _tile_zero(3);
  for (int64_t kb = 0; kb < nkb; ++kb) {
    _tile_loadd(4, a + kb * 32, lda * 2);
    _tile_loadd(5, xt + (0 * nkb + kb) * 512, 64);
    _tile_dpbf16ps(0, 4, 5);
    if (NMB > 1) { _tile_loadd(6, xt + (1 * nkb + kb) * 512, 64); _tile_dpbf16ps(1, 4, 6); }
    if (NMB > 2) { _tile_loadd(7, xt + (2 * nkb + kb) * 512, 64); _tile_dpbf16ps(2, 4, 7); }
    if (NMB > 3) { _tile_loadd(5, xt + (3 * nkb + kb) * 512, 64); _tile_dpbf16ps(3, 4, 5); }
  }
  _tile_stored(0, c, 64);
  if (NMB > 1) _tile_stored(1, c + 256, 64);
  if (NMB > 2) _tile_stored(2, c + 512, 64);
  if (NMB > 3) _tile_stored(3, c + 768, 64);
}

AFPQ_AMX static void amx_config() {
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) { cfg.rows[t] = 16; cfg.colsb[t] = 64; }
  // GCC does not see that ldtilecfg reads the whole struct and drops the stores above without this.
  __asm__ volatile("" : : "r"(&cfg) : "memory");
  _tile_loadconfig(&cfg);
}

AFPQ_AMX static void amx_release() { _tile_release(); }
#else
bool amx_usable() { return false; }
#endif  // AFPQ_X86

// ---------------------------------------------------------------------------------------------
// Dispatch.

static int64_t isa_supported_impl() {
#if AFPQ_X86 && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f")) return AVX512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return AVX2;
#endif
  return SCALAR;
}

int64_t isa_supported() {
  static const int64_t isa = isa_supported_impl();
  return isa;
}

// Whether the CPU multiplies bfloat16 natively (AVX512_BF16; every AMX CPU has it too): oneDNN's bf16
// matmul is then several times faster than float32 (without it bf16 is emulated and slower), and the
// bf16 decode uses its VCVTNEPS2BF16.
static bool native_bf16_impl() {
#if AFPQ_X86 && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512bf16");
#else
  return false;
#endif
}

bool native_bf16() {
  static const bool yes = native_bf16_impl();
  return yes;
}

static void check_isa(int64_t isa, int64_t lanes) {
  TORCH_CHECK(isa >= SCALAR && isa <= isa_supported(), "afpq_cpu: ISA ", isa,
              " is not supported by this CPU (best: ", isa_supported(), ")");
  TORCH_CHECK(isa == SCALAR || lanes == (isa == AVX512 ? 16 : 8), "afpq_cpu: the weights were repacked for ",
              lanes, " lanes, which ISA ", isa, " cannot read");
  TORCH_CHECK(lanes == 8 || lanes == 16, "afpq_cpu: lanes must be 8 or 16, got ", lanes);
}

static void decode_col(const Problem& P, int64_t isa, bool t16, int64_t n, float* out) {
#if AFPQ_X86
  if (isa == AVX512) return decode_col_avx512<float>(P, n, out);
  if (isa == AVX2) return t16 ? decode_col_avx2<true>(P, n, out) : decode_col_avx2<false>(P, n, out);
#endif
  decode_col_scalar(P, n, out);
}

// Column n decoded to bfloat16 (round to nearest even, as c10::BFloat16); scratch: Kp floats.
static void decode_col_bf16(const Problem& P, int64_t isa, bool t16, int64_t n, uint16_t* out, float* scratch) {
#if AFPQ_X86
  if (isa == AVX512 && native_bf16()) return decode_col_avx512<uint16_t>(P, n, out);
#endif
  decode_col(P, isa, t16, n, scratch);
  for (int64_t k = 0; k < P.Kp; ++k) out[k] = c10::BFloat16(scratch[k]).x;
}

constexpr int NCOLS = 4;  // columns per GEMV tile
constexpr int MROWS = 4;  // rows per GEMV pass

#if AFPQ_X86
template <bool T16, int NC>
static void gemv_rows_avx2(const Problem& P, int64_t n0, int64_t m0, int64_t mr) {
  switch (mr) {
    case 1: return gemv_avx2<T16, 1, NC>(P, n0, m0);
    case 2: return gemv_avx2<T16, 2, NC>(P, n0, m0);
    case 3: return gemv_avx2<T16, 3, NC>(P, n0, m0);
    default: return gemv_avx2<T16, 4, NC>(P, n0, m0);
  }
}
template <int NC>
static void gemv_rows_avx512(const Problem& P, int64_t n0, int64_t m0, int64_t mr) {
  switch (mr) {
    case 1: return gemv_avx512<1, NC>(P, n0, m0);
    case 2: return gemv_avx512<2, NC>(P, n0, m0);
    case 3: return gemv_avx512<3, NC>(P, n0, m0);
    default: return gemv_avx512<4, NC>(P, n0, m0);
  }
}
#endif

// Columns [n0, n0 + nc) (nc <= NCOLS), rows [m0, m0 + mr) (mr <= MROWS).
static void gemv_tile(const Problem& P, int64_t isa, bool t16, int64_t n0, int64_t nc, int64_t m0, int64_t mr) {
#if AFPQ_X86
  if (isa == AVX2 || isa == AVX512) {
    if (nc == NCOLS && isa == AVX512) {
      if (mr <= 2) return gemv_rows_avx512<NCOLS>(P, n0, m0, mr);
      // 3-4 rows: two 2-column passes, so accumulators, tables and codes stay in the 32 zmm registers
      gemv_rows_avx512<2>(P, n0, m0, mr);
      return gemv_rows_avx512<2>(P, n0 + 2, m0, mr);
    }
    if (nc == NCOLS) {  // two 2-column passes keep tables and accumulators in the 16 ymm registers
      for (int64_t q = 0; q < NCOLS; q += 2) {
        if (t16) gemv_rows_avx2<true, 2>(P, n0 + q, m0, mr);
        else gemv_rows_avx2<false, 2>(P, n0 + q, m0, mr);
      }
      return;
    }
    for (int64_t q = 0; q < nc; ++q) {
      if (isa == AVX512) gemv_rows_avx512<1>(P, n0 + q, m0, mr);
      else if (t16) gemv_rows_avx2<true, 1>(P, n0 + q, m0, mr);
      else gemv_rows_avx2<false, 1>(P, n0 + q, m0, mr);
    }
    return;
  }
#endif
  for (int64_t q = 0; q < nc; ++q) gemv_scalar(P, n0 + q, m0, mr);
}

static Problem make_problem(const at::Tensor& codes, const at::Tensor& p1, const at::Tensor& p2,
                            const at::Tensor& lut, const at::Tensor& gstep, int64_t mode, int64_t lanes) {
  TORCH_CHECK(codes.dim() == 2 && codes.scalar_type() == at::kInt && codes.is_contiguous(),
              "afpq_cpu: codes must be a contiguous int32 [N4, Kp/8] tensor");
  TORCH_CHECK(p1.scalar_type() == at::kFloat && p1.is_contiguous() && p1.dim() == 2 &&
              (p1.size(0) + 3) / 4 * 4 == codes.size(0),
              "afpq_cpu: p1 must be a contiguous float32 [N, G] tensor, codes [N rounded up to 4, Kp/8]");
  TORCH_CHECK(p2.sizes() == p1.sizes() && p2.scalar_type() == at::kFloat && p2.is_contiguous(),
              "afpq_cpu: p2 must match p1");
  TORCH_CHECK(lut.scalar_type() == at::kFloat && lut.is_contiguous() && lut.numel() == 16, "afpq_cpu: lut must be 16 float32 values");
  TORCH_CHECK(gstep.scalar_type() == at::kInt && gstep.is_contiguous() && gstep.numel() == p1.size(1) + 1,
              "afpq_cpu: gstep must be int32 [G + 1]");
  TORCH_CHECK(mode >= AFPQ && mode <= ZP, "afpq_cpu: unknown mode ", mode);
  Problem P{};
  P.codes = codes.data_ptr<int32_t>();
  P.p1 = p1.data_ptr<float>();
  P.p2 = p2.data_ptr<float>();
  P.lut = lut.data_ptr<float>();
  P.gstep = gstep.data_ptr<int32_t>();
  P.N = p1.size(0);
  P.G = p1.size(1);
  P.Kp = codes.size(1) * 8;
  P.lanes = lanes;
  P.mode = mode;
  TORCH_CHECK(P.Kp % (8 * lanes) == 0, "afpq_cpu: Kp ", P.Kp, " is not a whole number of chunks");
  TORCH_CHECK(P.gstep[P.G] == P.steps(), "afpq_cpu: gstep must end at ", P.steps());
  return P;
}

// W' [N, Kp]: the decoded weight in the kernel's input order (tests; the large-M path decodes tiles).
at::Tensor decode(const at::Tensor& codes, const at::Tensor& p1, const at::Tensor& p2, const at::Tensor& lut,
                  const at::Tensor& gstep, int64_t mode, int64_t nent, int64_t lanes, int64_t isa) {
  check_isa(isa, lanes);
  Problem P = make_problem(codes, p1, p2, lut, gstep, mode, lanes);
  at::Tensor out = at::empty({P.N, P.Kp}, codes.options().dtype(at::kFloat));
  float* o = out.data_ptr<float>();
  const bool t16 = nent > 8;
  at::parallel_for(0, P.N, 16, [&](int64_t b, int64_t e) {
    for (int64_t n = b; n < e; ++n) decode_col(P, isa, t16, n, o + n * P.Kp);
  });
  return out;
}

// Activations in the kernel's input order, float32 [M, Kp]; kmap[k'] = source column or -1 (zero).
static at::Tensor gather_x(const at::Tensor& x, const at::Tensor& kmap, int64_t Kp) {
  const int64_t M = x.size(0), K = x.size(1);
  if (kmap.numel() == 0 && K == Kp && x.scalar_type() == at::kFloat) return x;
  at::Tensor xp = at::empty({M, Kp}, x.options().dtype(at::kFloat));
  float* o = xp.data_ptr<float>();
  const int32_t* km = kmap.numel() ? kmap.data_ptr<int32_t>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "afpq_cpu_gather", [&] {
    const scalar_t* src = x.data_ptr<scalar_t>();
    for (int64_t m = 0; m < M; ++m) {  // small M only: no parallel region of its own
      const scalar_t* s = src + m * K;
      float* d = o + m * Kp;
      if (km) {
        for (int64_t k = 0; k < Kp; ++k) d[k] = km[k] >= 0 ? static_cast<float>(s[km[k]]) : 0.f;
      } else {
        for (int64_t k = 0; k < K; ++k) d[k] = static_cast<float>(s[k]);
        for (int64_t k = K; k < Kp; ++k) d[k] = 0.f;
      }
    }
  });
  return xp;
}

// Activations for the large-M path in dtype dt, [M, K'] where the decoded weight's first K' inputs
// line up with them: identity order -> x itself (K' = K, the weight read through a narrowed view),
// act-order -> gathered into the kernel's order (K' = Kp, padding reads 0).
static at::Tensor large_x(const at::Tensor& x, const at::Tensor& kmap, at::ScalarType dt) {
  at::Tensor xd = x.scalar_type() == dt ? x : x.to(dt);
  if (kmap.numel() == 0) return xd;
  const at::Tensor idx = kmap.clamp_min(0).to(at::kLong);
  at::Tensor xp = xd.index_select(1, idx);
  xp.masked_fill_((kmap < 0).unsqueeze(0), 0);
  return xp;
}

// One parallel region whose tasks are handed out one at a time (an atomic counter) instead of split
// evenly up front: a thread that the OS deschedules (another process on the core) delays the call by
// the task it holds, not by its whole share, and the others take the rest. worker(take) runs once per
// thread; take() returns the next task index, or -1 when none is left.
template <typename Worker>
static void dynamic_for(int64_t tasks, Worker&& worker) {
  if (tasks <= 0) return;
  std::atomic<int64_t> next{0};
  auto take = [&]() -> int64_t {
    const int64_t t = next.fetch_add(1, std::memory_order_relaxed);
    return t < tasks ? t : -1;
  };
  const int64_t workers = std::min<int64_t>(tasks, at::get_num_threads());
  if (workers <= 1 || at::in_parallel_region()) return worker(take);
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) { worker(take); });
}

static void small_batch(const Problem& P, int64_t isa, bool t16, int64_t M, int64_t m_reg) {
  const int64_t Kp = P.Kp;
#if AFPQ_X86
  if (isa == AVX512 && M > m_reg) {
    const int64_t tiles = (P.N + NB - 1) / NB;
    dynamic_for(tiles, [&](auto take) {
      std::vector<float> buf(NB * Kp, 0.f);  // one tile of decoded columns, L2-resident
      for (int64_t tile = take(); tile >= 0; tile = take()) {
        const int64_t n0 = tile * NB, nc = std::min<int64_t>(NB, P.N - n0);
        for (int64_t q = 0; q < nc; ++q) decode_col(P, isa, t16, n0 + q, buf.data() + q * Kp);
        for (int64_t q0 = 0; q0 < nc; q0 += 4) {
          const int nq = int(std::min<int64_t>(4, nc - q0));
          rows_avx512(P.x, P.ldx, M, buf.data() + q0 * Kp, Kp, nq, P.y + n0 + q0, P.ldy);
        }
      }
    });
    return;
  }
#endif
  const int64_t tiles = (P.N + NCOLS - 1) / NCOLS;
  // About 64k weights x rows per task: small layers stay on one thread.
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 16) / (NCOLS * Kp * std::min<int64_t>(M, 4)));
  dynamic_for((tiles + grain - 1) / grain, [&](auto take) {
    for (int64_t task = take(); task >= 0; task = take()) {
      for (int64_t tile = task * grain; tile < std::min(tiles, (task + 1) * grain); ++tile) {
        const int64_t n0 = tile * NCOLS, nc = std::min<int64_t>(NCOLS, P.N - n0);
        for (int64_t m0 = 0; m0 < M; m0 += MROWS) gemv_tile(P, isa, t16, n0, nc, m0, std::min<int64_t>(MROWS, M - m0));
      }
    }
  });
}

// Small batches of bfloat16 activations on AMX (M <= 64): one parallel region over 16-column tiles.
static void amx_batch(const Problem& P, int64_t isa, bool t16, const at::Tensor& x, const at::Tensor& kmap, float* y) {
#if AFPQ_X86
  const int64_t M = x.size(0), Kp = P.Kp, nmb = (M + 15) / 16;
  // x in the kernel's input order, bf16, [M, Kp] (padding inputs 0), then its AMX layout.
  at::Tensor xb = at::zeros({M, Kp}, x.options().dtype(at::kBFloat16));
  if (kmap.numel()) xb.copy_(large_x(x, kmap, at::kBFloat16));
  else xb.narrow(1, 0, x.size(1)).copy_(x);
  std::vector<uint16_t> xt(nmb * (Kp / 32) * 512);
  build_xt(reinterpret_cast<const uint16_t*>(xb.data_ptr<at::BFloat16>()), M, Kp, xt.data());
  const int64_t tiles = (P.N + 15) / 16;
  dynamic_for(tiles, [&](auto take) {
    // Row stride Kp + 32 inputs: a multiple of 4 KB would put the 16 rows of an A tile in one L1 set.
    const int64_t lda = Kp + 32;
    std::vector<uint16_t> a(16 * lda, 0);
    alignas(64) float c[4 * 256];
    amx_config();
    for (int64_t tile = take(); tile >= 0; tile = take()) {
      const int64_t n0 = tile * 16, nc = std::min<int64_t>(16, P.N - n0);
      for (int64_t q = 0; q < nc; ++q) decode_col_bf16(P, isa, t16, n0 + q, a.data() + q * lda, nullptr);
      switch (nmb) {
        case 1: amx_tile<1>(a.data(), Kp, lda, xt.data(), c); break;
        case 2: amx_tile<2>(a.data(), Kp, lda, xt.data(), c); break;
        case 3: amx_tile<3>(a.data(), Kp, lda, xt.data(), c); break;
        default: amx_tile<4>(a.data(), Kp, lda, xt.data(), c); break;
      }
      for (int64_t m = 0; m < M; ++m) {
        const float* cm = c + (m / 16) * 256 + (m % 16);
        for (int64_t q = 0; q < nc; ++q) y[m * P.N + n0 + q] = cm[q * 16];
      }
    }
    amx_release();
  });
#else
  TORCH_CHECK(false, "afpq_cpu: AMX path on a non-x86 build");
#endif
}

// Large M, float32 or bfloat16: decode column chunks of at most about 64 MB in parallel and multiply each
// with a multi-threaded at::mm.
static at::Tensor chunks_mm(const Problem& P, int64_t isa, bool t16, const at::Tensor& x, const at::Tensor& kmap,
                            bool bf16) {
  const int64_t M = x.size(0), K = x.size(1), Kp = P.Kp;
  const at::ScalarType dt = bf16 ? at::kBFloat16 : at::kFloat;
  const at::Tensor xl = large_x(x, kmap, dt);
  const int64_t kuse = kmap.numel() ? Kp : K;
  const int64_t esize = bf16 ? 2 : 4;
  const int64_t nt = std::min<int64_t>(P.N, std::max<int64_t>(16, (int64_t(64) << 20) / (Kp * esize)));
  // The decoded chunk lives in a buffer kept per calling thread (at most about 64 MB): a fresh
  // allocation of that size costs its page faults on every call.
  thread_local at::Tensor workspace;
  const int64_t need = nt * Kp * esize;
  if (!workspace.defined() || workspace.numel() < need) workspace = at::empty({need}, x.options().dtype(at::kByte));
  at::Tensor wbuf = workspace.narrow(0, 0, need).view(dt).view({nt, Kp});
  at::Tensor y = nt >= P.N ? at::Tensor() : at::empty({M, P.N}, x.options().dtype(dt));
  for (int64_t n0 = 0; n0 < P.N; n0 += nt) {
    const int64_t nc = std::min(nt, P.N - n0);
    const int64_t tasks = (nc + 15) / 16;  // 16 columns per task
    if (bf16) {
      uint16_t* wb = reinterpret_cast<uint16_t*>(wbuf.data_ptr<at::BFloat16>());
      dynamic_for(tasks, [&](auto take) {
        std::vector<float> scratch(Kp);
        for (int64_t t = take(); t >= 0; t = take())
          for (int64_t q = 16 * t; q < std::min(nc, 16 * t + 16); ++q)
            decode_col_bf16(P, isa, t16, n0 + q, wb + q * Kp, scratch.data());
      });
    } else {
      float* wb = wbuf.data_ptr<float>();
      dynamic_for(tasks, [&](auto take) {
        for (int64_t t = take(); t >= 0; t = take())
          for (int64_t q = 16 * t; q < std::min(nc, 16 * t + 16); ++q) decode_col(P, isa, t16, n0 + q, wb + q * Kp);
      });
    }
    at::Tensor part = at::mm(xl, wbuf.narrow(0, 0, nc).narrow(1, 0, kuse).t());
    if (!y.defined()) return part;
    y.narrow(1, n0, nc).copy_(part);
  }
  return y;
}

// Paths by batch rows M: M <= m_reg: GEMV; M <= m_small: AMX (flags bit 1, bfloat16 products) or the
// float32 small-batch micro-kernel; larger: chunks + at::mm, in bfloat16 when flags bit 0 is set.
at::Tensor linear(const at::Tensor& x_in, const at::Tensor& codes, const at::Tensor& p1, const at::Tensor& p2,
                  const at::Tensor& lut, const at::Tensor& gstep, const at::Tensor& kmap,
                  const c10::optional<at::Tensor>& bias, int64_t mode, int64_t nent, int64_t lanes, int64_t isa,
                  int64_t m_reg, int64_t m_small, int64_t flags) {
  check_isa(isa, lanes);
  TORCH_CHECK(x_in.dim() >= 1 && x_in.device().is_cpu(), "afpq_cpu.linear: x must be a CPU tensor [..., in]");
  Problem P = make_problem(codes, p1, p2, lut, gstep, mode, lanes);
  TORCH_CHECK(kmap.numel() == 0 || kmap.numel() == P.Kp, "afpq_cpu.linear: kmap must be empty or [Kp]");
  // Any leading dimensions: flattened here (cheaper than in Python on every call), restored at the end.
  std::vector<int64_t> out_shape(x_in.sizes().begin(), x_in.sizes().end());
  out_shape.back() = P.N;
  const at::Tensor x = x_in.reshape({-1, x_in.size(-1)}).contiguous();
  const int64_t M = x.size(0);
  const bool t16 = nent > 8;
  const bool bf16_large = (flags & 1) != 0, amx_small = (flags & 2) != 0;
  TORCH_CHECK(!amx_small || (isa == AVX512 && amx_usable()), "afpq_cpu.linear: AMX requested but not usable");
  TORCH_CHECK(m_small <= 64 || !amx_small, "afpq_cpu.linear: the AMX path takes at most 64 rows");
  at::Tensor y;
  if (M == 0 || P.N == 0) {
    y = at::zeros({M, P.N}, x.options().dtype(at::kFloat));
  } else if (M <= m_small && M > m_reg && amx_small) {
    y = at::empty({M, P.N}, x.options().dtype(at::kFloat));
    amx_batch(P, isa, t16, x, kmap, y.data_ptr<float>());
  } else if (M <= m_small) {
    at::Tensor xp = gather_x(x, kmap, P.Kp);
    y = at::empty({M, P.N}, x.options().dtype(at::kFloat));
    P.x = xp.data_ptr<float>();
    P.ldx = P.Kp;
    P.y = y.data_ptr<float>();
    P.ldy = P.N;
    small_batch(P, isa, t16, M, m_reg);
  } else {
    y = chunks_mm(P, isa, t16, x, kmap, bf16_large);
  }
  const bool has_bias = bias.has_value() && bias->defined();
  const bool early = has_bias && y.scalar_type() == at::kFloat;  // before the output's one rounding
  if (early) y.add_(*bias);
  if (y.scalar_type() != x_in.scalar_type()) y = y.to(x_in.scalar_type());
  if (has_bias && !early) y.add_(*bias);
  return x_in.dim() == 2 ? y : y.view(out_shape);
}

TORCH_LIBRARY(afpq_cpu, m) {
  m.def("isa_supported() -> int", &isa_supported);
  m.def("decode(Tensor codes, Tensor p1, Tensor p2, Tensor lut, Tensor gstep, int mode, int nent, int lanes, "
        "int isa) -> Tensor", &decode);
  m.def("native_bf16() -> bool", &native_bf16);
  m.def("amx_usable() -> bool", &amx_usable);
  m.def("linear(Tensor x, Tensor codes, Tensor p1, Tensor p2, Tensor lut, Tensor gstep, Tensor kmap, "
        "Tensor? bias, int mode, int nent, int lanes, int isa, int m_reg, int m_small, int flags) -> Tensor",
        &linear);
}

}  // namespace afpq_cpu
