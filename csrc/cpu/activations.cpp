// Elementwise activations for GEMM epilogues. The float versions use a Cephes-style exp (about 1 ulp over the
// clamped range) written so that GCC auto-vectorises it; target_clones builds an AVX2+FMA copy next to the baseline
// x86-64 one and picks at load time, so the library still runs on any x86-64 CPU (no -march=native).
#include <cmath>
#include <cstdint>
#include <cstring>

#include "cpu/moe_cpu.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(__SANITIZE_ADDRESS__)
#define EF_MULTIVERSION __attribute__((target_clones("arch=haswell", "default")))
#else
#define EF_MULTIVERSION
#endif

namespace eureka_fast {
namespace cpu {
namespace {

inline float exp_approx(float x) {
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

inline float erf_approx(float x) {
  // Abramowitz & Stegun 7.1.26 on |x| (max abs error 1.5e-7), odd extension.
  const float ax = std::fabs(x);
  const float t = 1.0f / (1.0f + 0.3275911f * ax);
  const float poly = t * (0.254829592f + t * (-0.284496736f + t * (1.421413741f + t * (-1.453152027f + t * 1.061405429f))));
  const float y = 1.0f - poly * exp_approx(-ax * ax);
  return std::copysign(y, x);
}

inline float silu_f(float g) { return g / (1.0f + exp_approx(-g)); }
inline float gelu_f(float g) { return 0.5f * g * (1.0f + erf_approx(g * 0.70710678118654752f)); }
inline double silu_d(double g) { return g / (1.0 + std::exp(-g)); }
inline double gelu_d(double g) { return 0.5 * g * (1.0 + std::erf(g * 0.70710678118654752)); }

}  // namespace

EF_MULTIVERSION void silu_mul(const float* gate, const float* up, float* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = silu_f(gate[i]) * up[i];
}
EF_MULTIVERSION void gelu_mul(const float* gate, const float* up, float* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = gelu_f(gate[i]) * up[i];
}
EF_MULTIVERSION void silu_inplace(float* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) x[i] = silu_f(x[i]);
}
EF_MULTIVERSION void gelu_inplace(float* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) x[i] = gelu_f(x[i]);
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
