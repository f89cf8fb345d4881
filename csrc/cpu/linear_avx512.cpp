// Packed-weight fp32 linear for the Whisper encoder's many-row GEMMs (1500 rows per 30 s window, K and N = d..4d):
//   linear_pack(weight [N, K]) -> the weight packed for this kernel, or an empty tensor where the kernel cannot run
//     (not float32, or no AVX-512 by cpu_isa()) or would lose to BLAS (K > kMaxK): the caller keeps its BLAS path.
//   packed_linear_(out [M, N], x [M, K], packed, bias?, accumulate, gelu):
//     out = gelu?((accumulate ? out : 0) + x W^T + bias)
// Why our own: MKL already runs these shapes near its square-GEMM rate, so the gain is in the epilogue (fc1's bias
// and exact GELU applied to the accumulators instead of one more pass over the [M, 4d] hidden; the residual add of
// out-proj / fc2; the conv stem's bias + GELU) and in packing weights once per model instead of once per call.
//
// Layout: output columns in panels of 64, each stored k-major ([K][64] floats; the last panel holds the remaining
// columns rounded up to 16, zero-padded). Microkernel: 6 rows x 64 columns of C in 24 zmm accumulators; per k step
// four panel loads, six broadcasts of x read in place (6 rows x K stay in L1) and 24 FMAs. Loop order: blocks of
// panels whose packed weights fit ~1 MB of L2, then row tiles, then the block's panels (x is re-read from L3 once
// per block; measured on K = 1536: 128-column blocks 1.5x faster than the whole weight streamed from L3 per tile),
// and within a panel K in chunks (kChunk, for accuracy).
#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>

#include "cpu/add_ln_avx512.h"
#include "cpu/common.h"
#include "cpu/gelu_avx512.h"
#include "cpu/moe_cpu.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define EF_LINEAR_X86 1
#define EF_AVX512 __attribute__((target("avx512f,avx512dq,avx512bw,avx512vl,avx2,fma")))
#endif

