// Elementwise activations for GEMM epilogues and the few-rows GEMM. The float versions use a Cephes-style exp (about
// 1 ulp over the clamped range) written so that GCC auto-vectorises it. Each float kernel body is compiled twice:
// for baseline x86-64 and with target("avx2,fma"); the AVX2 copy is picked at run time from the CPU's feature bits
// (__builtin_cpu_supports), so the library runs on any x86-64 CPU without -march=native.
#include <cmath>
#include <cstdint>
#include <algorithm>
#include <cstring>

#include "cpu/moe_cpu.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define EF_HAVE_AVX2_COPY 1
#define EF_AVX2 __attribute__((target("avx2,fma")))
#else
#define EF_HAVE_AVX2_COPY 0
#define EF_AVX2
#endif
#include <cstdlib>
#include <string>
#define EF_INLINE inline __attribute__((always_inline))

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
EF_AVX2 void silu_mul_avx2(const float* g, const float* u, float* o, int64_t n) { silu_mul_body(g, u, o, n); }
EF_AVX2 void gelu_mul_avx2(const float* g, const float* u, float* o, int64_t n) { gelu_mul_body(g, u, o, n); }
EF_AVX2 void silu_inplace_avx2(float* x, int64_t n) { silu_inplace_body(x, n); }
EF_AVX2 void gelu_inplace_avx2(float* x, int64_t n) { gelu_inplace_body(x, n); }
EF_AVX2 void skinny_avx2(int64_t m, int64_t n, int64_t K, const float* a, int64_t lda, const float* b, int64_t ldb,
                         float* c, int64_t ldc) {
  skinny_body(m, n, K, a, lda, b, ldb, c, ldc);
}

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

// The widest instruction set this CPU supports, capped by EUREKA_FAST_CPU_ISA=baseline|avx2|avx512 (read once;
// lets tests and benchmarks run the narrower copies on a wide machine).
CpuIsa detect_cpu_isa() {
  CpuIsa isa = CpuIsa::Baseline;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) isa = CpuIsa::Avx2;
  if (isa == CpuIsa::Avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl"))
    isa = CpuIsa::Avx512;
  if (const char* cap = std::getenv("EUREKA_FAST_CPU_ISA")) {
    const std::string v(cap);
    const CpuIsa limit = v == "baseline" ? CpuIsa::Baseline : v == "avx2" ? CpuIsa::Avx2 : CpuIsa::Avx512;
    isa = std::min(isa, limit);
  }
  return isa;
}
bool cpu_has_avx2_fma() { return cpu_isa() >= CpuIsa::Avx2; }
#define EF_DISPATCH(avx2_call, base_call) \
  do {                                    \
    if (cpu_has_avx2_fma()) {             \
      avx2_call;                          \
    } else {                              \
      base_call;                          \
    }                                     \
  } while (0)
#define EF_DISPATCH3(avx512_call, avx2_call, base_call) \
  do {                                                   \
    if (cpu_isa() == CpuIsa::Avx512) {                   \
      avx512_call;                                       \
    } else {                                             \
      EF_DISPATCH(avx2_call, base_call);                 \
    }                                                    \
  } while (0)
#else
CpuIsa detect_cpu_isa() { return CpuIsa::Baseline; }
#define EF_DISPATCH(avx2_call, base_call) base_call
#define EF_DISPATCH3(avx512_call, avx2_call, base_call) base_call
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
CpuIsa cpu_isa() {
  static const CpuIsa isa = detect_cpu_isa();
  return isa;
}

bool cpu_has_bf16_matmul() {
#if defined(__x86_64__) && defined(__GNUC__)
  static const bool has = cpu_isa() == CpuIsa::Avx512 && __builtin_cpu_supports("avx512bf16");
  return has;
#else
  return false;
#endif
}

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
