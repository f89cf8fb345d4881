// bias_gelu_(x, bias): x[r, c] = gelu(x[r, c] + bias[c]) in place, exact-erf GELU (Whisper's MLP). One pass over
// the fc1 output of a bias-free GEMM: a GEMM with a bias first copies the bias into every output row, one more
// pass over the widest activation of the encoder.
//
// GELU as in gelu_avx512.h; AVX-512 when cpu_isa() allows, else (and for float64) ATen's add and GELU.
#include <torch/library.h>

#include <cmath>

#include "cpu/common.h"
#include "cpu/gelu_avx512.h"
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
