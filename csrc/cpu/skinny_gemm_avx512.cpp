// AVX-512 copy of the few-rows GEMM C[m, n] = A[m, K] * B[n, K]^T (the weight-streaming regime of grouped_mm:
// a handful of token rows per expert, every weight row read from memory once). Compiled with a target attribute
// and chosen at run time (skinny_gemm.cpp, skinny_gemm_abt), so the library still runs on CPUs without AVX-512.
// Self-contained (no ATen) so a stand-alone micro-benchmark can include it.
#include <algorithm>
#include <cstdint>

#include "cpu/weight_format.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define EF_AVX512 __attribute__((target("avx512f,avx512dq,avx512bw,avx512vl,avx2,fma")))
#define EF_AVX512_INLINE inline __attribute__((always_inline))

namespace eureka_fast {
namespace cpu {
namespace skinny512 {

// How 16 consecutive weights become 16 floats: fp32 as they are; bf16 is the top half of an fp32 (shift left by
// 16); fp16 through the hardware conversion. Masked loads never touch memory past the row.
struct F32Weights {
  using T = float;
  static EF_AVX512 EF_AVX512_INLINE __m512 load(const float* p) { return _mm512_loadu_ps(p); }
  static EF_AVX512 EF_AVX512_INLINE __m512 load(__mmask16 m, const float* p) { return _mm512_maskz_loadu_ps(m, p); }
};
struct Bf16Weights {
  using T = uint16_t;
  static EF_AVX512 EF_AVX512_INLINE __m512 widen(__m256i v) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
  }
  static EF_AVX512 EF_AVX512_INLINE __m512 load(const uint16_t* p) {
    return widen(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  static EF_AVX512 EF_AVX512_INLINE __m512 load(__mmask16 m, const uint16_t* p) {
    return widen(_mm256_maskz_loadu_epi16(m, p));
  }
};
struct F16Weights {
  using T = uint16_t;
  static EF_AVX512 EF_AVX512_INLINE __m512 load(const uint16_t* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  static EF_AVX512 EF_AVX512_INLINE __m512 load(__mmask16 m, const uint16_t* p) {
    return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p));
  }
};

// C[i, j] = dot(A row i, B row j) with a register block of MR input rows x NR weight rows, 16 floats per
// accumulator: every weight vector loaded feeds MR FMAs and every input vector NR FMAs. With kPrefetch, the block
// also prefetches the next NR weight rows, one line per line consumed, so their loads are in flight before that
// block starts (the hardware prefetcher stops at every 4 KB page, i.e. at every row when K = 1024).
// The K tail uses masked loads, which never touch memory past the row.
template <int MR, int NR, bool kPrefetch, int kHint, typename W>
EF_AVX512 EF_AVX512_INLINE void dot_block(int64_t K, const float* a, int64_t lda, const typename W::T* b, int64_t ldb,
                                          float* c, int64_t ldc, const typename W::T* next_b, int64_t next_rows) {
  __m512 acc[MR][NR];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 8
    for (int r = 0; r < NR; ++r) acc[i][r] = _mm512_setzero_ps();
  const typename W::T* pf[NR];
  if constexpr (kPrefetch) {
#pragma GCC unroll 8
    for (int r = 0; r < NR; ++r) pf[r] = next_b + std::min<int64_t>(r, next_rows - 1) * ldb;
  }
  int64_t kk = 0;
  for (; kk + 16 <= K; kk += 16) {
    // one prefetch per 64-byte line: every step for fp32, every other step for 2-byte weights
    if (kPrefetch && (sizeof(typename W::T) == 4 || (kk & 31) == 0)) {
#pragma GCC unroll 8
      for (int r = 0; r < NR; ++r) _mm_prefetch(reinterpret_cast<const char*>(pf[r] + kk), static_cast<_mm_hint>(kHint));
    }
    __m512 wv[NR];
#pragma GCC unroll 8
    for (int r = 0; r < NR; ++r) wv[r] = W::load(b + r * ldb + kk);
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      const __m512 xv = _mm512_loadu_ps(a + i * lda + kk);
#pragma GCC unroll 8
      for (int r = 0; r < NR; ++r) acc[i][r] = _mm512_fmadd_ps(xv, wv[r], acc[i][r]);
    }
  }
  if (kk < K) {
    const __mmask16 mask = static_cast<__mmask16>((1u << (K - kk)) - 1u);
    __m512 wv[NR];
#pragma GCC unroll 8
    for (int r = 0; r < NR; ++r) wv[r] = W::load(mask, b + r * ldb + kk);
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      const __m512 xv = _mm512_maskz_loadu_ps(mask, a + i * lda + kk);
#pragma GCC unroll 8
      for (int r = 0; r < NR; ++r) acc[i][r] = _mm512_fmadd_ps(xv, wv[r], acc[i][r]);
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 8
    for (int r = 0; r < NR; ++r) c[i * ldc + r] = _mm512_reduce_add_ps(acc[i][r]);
}

// Rows [0, rows) of A (rows <= MR) against NR weight rows.
template <int MR, int NR, int kHint, typename W>
EF_AVX512 EF_AVX512_INLINE void dot_rows(int64_t rows, int64_t K, const float* a, int64_t lda, const typename W::T* b,
                                         int64_t ldb, float* c, int64_t ldc, const typename W::T* next_b,
                                         int64_t next_rows) {
  if constexpr (MR > 1) {
    if (rows < MR) {
      dot_rows<MR - 1, NR, kHint, W>(rows, K, a, lda, b, ldb, c, ldc, next_b, next_rows);
      return;
    }
  }
  if (next_rows > 0)
    dot_block<MR, NR, true, kHint, W>(K, a, lda, b, ldb, c, ldc, next_b, next_rows);
  else
    dot_block<MR, NR, false, kHint, W>(K, a, lda, b, ldb, c, ldc, next_b, next_rows);
}

// All m rows of A against NR weight rows; only the first row block prefetches the following weight block.
template <int MR, int NR, int kHint, typename W>
EF_AVX512 void weight_block(int64_t m, int64_t K, const float* a, int64_t lda, const typename W::T* b, int64_t ldb,
                            float* c, int64_t ldc, const typename W::T* next_b, int64_t next_rows) {
  for (int64_t i = 0; i < m; i += MR)
    dot_rows<MR, NR, kHint, W>(std::min<int64_t>(MR, m - i), K, a + i * lda, lda, b, ldb, c + i * ldc, ldc, next_b,
                               i == 0 ? next_rows : 0);
}

template <int MR, int NR, int kHint, typename W>
EF_AVX512 void gemm_abt(int64_t m, int64_t n, int64_t K, const float* a, int64_t lda, const typename W::T* b,
                        int64_t ldb, float* c, int64_t ldc) {
  for (int64_t j = 0; j < n; j += NR) {
    const int64_t cols = std::min<int64_t>(NR, n - j);
    const int64_t next_rows = std::min<int64_t>(NR, n - j - cols);
    const typename W::T* bj = b + j * ldb;
    if (cols == NR) {
      weight_block<MR, NR, kHint, W>(m, K, a, lda, bj, ldb, c + j, ldc, bj + cols * ldb, next_rows);
    } else {
      // last, partial weight block: one weight row at a time
      for (int64_t r = 0; r < cols; ++r)
        weight_block<MR, 1, kHint, W>(m, K, a, lda, bj + r * ldb, ldb, c + j + r, ldc, nullptr, 0);
    }
  }
}

// Up to 4 rows, the next weight block is prefetched into L1; with more rows the input rows themselves fill most
// of L1, so it goes to L2 only (measured on 400 MB of fp32 weights, one thread: T0 ahead by ~3% at 1 row, T1 ahead
// by ~10% at 8 rows).
template <typename W>
EF_AVX512 void gemm_abt_rows(int64_t m, int64_t n, int64_t K, const float* a, int64_t lda, const typename W::T* b,
                             int64_t ldb, float* c, int64_t ldc) {
  if (m <= 4)
    gemm_abt<4, 4, _MM_HINT_T0, W>(m, n, K, a, lda, b, ldb, c, ldc);
  else
    gemm_abt<4, 4, _MM_HINT_T1, W>(m, n, K, a, lda, b, ldb, c, ldc);
}

template <typename W>
EF_AVX512 void widen(const uint16_t* src, int64_t n, float* dst) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) _mm512_storeu_ps(dst + i, W::load(src + i));
  if (i < n) {
    const __mmask16 mask = static_cast<__mmask16>((1u << (n - i)) - 1u);
    _mm512_mask_storeu_ps(dst + i, mask, W::load(mask, src + i));
  }
}

// dst[i] = bf16(src[i]), round to nearest even (NaN stays NaN): the AVX512-BF16 conversion instruction.
__attribute__((target("avx512f,avx512bf16,avx512bw,avx512vl"))) void narrow(const float* src, int64_t n,
                                                                             uint16_t* dst) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m256bh v = _mm512_cvtneps_pbh(_mm512_loadu_ps(src + i));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i), reinterpret_cast<const __m256i&>(v));
  }
  if (i < n) {
    const __mmask16 mask = static_cast<__mmask16>((1u << (n - i)) - 1u);
    const __m256bh v = _mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(mask, src + i));
    _mm256_mask_storeu_epi16(dst + i, mask, reinterpret_cast<const __m256i&>(v));
  }
}

}  // namespace skinny512

