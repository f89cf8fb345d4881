// add_layer_norm_(x, bias, weight, ln_bias, eps): x += bias (in place, the residual stream's pending bias), then
// returns LayerNorm(x) * weight + ln_bias over the last dim. One pass over x where the encoder ran two (a bias add,
// then LayerNorm's read); the row kernel is in add_ln_avx512.h. AVX-512 when cpu_isa() allows; else (and for
// float64) ATen's add and layer_norm.
#include <torch/library.h>

#include <cmath>

#include "cpu/common.h"
#include "cpu/add_ln_avx512.h"
#include "cpu/moe_cpu.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define EF_ADD_LN_X86 1
#define EF_AVX512 __attribute__((target("avx512f,avx512dq,avx512bw,avx512vl,avx2,fma")))
#endif

namespace eureka_fast {
namespace cpu {
namespace {

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
    add_ln_rows_avx512(xp + r0 * d, d, yp + r0 * d, d, r1 - r0, d, ap, w.data_ptr<float>(), b.data_ptr<float>(),
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
