// Elementwise activations (SiLU, GELU and their gated products) for GEMM epilogues and stack_norm_project. The float
// versions use a Cephes-style exp (about 1 ulp over the clamped range) written so that GCC auto-vectorises it; each
// body is compiled for baseline x86-64, AVX2 + FMA and (intrinsics) AVX-512, picked at run time (isa_dispatch.h).
#include <cmath>
#include <cstdint>
#include <cstring>

#include "cpu/isa_dispatch.h"
#include "cpu/moe_cpu.h"

namespace eureka_fast {
namespace cpu {
namespace {

EF_INLINE float exp_approx(float x) {
  // exp(x) = 2^n * exp(r), n = round(x / ln2), |r| <= ln2 / 2; clamp keeps 2^n a normal float.
  x = x < -87.0f ? -87.0f : x;  // ternaries (not fmin/fmax) so the clamp vectorises to min/max
  x = x > 88.0f ? 88.0f : x;
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

EF_INLINE float erf_approx(float x) {
  // Abramowitz & Stegun 7.1.26 on |x| (max abs error 1.5e-7), odd extension.
  const float ax = std::fabs(x);
  const float t = 1.0f / (1.0f + 0.3275911f * ax);
  const float poly = t * (0.254829592f + t * (-0.284496736f + t * (1.421413741f + t * (-1.453152027f + t * 1.061405429f))));
  const float y = 1.0f - poly * exp_approx(-ax * ax);
  return std::copysign(y, x);
}

EF_INLINE float silu_f(float g) { return g / (1.0f + exp_approx(-g)); }
EF_INLINE float gelu_f(float g) { return 0.5f * g * (1.0f + erf_approx(g * 0.70710678118654752f)); }
inline double silu_d(double g) { return g / (1.0 + std::exp(-g)); }
inline double gelu_d(double g) { return 0.5 * g * (1.0 + std::erf(g * 0.70710678118654752)); }

EF_INLINE void silu_mul_body(const float* gate, const float* up, float* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = silu_f(gate[i]) * up[i];
}
EF_INLINE void gelu_mul_body(const float* gate, const float* up, float* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = gelu_f(gate[i]) * up[i];
}
EF_INLINE void silu_inplace_body(float* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) x[i] = silu_f(x[i]);
}
EF_INLINE void gelu_inplace_body(float* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) x[i] = gelu_f(x[i]);
}
#if EF_HAVE_AVX2_COPY
EF_AVX2 void silu_mul_avx2(const float* g, const float* u, float* o, int64_t n) { silu_mul_body(g, u, o, n); }
EF_AVX2 void gelu_mul_avx2(const float* g, const float* u, float* o, int64_t n) { gelu_mul_body(g, u, o, n); }
EF_AVX2 void silu_inplace_avx2(float* x, int64_t n) { silu_inplace_body(x, n); }
EF_AVX2 void gelu_inplace_avx2(float* x, int64_t n) { gelu_inplace_body(x, n); }

// AVX-512 gated activations with explicit intrinsics (GCC leaves the scalar bodies above unvectorised because of
// the clamps and floor, so these were scalar: the gated epilogue was ~8% of fused_experts at 128 rows per expert).
// Same formulas as exp_approx / erf_approx: Cephes exp with scalef for 2^n, Abramowitz & Stegun erf.
#define EF_AVX512_ACT __attribute__((target("avx512f,avx512dq,avx512bw,avx512vl,avx2,fma")))
EF_AVX512_ACT EF_INLINE __m512 exp512(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.0f)), _mm512_set1_ps(88.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_add_ps(_mm512_fmadd_ps(p, _mm512_mul_ps(r, r), r), _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}
EF_AVX512_ACT EF_INLINE __m512 silu512(__m512 g) {
  return _mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.0f), exp512(_mm512_sub_ps(_mm512_setzero_ps(), g))));
}
EF_AVX512_ACT EF_INLINE __m512 gelu512(__m512 g) {
  const __m512 x = _mm512_mul_ps(g, _mm512_set1_ps(0.70710678118654752f));
  const __m512 ax = _mm512_abs_ps(x);
  const __m512 t = _mm512_div_ps(_mm512_set1_ps(1.0f), _mm512_fmadd_ps(_mm512_set1_ps(0.3275911f), ax,
                                                                       _mm512_set1_ps(1.0f)));
  __m512 poly = _mm512_fmadd_ps(_mm512_set1_ps(1.061405429f), t, _mm512_set1_ps(-1.453152027f));
  poly = _mm512_fmadd_ps(poly, t, _mm512_set1_ps(1.421413741f));
  poly = _mm512_fmadd_ps(poly, t, _mm512_set1_ps(-0.284496736f));
  poly = _mm512_fmadd_ps(poly, t, _mm512_set1_ps(0.254829592f));
  poly = _mm512_mul_ps(poly, t);
  const __m512 e = exp512(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_mul_ps(ax, ax)));
  const __m512 y = _mm512_fnmadd_ps(poly, e, _mm512_set1_ps(1.0f));  // erf(|x|)
  // copysign(y, x): y >= 0, so OR in x's sign bit
  const __m512 erf = _mm512_or_ps(y, _mm512_and_ps(x, _mm512_set1_ps(-0.0f)));
  return _mm512_mul_ps(_mm512_mul_ps(_mm512_set1_ps(0.5f), g), _mm512_add_ps(_mm512_set1_ps(1.0f), erf));
}
template <bool kGelu, bool kMul>
EF_AVX512_ACT EF_INLINE void act512(const float* g, const float* u, float* o, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512 a = kGelu ? gelu512(_mm512_loadu_ps(g + i)) : silu512(_mm512_loadu_ps(g + i));
    _mm512_storeu_ps(o + i, kMul ? _mm512_mul_ps(a, _mm512_loadu_ps(u + i)) : a);
  }
  if (i < n) {
    const __mmask16 m = static_cast<__mmask16>((1u << (n - i)) - 1u);
    // masked-off lanes load 0: silu(0) and gelu(0) are finite, and they are never stored
    const __m512 a = kGelu ? gelu512(_mm512_maskz_loadu_ps(m, g + i)) : silu512(_mm512_maskz_loadu_ps(m, g + i));
    _mm512_mask_storeu_ps(o + i, m, kMul ? _mm512_mul_ps(a, _mm512_maskz_loadu_ps(m, u + i)) : a);
  }
}
EF_AVX512_ACT void silu_mul_avx512(const float* g, const float* u, float* o, int64_t n) { act512<false, true>(g, u, o, n); }
EF_AVX512_ACT void gelu_mul_avx512(const float* g, const float* u, float* o, int64_t n) { act512<true, true>(g, u, o, n); }
EF_AVX512_ACT void silu_inplace_avx512(float* x, int64_t n) { act512<false, false>(x, nullptr, x, n); }
EF_AVX512_ACT void gelu_inplace_avx512(float* x, int64_t n) { act512<true, false>(x, nullptr, x, n); }

