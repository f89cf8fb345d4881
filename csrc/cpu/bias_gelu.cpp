// bias_gelu_(x, bias): x[r, c] = gelu(x[r, c] + bias[c]) in place, exact-erf GELU (Whisper's MLP). One pass over
// the fc1 output of a bias-free GEMM: a GEMM with a bias first copies the bias into every output row, one more
// pass over the widest activation of the encoder.
//
// erf by Abramowitz & Stegun 7.1.26 (max abs error 1.5e-7) with the reciprocal by vrcp14ps + one Newton step and
// exp(-z^2) by the same 2^x polynomial as the attention kernel; AVX-512 when cpu_isa() allows, else (and for
// float64) ATen's add and GELU.
#include <torch/library.h>

#include <cmath>

#include "cpu/common.h"
#include "cpu/moe_cpu.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define EF_BIAS_GELU_X86 1
#define EF_AVX512 __attribute__((target("avx512f,avx512dq,avx512bw,avx512vl,avx2,fma")))
#endif

namespace eureka_fast {
namespace cpu {
namespace {

#ifdef EF_BIAS_GELU_X86
EF_AVX512 inline __m512 gelu_avx512(__m512 g) {
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

EF_AVX512 void bias_gelu_rows_avx512(float* x, int64_t rows, int64_t cols, int64_t ld, const float* bias) {
  for (int64_t r = 0; r < rows; ++r) {
    float* row = x + r * ld;
    int64_t c = 0;
    for (; c + 16 <= cols; c += 16)
      _mm512_storeu_ps(row + c, gelu_avx512(_mm512_add_ps(_mm512_loadu_ps(row + c), _mm512_loadu_ps(bias + c))));
    if (c < cols) {
      const __mmask16 m = static_cast<__mmask16>((1u << (cols - c)) - 1u);
      const __m512 g = _mm512_add_ps(_mm512_maskz_loadu_ps(m, row + c), _mm512_maskz_loadu_ps(m, bias + c));
      _mm512_mask_storeu_ps(row + c, m, gelu_avx512(g));
    }
  }
}
#endif

// x [rows, cols] (unit column stride, any row stride), bias [cols], same float dtype -> x, modified in place.
at::Tensor& bias_gelu_cpu(at::Tensor& x, const at::Tensor& bias) {
  check_float_tensor(x, 2, "x");
  check_float_tensor(bias, 1, "bias");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, "x must be float32 or float64, got ",
              x.scalar_type());
  TORCH_CHECK(bias.scalar_type() == x.scalar_type(), "bias must have x's dtype ", x.scalar_type(), ", got ",
              bias.scalar_type());
  TORCH_CHECK(bias.size(0) == x.size(1), "bias must have x's ", x.size(1), " columns, got ", bias.size(0));
  TORCH_CHECK(x.size(1) <= 1 || x.stride(1) == 1, "x must have a unit column stride, got strides ", x.strides());
  const int64_t rows = x.size(0), cols = x.size(1);
  if (rows == 0 || cols == 0) return x;
#ifdef EF_BIAS_GELU_X86
  const bool fast = x.scalar_type() == at::kFloat && cpu_isa() == CpuIsa::Avx512;
#else
  const bool fast = false;
#endif
  if (!fast) {
    // ATen's vectorised exact GELU after the add (float64, or no AVX-512)
    x.add_(bias.view({1, cols}));
    at::gelu_(x);
    return x;
  }
#ifdef EF_BIAS_GELU_X86
  const at::Tensor b = bias.contiguous();
  const int64_t ld = rows > 1 ? x.stride(0) : cols;
  float* xp = x.data_ptr<float>();
  const float* bp = b.data_ptr<float>();
  // blocks of rows in parallel
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(cols, 1));
  at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) { bias_gelu_rows_avx512(xp + r0 * ld, r1 - r0, cols, ld, bp); });
#endif
  return x;
}

}  // namespace

TORCH_LIBRARY_IMPL(eureka_fast, CPU, m) { m.impl("bias_gelu_", &bias_gelu_cpu); }

}  // namespace cpu
}  // namespace eureka_fast
