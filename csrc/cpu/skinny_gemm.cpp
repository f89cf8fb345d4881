// The few-rows GEMM of grouped_mm's weight-streaming regime, C[m, n] = A[m, K] * B[n, K]^T (a handful of token rows
// per expert, every weight row read from memory once), and the widening of 2-byte weights: a portable body compiled
// twice (baseline and AVX2 + FMA) and the AVX-512 copies of skinny_gemm_avx512.cpp, picked by cpu_isa() at run time.
#include <algorithm>
#include <cstdint>

#include "cpu/isa_dispatch.h"
#include "cpu/moe_cpu.h"

namespace eureka_fast {
namespace cpu {
namespace {

EF_INLINE void skinny_body(int64_t m, int64_t n, int64_t K, const float* a, int64_t lda, const float* b, int64_t ldb,
                           float* c, int64_t ldc) {
  // Blocks of 4 input rows x 2 weight rows: 8 independent accumulators keep the FMA pipes busy, each weight row
  // is read from memory once and reused from L1 by every input row. Short blocks repeat their last row (the
  // duplicate result is not stored) so one branch-free loop serves every shape.
  for (int64_t j = 0; j < n; j += 2) {
    const int64_t j1 = std::min(j + 1, n - 1);
    const float* w0 = b + j * ldb;
    const float* w1 = b + j1 * ldb;
    for (int64_t i = 0; i < m; i += 4) {
      const float* x0 = a + i * lda;
      const float* x1 = a + std::min(i + 1, m - 1) * lda;
      const float* x2 = a + std::min(i + 2, m - 1) * lda;
      const float* x3 = a + std::min(i + 3, m - 1) * lda;
      float s00 = 0, s10 = 0, s20 = 0, s30 = 0, s01 = 0, s11 = 0, s21 = 0, s31 = 0;
#pragma omp simd reduction(+ : s00, s10, s20, s30, s01, s11, s21, s31)
      for (int64_t kk = 0; kk < K; ++kk) {
        const float u = w0[kk], v = w1[kk];
        s00 += x0[kk] * u;
        s10 += x1[kk] * u;
        s20 += x2[kk] * u;
        s30 += x3[kk] * u;
        s01 += x0[kk] * v;
        s11 += x1[kk] * v;
        s21 += x2[kk] * v;
        s31 += x3[kk] * v;
      }
      const float r0[4] = {s00, s10, s20, s30}, r1[4] = {s01, s11, s21, s31};
      for (int64_t q = 0; q < 4 && i + q < m; ++q) {
        c[(i + q) * ldc + j] = r0[q];
        if (j1 != j) c[(i + q) * ldc + j1] = r1[q];
      }
    }
  }
}

#if EF_HAVE_AVX2_COPY
EF_AVX2 void skinny_avx2(int64_t m, int64_t n, int64_t K, const float* a, int64_t lda, const float* b, int64_t ldb,
                         float* c, int64_t ldc) {
  skinny_body(m, n, K, a, lda, b, ldb, c, ldc);
}
#endif

}  // namespace

SkinnyRows skinny_rows() {
  // AVX2 and the scalar copy: 4-row blocks waste work below 4 rows, the BLAS wins back its packing above 8
  return cpu_isa() == CpuIsa::Avx512 ? SkinnyRows{1, kSkinnyMaxRowsAvx512} : SkinnyRows{4, 8};
}

void skinny_gemm_abt(int64_t m, int64_t n, int64_t K, const float* a, int64_t lda, const float* b, int64_t ldb,
                     float* c, int64_t ldc) {
#if EF_HAVE_AVX2_COPY
  if (cpu_isa() == CpuIsa::Avx512) {
    skinny_gemm_abt_avx512(m, n, K, a, lda, b, ldb, c, ldc);
    return;
  }
#endif
  EF_DISPATCH(skinny_avx2(m, n, K, a, lda, b, ldb, c, ldc), skinny_body(m, n, K, a, lda, b, ldb, c, ldc));
}

void widen_to_float(const uint16_t* src, int64_t n, WeightFormat format, float* dst) {
#if EF_HAVE_AVX2_COPY
  if (cpu_isa() == CpuIsa::Avx512) {
    widen_to_float_avx512(src, n, format, dst);
    return;
  }
#endif
  if (format == WeightFormat::BFloat16) {
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(c10::BFloat16(src[i], c10::BFloat16::from_bits()));
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(c10::Half(src[i], c10::Half::from_bits()));
  }
}

}  // namespace cpu
}  // namespace eureka_fast