namespace eureka_fast {
namespace cpu {
namespace {

constexpr int64_t kPanel = 64;              // output columns per packed panel (4 zmm vectors)
constexpr int kRows = 6;                    // rows of x per register tile
constexpr int64_t kBlockBytes = 1 << 20;    // packed weights per column block (L2 is 2 MB per core here)
// K is summed in chunks of 128, each chunk's register sum added to C: a single running fp32 sum over K = 1152 (conv2)
// raised the tiny.en encoder's mean error against float64 by ~30% over MKL's; chunked, it is ~12% below MKL's,
// for one load + store of the C tile (in L1) per 128 k steps.
constexpr int64_t kChunk = 128;

int64_t packed_floats(int64_t n, int64_t k) { return k * ((n + 15) / 16 * 16); }

// Scalar (portable) packing; run once per weight, so its speed does not matter.
void pack_weight(const float* w, int64_t n, int64_t k, float* dst) {
  for (int64_t col = 0; col < n; col += kPanel) {
    const int64_t cols = std::min(kPanel, n - col);
    const int64_t width = (cols + 15) / 16 * 16;
    float* panel = dst + col * k;
    for (int64_t kk = 0; kk < k; ++kk)
      for (int64_t j = 0; j < width; ++j) panel[kk * width + j] = j < cols ? w[(col + j) * k + kk] : 0.f;
  }
}

// LayerNorm epilogue (packed_linear_norm_): normed rows = LayerNorm(out rows) * ln_w + ln_b.
struct NormEpilogue {
  const float* w = nullptr;
  const float* b = nullptr;
  float eps = 0.f;
  float* y = nullptr;
  int64_t ldy = 0;
};

#ifdef EF_LINEAR_X86
// C[MR rows, 16 * NV columns] (the last vector masked by `last`) from x rows a (stride lda) and one packed panel b.
template <int MR, int NV>
EF_AVX512 void tile_avx512(int64_t K, const float* a, int64_t lda, const float* b, float* c, int64_t ldc,
                           const float* bias, bool accumulate, bool gelu, __mmask16 last) {
  constexpr int kWidth = 16 * NV;
  __m512 acc[MR][NV];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[i][v] = _mm512_setzero_ps();
#pragma GCC unroll 2
  for (int64_t k = 0; k < K; ++k) {
    __m512 bv[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) bv[v] = _mm512_loadu_ps(b + k * kWidth + 16 * v);
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      const __m512 ai = _mm512_set1_ps(a[i * lda + k]);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[i][v] = _mm512_fmadd_ps(ai, bv[v], acc[i][v]);
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) {
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      const __mmask16 m = v == NV - 1 ? last : static_cast<__mmask16>(0xFFFF);
      float* cp = c + i * ldc + 16 * v;
      __m512 r = acc[i][v];
      if (accumulate) r = _mm512_add_ps(r, _mm512_maskz_loadu_ps(m, cp));
      if (bias) r = _mm512_add_ps(r, _mm512_maskz_loadu_ps(m, bias + 16 * v));
      if (gelu) r = gelu_avx512(r);
      _mm512_mask_storeu_ps(cp, m, r);
    }
  }
}

using TileFn = void (*)(int64_t, const float*, int64_t, const float*, float*, int64_t, const float*, bool, bool,
                        __mmask16);

template <int MR>
constexpr TileFn tile_for(int nv) {
  return nv == 1 ? tile_avx512<MR, 1> : nv == 2 ? tile_avx512<MR, 2> : nv == 3 ? tile_avx512<MR, 3>
                                                                             : tile_avx512<MR, 4>;
}

TileFn pick_tile(int rows, int nv) {
  switch (rows) {
    case 1: return tile_for<1>(nv);
    case 2: return tile_for<2>(nv);
    case 3: return tile_for<3>(nv);
    case 4: return tile_for<4>(nv);
    case 5: return tile_for<5>(nv);
    default: return tile_for<6>(nv);
  }
}

void packed_linear_avx512(int64_t m, int64_t n, int64_t K, const float* x, int64_t ldx, const float* packed,
                          float* out, int64_t ldo, const float* bias, bool accumulate, bool gelu,
                          const NormEpilogue& norm = NormEpilogue()) {
  const int64_t panels = (n + kPanel - 1) / kPanel;
  const int64_t block = std::max<int64_t>(1, kBlockBytes / std::max<int64_t>(1, K * kPanel * 4));
  const int64_t tiles = (m + kRows - 1) / kRows;
  // With the whole weight in one column block (out-proj at tiny and base: 0.6 / 1 MB) each row tile's full rows
  // are done in turn and still in L1: normalise them there instead of in one more pass over [M, N].
  const bool norm_in_tile = norm.w != nullptr && block >= panels;
  at::parallel_for(0, tiles, 8, [&](int64_t t0, int64_t t1) {
    for (int64_t p0 = 0; p0 < panels; p0 += block) {
      const int64_t p1 = std::min(panels, p0 + block);
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t r0 = t * kRows;
        const int rows = static_cast<int>(std::min<int64_t>(kRows, m - r0));
        for (int64_t p = p0; p < p1; ++p) {
          const int64_t col = p * kPanel, cols = std::min(kPanel, n - col);
          const int nv = static_cast<int>((cols + 15) / 16);
          const int64_t width = 16 * nv;
          const __mmask16 last = static_cast<__mmask16>((1u << (cols - 16 * (nv - 1))) - 1u);
          const TileFn fn = pick_tile(rows, nv);
          int64_t k0 = 0;
          do {
            const int64_t kk = std::min(kChunk, K - k0);
            const bool final_chunk = k0 + kk >= K;
            fn(kk, x + r0 * ldx + k0, ldx, packed + col * K + k0 * width, out + r0 * ldo + col, ldo,
               final_chunk && bias ? bias + col : nullptr, accumulate || k0 > 0, final_chunk && gelu, last);
            k0 += kk;
          } while (k0 < K);
        }
        if (norm_in_tile)
          add_ln_rows_avx512(out + r0 * ldo, ldo, norm.y + r0 * norm.ldy, norm.ldy, rows, n, nullptr, norm.w, norm.b,
                             norm.eps);
      }
    }
  });
  if (norm.w != nullptr && !norm_in_tile)
    at::parallel_for(0, m, 64, [&](int64_t r0, int64_t r1) {
      add_ln_rows_avx512(out + r0 * ldo, ldo, norm.y + r0 * norm.ldy, norm.ldy, r1 - r0, n, nullptr, norm.w, norm.b,
                         norm.eps);
    });
}
#endif

bool kernel_available(at::ScalarType dtype) {
#ifdef EF_LINEAR_X86
  return dtype == at::kFloat && cpu_isa() == CpuIsa::Avx512;
#else
  return false;
#endif
}

// Above this K a column block holds at most two panels and x is re-read from L3 for every 64-128 output columns:
// measured 1.37x slower than MKL at K = 5120, N = 1280 (Whisper large's fc2), ~3.5% slower inside the base encoder
// at K = 2048 (fc2, two runs); faster at K = 1536 (tiny's fc2, base's conv2).
constexpr int64_t kMaxK = 1536;

at::Tensor linear_pack_cpu(const at::Tensor& weight) {
  check_float_tensor(weight, 2, "weight");
  if (!kernel_available(weight.scalar_type()) || weight.size(1) > kMaxK) return at::empty({0}, weight.options());
  const at::Tensor w = weight.contiguous();
  const int64_t n = w.size(0), k = w.size(1);
  at::Tensor packed = at::empty({packed_floats(n, k)}, w.options());
  pack_weight(w.data_ptr<float>(), n, k, packed.data_ptr<float>());
  return packed;
}

// The weight [N, K] back from its packed form (the fallback when the kernel is capped off after packing).
at::Tensor unpack_weight(const at::Tensor& packed, int64_t n, int64_t k) {
  at::Tensor w = at::empty({n, k}, packed.options());
  const float* src = packed.data_ptr<float>();
  float* dst = w.data_ptr<float>();
  for (int64_t col = 0; col < n; col += kPanel) {
    const int64_t cols = std::min(kPanel, n - col), width = (cols + 15) / 16 * 16;
    for (int64_t kk = 0; kk < k; ++kk)
      for (int64_t j = 0; j < cols; ++j) dst[(col + j) * k + kk] = src[col * k + kk * width + j];
  }
  return w;
}

at::Tensor& packed_linear_cpu(at::Tensor& out, const at::Tensor& x, const at::Tensor& packed,
                              const c10::optional<at::Tensor>& bias, bool accumulate, bool gelu,
                              const NormEpilogue* norm = nullptr) {
  check_float_tensor(out, 2, "out");
  check_float_tensor(x, 2, "x");
  check_float_tensor(packed, 1, "packed");
  TORCH_CHECK(out.scalar_type() == at::kFloat && x.scalar_type() == at::kFloat && packed.scalar_type() == at::kFloat,
              "packed_linear_ is float32 only, got out ", out.scalar_type(), ", x ", x.scalar_type(), ", packed ",
              packed.scalar_type());
  const int64_t m = x.size(0), k = x.size(1), n = out.size(1);
  TORCH_CHECK(out.size(0) == m, "out must have x's ", m, " rows, got ", out.size(0));
  TORCH_CHECK(packed.is_contiguous() && packed.numel() == packed_floats(n, k), "packed must be linear_pack of a [",
              n, ", ", k, "] weight (", packed_floats(n, k), " floats), got ", packed.numel());
  TORCH_CHECK(x.size(1) <= 1 || x.stride(1) == 1, "x must have a unit column stride, got strides ", x.strides());
  TORCH_CHECK(n <= 1 || out.stride(1) == 1, "out must have a unit column stride, got strides ", out.strides());
  at::assert_no_overlap(out, x);  // tiles of out are written while later tiles still read x
  at::Tensor b;
  if (bias.has_value()) {
    check_float_tensor(*bias, 1, "bias");
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->size(0) == n, "bias must be float32 [", n, "], got ",
                bias->scalar_type(), " ", bias->sizes());
    b = bias->contiguous();
  }
  if (m == 0 || n == 0) return out;
  if (!kernel_available(at::kFloat)) {
    // portable path: ATen on the unpacked weight (same math, BLAS rounding)
    at::Tensor r = at::mm(x, unpack_weight(packed, n, k).t());
    if (accumulate) r.add_(out);
    if (b.defined()) r.add_(b.view({1, n}));
    if (gelu) at::gelu_(r);
    out.copy_(r);
    return out;
  }
#ifdef EF_LINEAR_X86
  packed_linear_avx512(m, n, k, x.data_ptr<float>(), m > 1 ? x.stride(0) : k, packed.data_ptr<float>(),
                       out.data_ptr<float>(), m > 1 ? out.stride(0) : n, b.defined() ? b.data_ptr<float>() : nullptr,
                       accumulate, gelu, norm ? *norm : NormEpilogue());
#endif
  return out;
}

