// Per row (in L1): x += bias (when given, written back), then y = LayerNorm(x) * w + b over d columns: add, sum,
// sum of squared deviations (two-pass variance, like a float64 reference up to float32 rounding), normalise.
// Shared by add_layer_norm_ and the packed linear's LayerNorm epilogue (same rounding in both).
#pragma once

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

#include <cmath>
#include <cstdint>

namespace eureka_fast {
namespace cpu {

__attribute__((target("avx512f,avx512dq,avx512bw,avx512vl,avx2,fma"))) inline void add_ln_rows_avx512(
    float* x, int64_t ldx, float* y, int64_t ldy, int64_t rows, int64_t d, const float* bias, const float* w,
    const float* b, float eps) {
  const int64_t full = d / 16 * 16;
  const __mmask16 tail = static_cast<__mmask16>((1u << (d - full)) - 1u);
  for (int64_t r = 0; r < rows; ++r) {
    float* xr = x + r * ldx;
    float* yr = y + r * ldy;
    __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps();
    int64_t c = 0;
    for (; c + 32 <= full; c += 32) {
      __m512 a0 = _mm512_loadu_ps(xr + c), a1 = _mm512_loadu_ps(xr + c + 16);
      if (bias) {
        a0 = _mm512_add_ps(a0, _mm512_loadu_ps(bias + c));
        a1 = _mm512_add_ps(a1, _mm512_loadu_ps(bias + c + 16));
        _mm512_storeu_ps(xr + c, a0);
        _mm512_storeu_ps(xr + c + 16, a1);
      }
      s0 = _mm512_add_ps(s0, a0);
      s1 = _mm512_add_ps(s1, a1);
    }
    for (; c < d; c += 16) {
      const __mmask16 m = c < full ? static_cast<__mmask16>(0xFFFF) : tail;
      __m512 a = _mm512_maskz_loadu_ps(m, xr + c);
      if (bias) {
        a = _mm512_add_ps(a, _mm512_maskz_loadu_ps(m, bias + c));
        _mm512_mask_storeu_ps(xr + c, m, a);
      }
      s0 = _mm512_add_ps(s0, a);
    }
    const float mean = _mm512_reduce_add_ps(_mm512_add_ps(s0, s1)) / static_cast<float>(d);
    const __m512 vmean = _mm512_set1_ps(mean);
    __m512 q0 = _mm512_setzero_ps(), q1 = _mm512_setzero_ps();
    for (c = 0; c + 32 <= full; c += 32) {
      const __m512 e0 = _mm512_sub_ps(_mm512_loadu_ps(xr + c), vmean);
      const __m512 e1 = _mm512_sub_ps(_mm512_loadu_ps(xr + c + 16), vmean);
      q0 = _mm512_fmadd_ps(e0, e0, q0);
      q1 = _mm512_fmadd_ps(e1, e1, q1);
    }
    for (; c < d; c += 16) {
      const __mmask16 m = c < full ? static_cast<__mmask16>(0xFFFF) : tail;
      const __m512 e = _mm512_maskz_sub_ps(m, _mm512_maskz_loadu_ps(m, xr + c), vmean);
      q0 = _mm512_fmadd_ps(e, e, q0);
    }
    const float var = _mm512_reduce_add_ps(_mm512_add_ps(q0, q1)) / static_cast<float>(d);
    const __m512 rstd = _mm512_set1_ps(1.0f / std::sqrt(var + eps));
    for (c = 0; c < d; c += 16) {
      const __mmask16 m = c < full ? static_cast<__mmask16>(0xFFFF) : tail;
      const __m512 n = _mm512_mul_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, xr + c), vmean), rstd);
      _mm512_mask_storeu_ps(yr + c, m,
                            _mm512_fmadd_ps(n, _mm512_maskz_loadu_ps(m, w + c), _mm512_maskz_loadu_ps(m, b + c)));
    }
  }
}

}  // namespace cpu
}  // namespace eureka_fast
#endif
