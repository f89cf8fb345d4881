// AVX-512 fp32 GEMM C[m, n] = A[m, K] * B[n, K]^T for the many-rows regime of grouped_mm (tens to hundreds of
// token rows per expert, K = 256..2048), with B an expert's weight matrix read in place: row-major [n, K], cold
// (each expert's weights are touched once per layer call), never packed.
//
// It computes the transposed tile C^T[n][m] = sum_k B[n][k] * A^T[k][m]. Only A is packed, once per tile, into
// panels of 32 rows stored k-major ([K][32], zero-padded rows), and reused for every weight row (gate and up alike:
// pack_a_avx512, then gemm_abt_packed_avx512 per weight matrix). The microkernel keeps a kNr x 32 block of C^T in
// 2 * kNr zmm registers (kNr = 14: 28 accumulators); per k step it loads two panel vectors, broadcasts one value of
// each of the kNr weight rows and issues 2 * kNr FMAs. K is blocked (kKc = 512, measured 1-5% ahead of 256): the
// first panel copies the kNr x kKc weight chunk it reads into a small L1 buffer, 16 columns at a time, and the other
// panels broadcast from that copy. (Weight rows 4 KB apart, K = 1024 or 2048, all map to one L1 set, so read in
// place by every panel they evict each other: a K = 1024 tile ran at ~0.9x of MKL that way, ~1.1x with the copy.)
// While one chunk is in use the next is prefetched into L2 (the hardware prefetcher stops at every 4 KB page, i.e.
// every row), a slice of its rows by each panel pass. A last panel of at most 16 rows runs a one-vector kernel
// (half the work); rows left past the full panels may instead run as dot products along K against the same L1
// copy (see remainder_rows). Loop order and partial sums: see gemm_abt_packed_avx512.
// Self-contained (no ATen) so a stand-alone micro-benchmark (bench/gemm_tiles.cpp) can include it.
#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <new>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define EF_AVX512 __attribute__((target("avx512f,avx512dq,avx512bw,avx512vl,avx2,fma")))
#define EF_AVX512_INLINE inline __attribute__((always_inline))

namespace eureka_fast {
namespace cpu {
namespace gemm512 {

constexpr int64_t kPanel = 32;  // token rows per packed panel: two zmm vectors per k step
constexpr int kNr = 14;         // weight rows per register block
#ifndef EF_GEMM512_KC
#define EF_GEMM512_KC 512
#endif
constexpr int64_t kKc = EF_GEMM512_KC;  // K block: kNr * kKc * 4 bytes = 28 KB of weights resident in L1
#ifndef EF_GEMM512_PF_HINT
#define EF_GEMM512_PF_HINT _MM_HINT_T1
#endif

// In-register transpose of a 16 x 16 block: r[i] holds row i on entry and column i on exit.
EF_AVX512 EF_AVX512_INLINE void transpose16x16(__m512 (&r)[16]) {
  __m512 t[16];
#pragma GCC unroll 8
  for (int i = 0; i < 8; ++i) {  // interleave row pairs within each 128-bit lane
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  __m512 u[16];  // u[4g + c], lane L: rows 4g..4g+3 of column 4L + c
#pragma GCC unroll 4
  for (int g = 0; g < 4; ++g) {
    const __m512d a = _mm512_castps_pd(t[4 * g]), b = _mm512_castps_pd(t[4 * g + 1]);
    const __m512d c = _mm512_castps_pd(t[4 * g + 2]), d = _mm512_castps_pd(t[4 * g + 3]);
    u[4 * g + 0] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
    u[4 * g + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
    u[4 * g + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d));
    u[4 * g + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d));
  }
#pragma GCC unroll 4
  for (int c = 0; c < 4; ++c) {  // gather lane L of the four row groups into column 4L + c
    const __m512 x_lo = _mm512_shuffle_f32x4(u[c], u[4 + c], _MM_SHUFFLE(1, 0, 1, 0));
    const __m512 x_hi = _mm512_shuffle_f32x4(u[c], u[4 + c], _MM_SHUFFLE(3, 2, 3, 2));
    const __m512 y_lo = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], _MM_SHUFFLE(1, 0, 1, 0));
    const __m512 y_hi = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], _MM_SHUFFLE(3, 2, 3, 2));
    r[c] = _mm512_shuffle_f32x4(x_lo, y_lo, _MM_SHUFFLE(2, 0, 2, 0));
    r[4 + c] = _mm512_shuffle_f32x4(x_lo, y_lo, _MM_SHUFFLE(3, 1, 3, 1));
    r[8 + c] = _mm512_shuffle_f32x4(x_hi, y_hi, _MM_SHUFFLE(2, 0, 2, 0));
    r[12 + c] = _mm512_shuffle_f32x4(x_hi, y_hi, _MM_SHUFFLE(3, 1, 3, 1));
  }
}