at::Tensor& packed_linear_cpu_op(at::Tensor& out, const at::Tensor& x, const at::Tensor& packed,
                                 const c10::optional<at::Tensor>& bias, bool accumulate, bool gelu) {
  return packed_linear_cpu(out, x, packed, bias, accumulate, gelu);
}

// out [M, N] += x W^T + bias (the residual add of the encoder's out-proj), then normed = LayerNorm(out) * ln_weight
// + ln_bias over N (the next LayerNorm), returns normed. Float32 only, like packed_linear_.
at::Tensor& packed_linear_norm_cpu(at::Tensor& out, const at::Tensor& x, const at::Tensor& packed,
                                   const c10::optional<at::Tensor>& bias, const at::Tensor& ln_weight,
                                   const at::Tensor& ln_bias, double eps, at::Tensor& normed) {
  check_float_tensor(out, 2, "out");
  check_float_tensor(normed, 2, "normed");
  const int64_t n = out.size(1);
  for (const at::Tensor* t : {&ln_weight, &ln_bias}) {
    check_float_tensor(*t, 1, "ln_weight / ln_bias");
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->size(0) == n, "ln_weight and ln_bias must be float32 [", n,
                "], got ", t->scalar_type(), " ", t->sizes());
  }
  TORCH_CHECK(normed.scalar_type() == at::kFloat && normed.sizes() == out.sizes() &&
                  (n <= 1 || normed.stride(1) == 1),
              "normed must be float32 of out's shape ", out.sizes(), " with a unit column stride, got ",
              normed.scalar_type(), " ", normed.sizes(), " strides ", normed.strides());
  TORCH_CHECK(std::isfinite(eps) && eps >= 0, "eps must be finite and >= 0, got ", eps);
  at::assert_no_overlap(normed, out);
  at::assert_no_overlap(normed, x);
  if (!kernel_available(at::kFloat) || out.size(0) == 0 || n == 0) {
    packed_linear_cpu(out, x, packed, bias, true, false);
    normed.copy_(at::layer_norm(out, {n}, ln_weight, ln_bias, eps));
    return normed;
  }
#ifdef EF_LINEAR_X86
  const at::Tensor w = ln_weight.contiguous(), b = ln_bias.contiguous();
  NormEpilogue norm;
  norm.w = w.data_ptr<float>();
  norm.b = b.data_ptr<float>();
  norm.eps = static_cast<float>(eps);
  norm.y = normed.data_ptr<float>();
  norm.ldy = out.size(0) > 1 ? normed.stride(0) : n;
  packed_linear_cpu(out, x, packed, bias, true, false, &norm);
#endif
  return normed;
}

}  // namespace

TORCH_LIBRARY_IMPL(eureka_fast, CPU, m) {
  m.impl("linear_pack", &linear_pack_cpu);
  m.impl("packed_linear_", &packed_linear_cpu_op);
  m.impl("packed_linear_norm_", &packed_linear_norm_cpu);
}

}  // namespace cpu
}  // namespace eureka_fast
