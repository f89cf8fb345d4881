// Exact-erf GELU on 16 floats (AVX-512), shared by bias_gelu_ and the packed linear's epilogue.
// erf by Abramowitz & Stegun 7.1.26 (max abs error 1.5e-7) with the reciprocal by vrcp14ps + one Newton step and
// exp(-z^2) by the same 2^x polynomial as the attention kernel.
#pragma once

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

namespace eureka_fast {
namespace cpu {

__attribute__((target("avx512f,avx512dq,avx512bw,avx512vl,avx2,fma"))) inline __m512 gelu_avx512(__m512 g) {
  const __m512 z = _mm512_mul_ps(g, _mm512_set1_ps(0.70710678118654752f));
  const __m512 az = _mm512_abs_ps(z);
  // t = 1 / (1 + p |z|): rcp14 (relative error 2^-14) and one Newton step
  const __m512 den = _mm512_fmadd_ps(az, _mm512_set1_ps(0.3275911f), _mm512_set1_ps(1.0f));
  __m512 t = _mm512_rcp14_ps(den);
  t = _mm512_mul_ps(t, _mm512_fnmadd_ps(den, t, _mm512_set1_ps(2.0f)));
  __m512 poly = _mm512_set1_ps(1.061405429f);
  poly = _mm512_fmadd_ps(poly, t, _mm512_set1_ps(-1.453152027f));
  poly = _mm512_fmadd_ps(poly, t, _mm512_set1_ps(1.421413741f));
  poly = _mm512_fmadd_ps(poly, t, _mm512_set1_ps(-0.284496736f));
  poly = _mm512_fmadd_ps(poly, t, _mm512_set1_ps(0.254829592f));
  poly = _mm512_mul_ps(poly, t);
  // exp(-z^2) = 2^(-z^2 log2 e); arguments below -126 give 0 (erf is 1 to float precision long before)
  const __m512 u = _mm512_mul_ps(_mm512_mul_ps(az, az), _mm512_set1_ps(-1.44269504088896341f));
  const __mmask16 kept = _mm512_cmp_ps_mask(u, _mm512_set1_ps(-126.0f), _CMP_GE_OQ);
  const __m512 n = _mm512_roundscale_ps(u, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(u, n);
  __m512 p = _mm512_set1_ps(1.327647129e-03f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.675541893e-03f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.550713092e-02f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.402212024e-01f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.931469440e-01f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.000000119e+00f));
  const __m512 e = _mm512_maskz_scalef_ps(kept, p, n);
  // erf(|z|) = 1 - poly e; gelu = 0.5 g (1 + sign(z) erf(|z|)) = 0.5 g + 0.5 |g| erf(|z|) (g and z share a sign)
  const __m512 erf_abs = _mm512_fnmadd_ps(poly, e, _mm512_set1_ps(1.0f));
  const __m512 half_g = _mm512_mul_ps(g, _mm512_set1_ps(0.5f));
  return _mm512_fmadd_ps(_mm512_abs_ps(half_g), erf_abs, half_g);
}

}  // namespace cpu
}  // namespace eureka_fast
#endif