// Rows [0, rows) (rows <= 16; row i starts at src[i]; missing rows read as zero) into dst[k][0..16) for k in [0, K)
// (dst stride 32).
EF_AVX512 void pack_half_panel(const float* const* src, int64_t rows, int64_t K, float* dst) {
  for (int64_t k0 = 0; k0 < K; k0 += 16) {
    const int64_t width = std::min<int64_t>(16, K - k0);
    const __mmask16 mask = static_cast<__mmask16>((1u << width) - 1u);
    __m512 r[16];
#pragma GCC unroll 16
    for (int i = 0; i < 16; ++i) r[i] = i < rows ? _mm512_maskz_loadu_ps(mask, src[i] + k0) : _mm512_setzero_ps();
    transpose16x16(r);
    for (int64_t j = 0; j < width; ++j) _mm512_store_ps(dst + (k0 + j) * kPanel, r[j]);
  }
}

// One k step: acc[r][h] += w[r * kKc] * a[16h .. 16h + 16) for the NR broadcast weights and H panel vectors.
template <int NR, int H>
EF_AVX512 EF_AVX512_INLINE void k_step(const float* a, const float* w, __m512 (&acc)[NR][2]) {
  const __m512 a0 = _mm512_load_ps(a);
  const __m512 a1 = H == 2 ? _mm512_load_ps(a + 16) : a0;
#pragma GCC unroll 16
  for (int r = 0; r < NR; ++r) {
    const __m512 bv = _mm512_set1_ps(w[r * kKc]);
    acc[r][0] = _mm512_fmadd_ps(a0, bv, acc[r][0]);
    if constexpr (H == 2) acc[r][1] = _mm512_fmadd_ps(a1, bv, acc[r][1]);
  }
}

// acc[r][h] += sum_{k < kc} W[r][k] * panel[k][16h .. 16h + 16) for NR weight rows of kc values each, read from
// wbuf ([NR][kKc], a fixed stride: constant displacements and no L1 set conflicts, whereas weight rows 4 KB apart
// (K = 1024, 2048) all fall in one L1 set and more than 12 of them evict each other).
// With kCopy, the rows are first copied from b (stride ldb) into wbuf, 16 columns at a time just before use (the
// first pass over a chunk); with kPrefetch, rows [pr0, pr1) at pf (stride ldb) are prefetched into L2 alongside.
// H = 2: all 32 rows of the panel; H = 1: its first 16 only (the single panel of a tile of at most 16 rows).
template <int NR, int H, bool kCopy, bool kPrefetch>
EF_AVX512 EF_AVX512_INLINE void micro(int64_t kc, const float* __restrict panel, const float* b, int64_t ldb,
                                      float* __restrict wbuf, const float* pf, int pr0, int pr1, __m512 (&acc)[NR][2]) {
  for (int64_t k = 0; k < kc; k += 16) {
    const int64_t width = std::min<int64_t>(16, kc - k);
    if constexpr (kCopy) {
      const __mmask16 mask = static_cast<__mmask16>((1u << width) - 1u);
#pragma GCC unroll 16
      for (int r = 0; r < NR; ++r) _mm512_store_ps(wbuf + r * kKc + k, _mm512_maskz_loadu_ps(mask, b + r * ldb + k));
    }
    if constexpr (kPrefetch) {
#pragma GCC unroll 16
      for (int r = pr0; r < pr1; ++r) _mm_prefetch(reinterpret_cast<const char*>(pf + r * ldb + k), EF_GEMM512_PF_HINT);
    }
    const float* pk = panel + k * kPanel;
    const float* wk = wbuf + k;
    if (width == 16) {  // a full 16-step: unrolled
#pragma GCC unroll 16
      for (int kk = 0; kk < 16; ++kk) k_step<NR, H>(pk + kk * kPanel, wk + kk, acc);
    } else {
      for (int64_t kk = 0; kk < width; ++kk) k_step<NR, H>(pk + kk * kPanel, wk + kk, acc);
    }
  }
}

