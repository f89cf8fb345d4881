// fused_experts with bf16 activations and bf16 weights on a CPU with bf16 matrix instructions (AMX / AVX512-BF16):
// the layer stays in bf16 between its steps, as transformers' own bf16 experts do. The float compute path
// (grouped_mm.cpp) widened x to fp32, gathered fp32 rows, rounded them back to bf16 for every oneDNN matmul and
// widened each result again: two to three times the bytes of the bf16 layer, and slower than the eager loop at the
// Eureka adapter shapes.
//
// One task is one block of rows of one expert, run single-threaded on one worker (dynamic scheduling, most rows
// first): gather its token rows (bf16), gate+up matmul (oneDNN, bf16 result), gated activation (fp32 math, rounded
// once to bf16), down matmul into the expert-sorted output rows (bf16). Then each token sums its own k rows in slot
// order (fp32, one rounding): deterministic, no atomics. Blocks of at most kStreamingMaxRows rows keep the
// weight-streaming kernel (fp32 activations, 2-byte weights widened in registers), which beats a matmul call there.
// The numerics are those of the float path's bf16-matmul tiles: gate/up and the down product rounded to bf16 by the
// matmul, the activation's product rounded once.
#include <cstdlib>
#include <cstring>

#include <ATen/core/grad_mode.h>

#include "cpu/common.h"
#include "cpu/moe_cpu.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define EF_HAVE_BF16_EXPERTS 1
#else
#define EF_HAVE_BF16_EXPERTS 0
#endif

namespace eureka_fast {
namespace cpu {
namespace {

// Rows per task: big experts are split so the two workers stay busy to the end; a block this large still runs the
// matmul near its full rate (oneDNN packs each weight slice once per call, which is amortised over the rows).
// Measured on one thread (bf16 rows vs. thread CPU time, AMX): 512 and 1024 rows tie, 256 costs ~5-10%, 128 ~30%.
// Running a big expert as one matmul on both threads instead (the float path's whole-expert mode) was slower at
// every shape (oneDNN's own threading with two threads on this shared machine).
constexpr int64_t kMaxRowsPerTask = 512;
// Blocks of up to this many rows use the weight-streaming kernel; above it the bf16 matmul wins, from 9 rows on
// (16 rows per expert, 64 experts of 1024 x 512: ~31 ms against ~38 ms with the streaming kernel up to 16 rows).
constexpr int64_t kStreamingMaxRows = 8;
static_assert(kStreamingMaxRows <= kSkinnyMaxRowsAvx512, "the streaming kernel's row range");

// EUREKA_FAST_BF16_EXPERTS=0 sends bf16 layers back to the float path (read once per process; for A/B checks).
bool bf16_experts_enabled() {
  static const bool on = [] {
    const char* env = std::getenv("EUREKA_FAST_BF16_EXPERTS");
    return env == nullptr || std::strcmp(env, "0") != 0;
  }();
  return on;
}

// Each expert's [N, K] block has unit stride along K and rows at least K apart, so at::mm takes it in place.
bool row_major_experts(const at::Tensor& w) {
  const int64_t N = w.size(1), K = w.size(2);
  return (w.stride(2) == 1 || K <= 1) && (w.stride(1) >= K || N <= 1);
}

int64_t weight_row_stride(const at::Tensor& w) { return w.size(1) <= 1 ? w.size(2) : w.stride(1); }

at::Tensor bf16_matrix(const uint16_t* p, int64_t rows, int64_t cols, int64_t ld) {
  return at::from_blob(const_cast<uint16_t*>(p), {rows, cols}, {ld, 1}, at::TensorOptions().dtype(at::kBFloat16));
}

void gated(GatedActivation act, const float* gate, const float* up, float* out, int64_t n) {
  if (act == GatedActivation::SiluMul)
    silu_mul(gate, up, out, n);
  else
    gelu_mul(gate, up, out, n);
}

#if EF_HAVE_BF16_EXPERTS
// out[t] = bf16(sum_j w[t,j] * y[inverse_rows[t*k+j]]) for t in [t0, t1): fp32 products and sums in slot order
// (multiply then add, as the float path's combine), one rounding to nearest even.
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16"))) void combine_bf16_rows(
    const uint16_t* y, const int64_t* inverse_rows, const float* w, int64_t t0, int64_t t1, int64_t k, int64_t H,
    uint16_t* out) {
  for (int64_t t = t0; t < t1; ++t) {
    for (int64_t h = 0; h < H; h += 16) {
      const __mmask16 mask = H - h >= 16 ? __mmask16(0xFFFF) : static_cast<__mmask16>((1u << (H - h)) - 1u);
      __m512 acc = _mm512_setzero_ps();
      for (int64_t j = 0; j < k; ++j) {
        const uint16_t* src = y + inverse_rows[t * k + j] * H + h;
        const __m512 v = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, src)), 16));
        acc = _mm512_add_ps(acc, _mm512_mul_ps(_mm512_set1_ps(w[t * k + j]), v));
      }
      const __m256bh r = _mm512_cvtneps_pbh(acc);
      _mm256_mask_storeu_epi16(out + t * H + h, mask, reinterpret_cast<const __m256i&>(r));
    }
  }
}
#endif

}  // namespace