#endif

}  // namespace

void silu_mul(const float* gate, const float* up, float* out, int64_t n) {
  EF_DISPATCH3(silu_mul_avx512(gate, up, out, n), silu_mul_avx2(gate, up, out, n), silu_mul_body(gate, up, out, n));
}
void gelu_mul(const float* gate, const float* up, float* out, int64_t n) {
  EF_DISPATCH3(gelu_mul_avx512(gate, up, out, n), gelu_mul_avx2(gate, up, out, n), gelu_mul_body(gate, up, out, n));
}
void silu_inplace(float* x, int64_t n) {
  EF_DISPATCH3(silu_inplace_avx512(x, n), silu_inplace_avx2(x, n), silu_inplace_body(x, n));
}
void gelu_inplace(float* x, int64_t n) {
  EF_DISPATCH3(gelu_inplace_avx512(x, n), gelu_inplace_avx2(x, n), gelu_inplace_body(x, n));
}
void silu_mul(const double* gate, const double* up, double* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = silu_d(gate[i]) * up[i];
}
void gelu_mul(const double* gate, const double* up, double* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = gelu_d(gate[i]) * up[i];
}
void silu_inplace(double* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) x[i] = silu_d(x[i]);
}
void gelu_inplace(double* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) x[i] = gelu_d(x[i]);
}

}  // namespace cpu
}  // namespace eureka_fast