// One vector whose lane r is the sum of the 16 lanes of v[r] (r < NR <= 16; lanes past NR are zero): a tree of
// interleave + add steps, 30 shuffles for 16 vectors where a full 16 x 16 transpose takes 64.
template <int NR>
EF_AVX512 EF_AVX512_INLINE __m512 lane_sums(const __m512 (&v)[NR]) {
  __m512 w[16];
#pragma GCC unroll 16
  for (int r = 0; r < 16; ++r) w[r] = r < NR ? v[r < NR ? r : 0] : _mm512_setzero_ps();
  __m512 t[8];  // t[i], per 128-bit lane: two partial sums each of v[2i] and v[2i + 1]
#pragma GCC unroll 8
  for (int i = 0; i < 8; ++i)
    t[i] = _mm512_add_ps(_mm512_unpacklo_ps(w[2 * i], w[2 * i + 1]), _mm512_unpackhi_ps(w[2 * i], w[2 * i + 1]));
  __m512 u[4];  // u[j], per 128-bit lane L: the lane-L sums of v[4j .. 4j + 4)
#pragma GCC unroll 4
  for (int j = 0; j < 4; ++j) {
    const __m512d a = _mm512_castps_pd(t[2 * j]), b = _mm512_castps_pd(t[2 * j + 1]);
    u[j] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
  }
  // z[h]: 128-bit slots [L0 + L1, L2 + L3] of u[2h], then the same of u[2h + 1]
  const __m512 z0 = _mm512_add_ps(_mm512_shuffle_f32x4(u[0], u[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                  _mm512_shuffle_f32x4(u[0], u[1], _MM_SHUFFLE(3, 1, 3, 1)));
  const __m512 z1 = _mm512_add_ps(_mm512_shuffle_f32x4(u[2], u[3], _MM_SHUFFLE(2, 0, 2, 0)),
                                  _mm512_shuffle_f32x4(u[2], u[3], _MM_SHUFFLE(3, 1, 3, 1)));
  return _mm512_add_ps(_mm512_shuffle_f32x4(z0, z1, _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_f32x4(z0, z1, _MM_SHUFFLE(3, 1, 3, 1)));
}

// The remainder rows (fewer than 32, after the full panels) as dot products along K: acc[t][r] holds 16 lanes of
// partial sums of row t of a (NT rows, stride lda, zero-padded to a multiple of 16 columns) times weight row r of
// wbuf. Weights are loaded as vectors, so a row costs what it does inside a panel (2 rows x NR weights: 2 + NR loads
// per 2 * NR FMAs), where a padded panel would pay for all 16 or 32 of its rows (~6% of the work at 128 rows).
template <int NR, int NT>
EF_AVX512 EF_AVX512_INLINE void dot_micro(int64_t kc, const float* __restrict a, int64_t lda,
                                          const float* __restrict wbuf, __m512 (&acc)[2][NR]) {
  for (int64_t k = 0; k < kc; k += 16) {
    const __m512 a0 = _mm512_load_ps(a + k);
    const __m512 a1 = NT == 2 ? _mm512_load_ps(a + lda + k) : a0;
#pragma GCC unroll 16
    for (int r = 0; r < NR; ++r) {
      __m512 w = _mm512_load_ps(wbuf + r * kKc + k);
      // one load in a register for both rows: left to itself GCC folds the load into each FMA (twice the loads,
      // which made these passes load-bound)
      if constexpr (NT == 2) __asm__("" : "+v"(w));
      acc[0][r] = _mm512_fmadd_ps(a0, w, acc[0][r]);
      if constexpr (NT == 2) acc[1][r] = _mm512_fmadd_ps(a1, w, acc[1][r]);
    }
  }
}

// Writes the NR x 32 block of C^T in acc to C rows [0, rows) (rows <= 32), columns [0, NR).
template <int NR>
EF_AVX512 EF_AVX512_INLINE void store_block(__m512 (&acc)[NR][2], int64_t rows, float* c, int64_t ldc) {
  constexpr __mmask16 kCols = static_cast<__mmask16>((1u << NR) - 1u);
#pragma GCC unroll 2
  for (int h = 0; h < 2; ++h) {
    const int64_t hr = std::min<int64_t>(16, rows - 16 * h);
    if (hr <= 0) break;
    __m512 r[16];
#pragma GCC unroll 16
    for (int i = 0; i < 16; ++i) r[i] = i < NR ? acc[i < NR ? i : 0][h] : _mm512_setzero_ps();
    transpose16x16(r);
    float* ch = c + 16 * h * ldc;
    if (hr == 16) {
#pragma GCC unroll 16
      for (int t = 0; t < 16; ++t) _mm512_mask_storeu_ps(ch + t * ldc, kCols, r[t]);
    } else {
      for (int t = 0; t < hr; ++t) _mm512_mask_storeu_ps(ch + t * ldc, kCols, r[t]);
    }
  }
}

// The packed A (pack_a_avx512): panels of 32 rows (k-major), then the remainder rows row-major. m % 32 = r rows
// past the full panels (m > 32) run as dot products when that beats a zero-padded last panel, which costs a full
// panel's work (r > 16) or a one-vector panel's (r <= 16). Measured one thread, 128 + r rows, K = 1024, hot weights
// (GFLOP/s, padded vs dot): r = 2: 136 vs 154, 8: 147 vs 155, 14: 151 vs 153, 16: 158 vs 153, 20: 147 vs 152,
// 24: 150 vs 151, 28: 154 vs 151.
EF_AVX512_INLINE int64_t remainder_rows(int64_t m) {
  const int64_t r = m % kPanel;
  return m > kPanel && (r <= 14 || (r >= 17 && r <= 24)) ? r : 0;
}
EF_AVX512_INLINE int64_t panel_count(int64_t m) { return (m - remainder_rows(m) + kPanel - 1) / kPanel; }
EF_AVX512_INLINE int64_t remainder_stride(int64_t K) { return (K + 15) / 16 * 16; }

// One panel's pass over a chunk (see chunk): acc from / to its partial sums, or stored into C on the last K block.
template <int NR, bool kCopy, bool kPrefetch>
EF_AVX512 EF_AVX512_INLINE void panel_pass(int64_t prow, int64_t kc, bool first, bool last, const float* panel,
                                           const float* b, int64_t ldb, float* wbuf, const float* pf, int pr0, int pr1,
                                           float* part, float* c, int64_t ldc) {
  __m512 acc[NR][2];
  if (first) {
#pragma GCC unroll 16
    for (int r = 0; r < NR; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  } else {
#pragma GCC unroll 16
    for (int r = 0; r < NR; ++r) {
      acc[r][0] = _mm512_load_ps(part + r * kPanel);
      acc[r][1] = _mm512_load_ps(part + r * kPanel + 16);
    }
  }
  if (prow > 16)
    micro<NR, 2, kCopy, kPrefetch>(kc, panel, b, ldb, wbuf, pf, pr0, pr1, acc);
  else
    micro<NR, 1, kCopy, kPrefetch>(kc, panel, b, ldb, wbuf, pf, pr0, pr1, acc);
  if (last) {
    store_block<NR>(acc, prow, c, ldc);
  } else {
#pragma GCC unroll 16
    for (int r = 0; r < NR; ++r) {
      _mm512_store_ps(part + r * kPanel, acc[r][0]);
      _mm512_store_ps(part + r * kPanel + 16, acc[r][1]);
    }
  }
}

// Dot-product passes over a chunk for the remainder rows (pairs, and a last single row), after the chunk's first
// panel has filled wbuf: accumulated into `part` (per pair, 2 x NR vectors of 16 lane sums) or, on the last K block,
// reduced and stored into C rows [0, nrem).
template <int NR>
EF_AVX512 void remainder_passes(int64_t nrem, int64_t kc, bool first, bool last, const float* rem, int64_t ldr,
                                float* wbuf, float* part, float* c, int64_t ldc) {
  for (int64_t t = 0; t < nrem; t += 2, part += NR * kPanel) {
    __m512 acc[2][NR];
#pragma GCC unroll 16
    for (int r = 0; r < NR; ++r) {
      acc[0][r] = first ? _mm512_setzero_ps() : _mm512_load_ps(part + r * 16);
      acc[1][r] = first ? _mm512_setzero_ps() : _mm512_load_ps(part + (NR + r) * 16);
    }
    const int64_t rows = std::min<int64_t>(2, nrem - t);
    if (rows == 2)
      dot_micro<NR, 2>(kc, rem + t * ldr, ldr, wbuf, acc);
    else
      dot_micro<NR, 1>(kc, rem + t * ldr, ldr, wbuf, acc);
    if (!last) {
#pragma GCC unroll 16
      for (int r = 0; r < NR; ++r) {
        _mm512_store_ps(part + r * 16, acc[0][r]);
        _mm512_store_ps(part + (NR + r) * 16, acc[1][r]);
      }
      continue;
    }
    constexpr __mmask16 kCols = static_cast<__mmask16>((1u << NR) - 1u);
    for (int64_t i = 0; i < rows; ++i) _mm512_mask_storeu_ps(c + (t + i) * ldc, kCols, lane_sums<NR>(acc[i]));
  }
}

// One chunk: NR weight rows x kc columns of K (b, stride ldb) against every row of A, accumulated into `partial`
// or, on the last K block, stored into C[:, 0..NR). A's panels start at `panels` (this K offset, panel stride
// pstride), its remainder rows at `rem` (this K offset, row stride ldr). The first panel copies the chunk into wbuf
// while its FMAs hide the loads' latency; the remainder rows come next, while the copy is still in L1 (they reread
// the weights as vectors, 14 lines per 16 columns); then the other panels, which stream through L1. partial: one
// NR x 32 block per panel, then one per pair of remainder rows.
template <int NR>
EF_AVX512 void chunk(int64_t m, int64_t kc, bool first, bool last, const float* panels, int64_t pstride,
                     const float* rem, int64_t ldr, const float* b, int64_t ldb, float* wbuf, const float* pf,
                     float* partial, float* c, int64_t ldc) {
  const int64_t np = panel_count(m), nrem = remainder_rows(m), panel_rows = m - nrem;
  const int64_t prow0 = std::min<int64_t>(kPanel, panel_rows);
  // The next chunk's prefetches are spread over all panel passes (each takes a slice of its rows): issued all in
  // the first pass they come in a burst that fills the line-fill buffers the panel loads also need.
  auto pr = [&](int64_t p) { return static_cast<int>(p * NR / np); };
  if (pf != nullptr)
    panel_pass<NR, true, true>(prow0, kc, first, last, panels, b, ldb, wbuf, pf, 0, pr(1), partial, c, ldc);
  else
    panel_pass<NR, true, false>(prow0, kc, first, last, panels, b, ldb, wbuf, pf, 0, 0, partial, c, ldc);
  if (nrem > 0)
    remainder_passes<NR>(nrem, kc, first, last, rem, ldr, wbuf, partial + np * (NR * kPanel), c + np * kPanel * ldc,
                         ldc);
  for (int64_t p = 1; p < np; ++p) {
    const int64_t prow = std::min<int64_t>(kPanel, panel_rows - p * kPanel);
    float* part = partial + p * (NR * kPanel);
    float* cp = c + p * kPanel * ldc;
    if (pf != nullptr)
      panel_pass<NR, false, true>(prow, kc, first, last, panels + p * pstride, b, ldb, wbuf, pf, pr(p), pr(p + 1),
                                  part, cp, ldc);
    else
      panel_pass<NR, false, false>(prow, kc, first, last, panels + p * pstride, b, ldb, wbuf, pf, 0, 0, part, cp, ldc);
  }
}

// chunk<nr> for the last, partial block of nr < kNr weight rows.
template <int NR>
EF_AVX512 void tail_chunk(int64_t nr, int64_t m, int64_t kc, bool first, bool last, const float* panels,
                          int64_t pstride, const float* rem, int64_t ldr, const float* b, int64_t ldb, float* wbuf,
                          const float* pf, float* partial, float* c, int64_t ldc) {
  if constexpr (NR > 1) {
    if (nr < NR)
      return tail_chunk<NR - 1>(nr, m, kc, first, last, panels, pstride, rem, ldr, b, ldb, wbuf, pf, partial, c, ldc);
  }
  chunk<NR>(m, kc, first, last, panels, pstride, rem, ldr, b, ldb, wbuf, pf, partial, c, ldc);
}

// Partial sums kept per group of weight-row blocks (L2-resident), see gemm_abt_packed_avx512.
constexpr int64_t kPartialBytes = 96 << 10;

// Per-thread 64-byte aligned scratch, one per slot (0: this file's chunk and partial-sum buffer, 1: packed A).
template <int kSlot>
float* scratch(int64_t floats) {
  struct Buffer {
    float* p = nullptr;
    int64_t n = 0;
    ~Buffer() { std::free(p); }
  };
  thread_local Buffer buf;
  if (buf.n < floats) {
    std::free(buf.p);
    buf.p = nullptr;
    buf.n = 0;
    const size_t bytes = (static_cast<size_t>(floats) * sizeof(float) + 63) / 64 * 64;
    buf.p = static_cast<float*>(std::aligned_alloc(64, bytes));
    if (buf.p == nullptr) throw std::bad_alloc();
    buf.n = floats;
  }
  return buf.p;
}

}  // namespace gemm512

int64_t packed_a_floats(int64_t m, int64_t K) {
  return gemm512::panel_count(m) * gemm512::kPanel * K + gemm512::remainder_rows(m) * gemm512::remainder_stride(K);
}

float* packed_a_scratch(int64_t m, int64_t K) { return gemm512::scratch<1>(packed_a_floats(m, K)); }

namespace gemm512 {
// Panels k-major ([K][32] each; the last one zero-padded unless the rows past the full panels are remainder rows,
// see remainder_rows; padding rows are never stored), then the remainder rows row-major with their stride rounded up to 16 floats and the padding zeroed (the dot-product passes
// read whole vectors). Row i of A starts at row(i).
template <typename RowPtr>
EF_AVX512 EF_AVX512_INLINE void pack_rows(int64_t m, int64_t K, const RowPtr& row, float* packed) {
  const int64_t np = panel_count(m);
  for (int64_t p = 0; p < np; ++p) {
    const int64_t prow = std::min<int64_t>(kPanel, m - p * kPanel);
    for (int64_t h = 0; h < 2; ++h) {
      const int64_t rows = std::max<int64_t>(0, std::min<int64_t>(16, prow - 16 * h));
      const float* src[16];
      for (int64_t i = 0; i < 16; ++i) src[i] = i < rows ? row(p * kPanel + 16 * h + i) : nullptr;
      pack_half_panel(src, rows, K, packed + p * kPanel * K + 16 * h);
    }
  }
  const int64_t ldr = remainder_stride(K);
  float* rem = packed + np * kPanel * K;
  for (int64_t t = m - remainder_rows(m); t < m; ++t, rem += ldr) {
    std::memcpy(rem, row(t), K * sizeof(float));
    std::memset(rem + K, 0, (ldr - K) * sizeof(float));
  }
}
}  // namespace gemm512

EF_AVX512 void pack_a_avx512(int64_t m, int64_t K, const float* a, int64_t lda, float* packed) {
  gemm512::pack_rows(m, K, [&](int64_t i) { return a + i * lda; }, packed);
}

EF_AVX512 void pack_a_gather_avx512(int64_t m, int64_t K, const float* x, int64_t ldx, const int64_t* rows,
                                    float* packed) {
  gemm512::pack_rows(m, K, [&](int64_t i) { return x + rows[i] * ldx; }, packed);
}

// Loop order: groups of G weight-row blocks (G * kNr rows), then K blocks, then the blocks of the group, then the
// rows of A (see chunk). The live A data is one K block of every row (m x kKc floats, L2), reused by the G blocks of
// a group; the partial sums of a group (G x (panels + remainder pairs) x kNr x 32 floats) stay in L2 across K
// blocks. Each weight element is loaded once, copied into the L1 chunk buffer by the first pass and read from there
// by the others.
EF_AVX512 void gemm_abt_packed_avx512(int64_t m, int64_t n, int64_t K, const float* packed, const float* b,
                                      int64_t ldb, float* c, int64_t ldc) {
  using gemm512::kKc;
  using gemm512::kNr;
  using gemm512::kPanel;
  if (m <= 0 || n <= 0 || K <= 0) return;
  const int64_t np = gemm512::panel_count(m), nrem = gemm512::remainder_rows(m);
  const int64_t block_floats = (np + (nrem + 1) / 2) * kNr * kPanel;
  const int64_t ldr = gemm512::remainder_stride(K);
  const float* rem = packed + np * kPanel * K;
  const int64_t G = std::max<int64_t>(1, gemm512::kPartialBytes / (block_floats * 4));
  const int64_t group_rows = G * kNr;
  float* wbuf = gemm512::scratch<0>(kNr * kKc + G * block_floats);
  float* partials = wbuf + kNr * kKc;
  const int64_t pstride = kPanel * K;
  for (int64_t j0 = 0; j0 < n; j0 += group_rows) {
    const int64_t j1 = std::min(n, j0 + group_rows);
    for (int64_t k0 = 0; k0 < K; k0 += kKc) {
      const int64_t kc = std::min<int64_t>(kKc, K - k0);
      const bool first = k0 == 0, last = k0 + kc >= K;
      for (int64_t j = j0; j < j1; j += kNr) {
        const int64_t nr = std::min<int64_t>(kNr, j1 - j);
        // the chunk after this one: the next block of the group, the group's next K block, or the next group
        int64_t pj = -1, pk = 0;
        if (j + nr < j1) {
          pj = j + nr, pk = k0;
        } else if (!last) {
          pj = j0, pk = k0 + kc;
        } else if (j1 < n) {
          pj = j1, pk = 0;
        }
        // prefetch whole kNr-row blocks, clamped to rows that exist
        const float* pf = pj < 0 ? nullptr : b + std::max<int64_t>(0, std::min<int64_t>(pj, n - kNr)) * ldb + pk;
        if (pf != nullptr && n < kNr) pf = nullptr;
        float* part = partials + (j - j0) / kNr * block_floats;
        const float* bj = b + j * ldb + k0;
        if (nr == kNr)
          gemm512::chunk<kNr>(m, kc, first, last, packed + k0 * kPanel, pstride, rem + k0, ldr, bj, ldb, wbuf, pf,
                              part, c + j, ldc);
        else
          gemm512::tail_chunk<kNr - 1>(nr, m, kc, first, last, packed + k0 * kPanel, pstride, rem + k0, ldr, bj, ldb,
                                       wbuf, pf, part, c + j, ldc);
      }
    }
  }
}

}  // namespace cpu
}  // namespace eureka_fast
#else
// Not x86-64 / GCC: never called (cpu_isa() is never Avx512 there), defined so the library links.
#include <cstdint>
namespace eureka_fast {
namespace cpu {
int64_t packed_a_floats(int64_t, int64_t) { return 0; }
float* packed_a_scratch(int64_t, int64_t) { return nullptr; }
void pack_a_avx512(int64_t, int64_t, const float*, int64_t, float*) {}
void pack_a_gather_avx512(int64_t, int64_t, const float*, int64_t, const int64_t*, float*) {}
void gemm_abt_packed_avx512(int64_t, int64_t, int64_t, const float*, const float*, int64_t, float*, int64_t) {}
}  // namespace cpu
}  // namespace eureka_fast
#endif