bool fused_experts_bf16_applies(const at::Tensor& x, const at::Tensor& w_gate_up, const at::Tensor& w_down,
                                const std::vector<int64_t>& offsets) {
  if (!EF_HAVE_BF16_EXPERTS || !bf16_experts_enabled() || !cpu_has_bf16_matmul()) return false;
  if (x.scalar_type() != at::kBFloat16 || w_gate_up.scalar_type() != at::kBFloat16 ||
      w_down.scalar_type() != at::kBFloat16 || !row_major_experts(w_gate_up) || !row_major_experts(w_down))
    return false;
  // Decode (every expert within the weight-streaming kernel's rows) stays on the float path: nothing to gain.
  for (size_t e = 0; e + 1 < offsets.size(); ++e)
    if (offsets[e + 1] - offsets[e] > kStreamingMaxRows) return true;
  return false;
}

at::Tensor fused_experts_bf16(const at::Tensor& x, const at::Tensor& w_gate_up, const at::Tensor& w_down,
                              const at::Tensor& weights, const std::vector<int64_t>& offsets,
                              const std::vector<int64_t>& sorted_rows, const std::vector<int64_t>& inverse_rows,
                              int64_t k, GatedActivation act) {
#if EF_HAVE_BF16_EXPERTS
  const int64_t T = x.size(0), H = x.size(1), E = w_gate_up.size(0), I = w_gate_up.size(1) / 2, S = T * k;
  const at::Tensor xc = x.stride(1) == 1 || H <= 1 ? x : x.contiguous();
  const uint16_t* xp = static_cast<const uint16_t*>(xc.data_ptr());
  const int64_t x_stride = xc.stride(0);
  const uint16_t* wgu = static_cast<const uint16_t*>(w_gate_up.data_ptr());
  const uint16_t* wd = static_cast<const uint16_t*>(w_down.data_ptr());
  const int64_t wgu_ld = weight_row_stride(w_gate_up), wd_ld = weight_row_stride(w_down);
  const at::Tensor wts = weights.to(at::kFloat).contiguous();
  at::Tensor out = at::empty({T, H}, x.options());
  // expert-sorted output rows [S, H] (bf16) in the layer workspace shared with the float path
  const WorkspaceLease workspace(S * H * static_cast<int64_t>(sizeof(uint16_t)));
  uint16_t* y = workspace.at_offset<uint16_t>(0);

  struct Block {
    int64_t expert, row0, rows;
  };
  std::vector<Block> blocks;
  for (int64_t e = 0; e < E; ++e) {
    const int64_t rows = offsets[e + 1] - offsets[e];
    if (rows <= 0) continue;
    const int64_t n_blocks = (rows + kMaxRowsPerTask - 1) / kMaxRowsPerTask;
    const int64_t per = (rows + n_blocks - 1) / n_blocks;  // even split: no tiny trailing block
    for (int64_t r = 0; r < rows; r += per) blocks.push_back({e, offsets[e] + r, std::min(per, rows - r)});
  }
  std::stable_sort(blocks.begin(), blocks.end(), [](const Block& a, const Block& b) { return a.rows > b.rows; });

  run_tasks(static_cast<int64_t>(blocks.size()), [&](int64_t i) {
    // The matmuls read from_blob views (no autograd history); grad mode is thread-local, so set it on this worker.
    const at::NoGradGuard no_grad;
    const Block& b = blocks[i];
    const int64_t m = b.rows;
    const uint16_t* w1 = wgu + b.expert * w_gate_up.stride(0);
    const uint16_t* w2 = wd + b.expert * w_down.stride(0);
    uint16_t* y_rows = y + b.row0 * H;
    if (m <= kStreamingMaxRows) {
      // Weight streaming: fp32 token rows, gate+up in fp32, activation in place, down product rounded to bf16.
      float* a32 = thread_scratch<float, 0>(m * H);
      for (int64_t r = 0; r < m; ++r)
        widen_to_float(xp + (sorted_rows[b.row0 + r] / k) * x_stride, H, WeightFormat::BFloat16, a32 + r * H);
      float* g32 = thread_scratch<float, 1>(m * 2 * I);
      skinny_gemm_abt_avx512(m, 2 * I, H, a32, H, w1, wgu_ld, WeightFormat::BFloat16, g32, 2 * I);
      for (int64_t r = 0; r < m; ++r) gated(act, g32 + r * 2 * I, g32 + r * 2 * I + I, g32 + r * 2 * I, I);
      float* y32 = thread_scratch<float, 0>(m * H);  // the token rows are no longer needed
      skinny_gemm_abt_avx512(m, H, I, g32, 2 * I, w2, wd_ld, WeightFormat::BFloat16, y32, H);
      narrow_to_bf16_avx512bf16(y32, m * H, y_rows);
      return;
    }
    uint16_t* a16 = thread_scratch<uint16_t, 2>(m * H);
    for (int64_t r = 0; r < m; ++r)
      std::memcpy(a16 + r * H, xp + (sorted_rows[b.row0 + r] / k) * x_stride, H * sizeof(uint16_t));
    uint16_t* g16 = thread_scratch<uint16_t, 3>(m * 2 * I);
    at::Tensor g = bf16_matrix(g16, m, 2 * I, 2 * I);
    at::mm_out(g, bf16_matrix(a16, m, H, H), bf16_matrix(w1, 2 * I, H, wgu_ld).t());
    // act(gate) * up row by row: widened into an L1-sized fp32 row, rounded once into the hidden rows.
    uint16_t* h16 = thread_scratch<uint16_t, 4>(m * I);
    float* row = thread_scratch<float, 5>(2 * I);
    for (int64_t r = 0; r < m; ++r) {
      widen_to_float(g16 + r * 2 * I, 2 * I, WeightFormat::BFloat16, row);
      gated(act, row, row + I, row, I);
      narrow_to_bf16_avx512bf16(row, I, h16 + r * I);
    }
    at::Tensor yv = bf16_matrix(y_rows, m, H, H);
    at::mm_out(yv, bf16_matrix(h16, m, I, I), bf16_matrix(w2, H, I, wd_ld).t());
  });

  const float* wp = wts.data_ptr<float>();
  uint16_t* op = static_cast<uint16_t*>(out.data_ptr());
  at::parallel_for(0, T, std::max<int64_t>(1, 4096 / std::max<int64_t>(H * k, 1)), [&](int64_t t0, int64_t t1) {
    combine_bf16_rows(y, inverse_rows.data(), wp, t0, t1, k, H, op);
  });
  return out;
#else
  TORCH_CHECK(false, "fused_experts_bf16 needs an x86-64 build");
#endif
}

}  // namespace cpu
}  // namespace eureka_fast
