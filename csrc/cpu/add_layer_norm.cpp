// add_layer_norm_(x, bias, weight, ln_bias, eps): x += bias (in place, the residual stream's pending bias), then
// returns LayerNorm(x) * weight + ln_bias over the last dim. One pass over x where the encoder ran two (a bias add,
// then LayerNorm's read). Per row (in L1): add, sum, sum of squared deviations (two-pass variance, like a float64
// reference up to float32 rounding), normalise. AVX-512 when cpu_isa() allows; else (and for float64) ATen's add
// and layer_norm.
#include <torch/library.h>

#include <cmath>

#include "cpu/common.h"
#include "cpu/moe_cpu.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define EF_ADD_LN_X86 1
#define EF_AVX512 __attribute__((target("avx512f,avx512dq,avx512bw,avx512vl,avx2,fma")))
#endif

namespace eureka_fast {
namespace cpu {
namespace {

#ifdef EF_ADD_LN_X86
EF_AVX512 void add_ln_rows_avx512(float* x, float* y, int64_t rows, int64_t d, const float* bias, const float* w,
                                  const float* b, float eps) {
  const int64_t full = d / 16 * 16;
  const __mmask16 tail = static_cast<__mmask16>((1u << (d - full)) - 1u);
  for (int64_t r = 0; r < rows; ++r) {
    float* xr = x + r * d;
    float* yr = y + r * d;
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
#endif

// x [..., d] contiguous float32 / float64 (updated in place when bias is given), bias / weight / ln_bias [d].
// `given_y`: the caller's buffer of x's shape and dtype (contiguous) for the result, or undefined for a fresh one.
at::Tensor add_layer_norm_impl(at::Tensor& x, const c10::optional<at::Tensor>& bias, const at::Tensor& weight,
                               const at::Tensor& ln_bias, double eps, const at::Tensor& given_y) {
  check_cpu(x, "x");
  check_floating(x, "x");
  TORCH_CHECK(x.dim() >= 1, "x must have at least one dimension");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, "x must be float32 or float64, got ",
              x.scalar_type());
  TORCH_CHECK(x.is_contiguous(), "x must be contiguous");
  TORCH_CHECK(std::isfinite(eps) && eps >= 0, "eps must be finite and >= 0, got ", eps);
  const int64_t d = x.size(-1);
  auto param = [&](const at::Tensor& t, const char* name) {
    check_cpu(t, name);
    TORCH_CHECK(t.scalar_type() == x.scalar_type(), name, " must have x's dtype ", x.scalar_type(), ", got ",
                t.scalar_type());
    TORCH_CHECK(t.dim() == 1 && t.size(0) == d, name, " must be [", d, "], got ", t.sizes());
    return t.contiguous();
  };
  const at::Tensor w = param(weight, "weight"), b = param(ln_bias, "ln_bias");
  const at::Tensor add = bias.has_value() ? param(*bias, "bias") : at::Tensor();
  if (given_y.defined()) {
    check_cpu(given_y, "out");
    TORCH_CHECK(given_y.scalar_type() == x.scalar_type() && given_y.sizes() == x.sizes() && given_y.is_contiguous(),
                "out must be a contiguous tensor of x's shape ", x.sizes(), " and dtype ", x.scalar_type(), ", got ",
                given_y.scalar_type(), " ", given_y.sizes());
    TORCH_CHECK(!given_y.is_same(x) && (x.numel() == 0 || given_y.data_ptr() != x.data_ptr()),
                "out must not be x");
  }
#ifdef EF_ADD_LN_X86
  const bool fast = x.scalar_type() == at::kFloat && cpu_isa() == CpuIsa::Avx512;
#else
  const bool fast = false;
#endif
  if (!fast) {
    // ATen's vectorised add and layer_norm (float64, or no AVX-512)
    if (add.defined()) x.add_(add);
    at::Tensor r = at::layer_norm(x, {d}, w, b, eps);
    return given_y.defined() ? given_y.copy_(r) : r;
  }
  at::Tensor y = given_y.defined() ? given_y : at::empty_like(x);
#ifdef EF_ADD_LN_X86
  const int64_t rows = d > 0 ? x.numel() / d : 0;
  if (rows == 0 || d == 0) return y;
  float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const float* ap = add.defined() ? add.data_ptr<float>() : nullptr;
  const int64_t grain = std::max<int64_t>(1, 16384 / d);
  at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
    add_ln_rows_avx512(xp + r0 * d, yp + r0 * d, r1 - r0, d, ap, w.data_ptr<float>(), b.data_ptr<float>(),
                       static_cast<float>(eps));
  });
#endif
  return y;
}

at::Tensor add_layer_norm_cpu(at::Tensor& x, const c10::optional<at::Tensor>& bias, const at::Tensor& weight,
                              const at::Tensor& ln_bias, double eps) {
  return add_layer_norm_impl(x, bias, weight, ln_bias, eps, at::Tensor());
}

at::Tensor& add_layer_norm_out_cpu(at::Tensor& x, const c10::optional<at::Tensor>& bias, const at::Tensor& weight,
                                   const at::Tensor& ln_bias, double eps, at::Tensor& out) {
  add_layer_norm_impl(x, bias, weight, ln_bias, eps, out);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(eureka_fast, CPU, m) {
  m.impl("add_layer_norm_", &add_layer_norm_cpu);
  m.impl("add_layer_norm_out", &add_layer_norm_out_cpu);
}

}  // namespace cpu
}  // namespace eureka_fast