void skinny_gemm_abt_avx512(int64_t m, int64_t n, int64_t K, const float* a, int64_t lda, const float* b, int64_t ldb,
                            float* c, int64_t ldc) {
  skinny512::gemm_abt_rows<skinny512::F32Weights>(m, n, K, a, lda, b, ldb, c, ldc);
}

void skinny_gemm_abt_avx512(int64_t m, int64_t n, int64_t K, const float* a, int64_t lda, const uint16_t* b,
                            int64_t ldb, WeightFormat format, float* c, int64_t ldc) {
  if (format == WeightFormat::BFloat16)
    skinny512::gemm_abt_rows<skinny512::Bf16Weights>(m, n, K, a, lda, b, ldb, c, ldc);
  else
    skinny512::gemm_abt_rows<skinny512::F16Weights>(m, n, K, a, lda, b, ldb, c, ldc);
}

void narrow_to_bf16_avx512bf16(const float* src, int64_t n, uint16_t* dst) { skinny512::narrow(src, n, dst); }

void widen_to_float_avx512(const uint16_t* src, int64_t n, WeightFormat format, float* dst) {
  if (format == WeightFormat::BFloat16)
    skinny512::widen<skinny512::Bf16Weights>(src, n, dst);
  else
    skinny512::widen<skinny512::F16Weights>(src, n, dst);
}

}  // namespace cpu
}  // namespace eureka_fast
#endif
