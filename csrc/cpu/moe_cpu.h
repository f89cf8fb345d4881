// Building blocks shared between the CPU MoE kernels (moe_plan.cpp, permute_combine.cpp, grouped_mm.cpp,
// fused_experts.cpp, skinny_gemm.cpp) and the C++ unit tests.
#pragma once

#include <cstdint>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "cpu/common.h"
#include "cpu/weight_format.h"

namespace eureka_fast {
namespace cpu {

// Stable counting sort of the `rows` routed rows (row = token * k + slot) by expert id.
// ids must already be checked to lie in [0, num_experts). Outputs: counts[E], offsets[E+1], padded_offsets[E+1]
// (each count rounded up to a multiple of block when block > 0), sorted_rows[rows], inverse_rows[rows].
void build_plan(const int64_t* ids, int64_t rows, int64_t num_experts, int64_t block, int64_t* counts,
                int64_t* offsets, int64_t* padded_offsets, int64_t* sorted_rows, int64_t* inverse_rows);

// out[t] = sum_j w[t,j] * y[inverse_rows[t*k+j]] (accumulated in acc_t, slot order), out contiguous [T, H].
template <typename scalar_t, typename acc_t>
void combine_rows(const scalar_t* y, int64_t y_stride, const int64_t* inverse_rows, const acc_t* w, int64_t T,
                  int64_t k, int64_t H, scalar_t* out);

// The AVX-512 copy of combine_rows<float, float> over tokens [t0, t1) (combine_avx512.cpp; call only when
// cpu_isa() == CpuIsa::Avx512).
void combine_rows_avx512(const float* y, int64_t y_stride, const int64_t* inverse_rows, const float* w, int64_t t0,
                         int64_t t1, int64_t k, int64_t H, float* out);

enum class GatedActivation { None, SiluMul, GeluMul };

// Parses "none" | "silu_mul" | "gelu_mul" (and the fused_experts spellings "silu" | "gelu" when `fused_names`).
GatedActivation parse_gated_activation(const std::string& name, bool fused_names);

// out[offsets[e]:offsets[e+1], :] = act(a[offsets[e]:offsets[e+1], :] @ w[e]^T) for every expert, where w[e] is
// [N, K] with element (n, kk) at w + e * w_expert_stride + n * w_row_stride + kk * w_col_stride (one of the two
// inner strides is 1). With a gated activation the output has N/2 columns (first half of N is the gate).
// Work is split into (expert, row block, column chunk) tiles run in parallel with single-threaded GEMMs, so the
// many-experts / few-rows regime streams weights on every core and the many-rows regime runs cache-sized tiles.
// Rows outside [offsets[0], offsets[E]) are left untouched.
// Rows of A given by a gather instead of a dense buffer: row s of A is x + rows[s] * ldx (float only).
struct RowGather {
  const float* x;
  int64_t ldx;
  const int64_t* rows;
};
// With `gather`, tiles that run the AVX-512 many-rows GEMM (gated activation, kPackedGemmMinRowsAvx512+ rows, not
// run whole) pack their rows straight from it; every other row of `a` must still be filled in.
template <typename scalar_t>
void grouped_gemm_forward(const scalar_t* a, int64_t lda, int64_t K, const scalar_t* w, int64_t w_expert_stride,
                          int64_t w_row_stride, int64_t w_col_stride, int64_t N, const std::vector<int64_t>& offsets,
                          GatedActivation act, scalar_t* out, int64_t ldo, const RowGather* gather = nullptr);

// grouped_mm.cpp's pieces that fused_experts.cpp composes:
// whether every tile of expert e (gated, float, weights with column stride w_col_stride) packs its rows through the
// AVX-512 many-rows GEMM, and so can take them from a RowGather instead of the dense rows;
bool expert_tiles_pack(const std::vector<int64_t>& offsets, int64_t e, int64_t K, int64_t w_col_stride);
// bf16 / fp16 weights with unit inner stride, when the compute dtype cd is float: read as stored;
bool reads_2byte_weights(const at::Tensor& w, at::ScalarType cd);
// w [E, N, K] in cd with strides the BLAS can take directly (one unit inner stride, the other at least the matrix
// extent); anything else (expanded, overlapping, both strides non-unit) is copied;
at::Tensor blas_ready_weight(const at::Tensor& w, at::ScalarType cd);
// w's inner strides (N, K) as gemm_abt wants them (one of the two equal to 1);
std::pair<int64_t, int64_t> inner_strides(const at::Tensor& w);
// one grouped GEMM (+ activation) over w as the caller passed it: 2-byte weights read in place, anything else via a
// BLAS-ready copy in the compute dtype cd (the type of a and out). float and double.
template <typename scalar_t>
void grouped_forward_weights(const scalar_t* a, int64_t lda, int64_t K, const at::Tensor& w, at::ScalarType cd,
                             const std::vector<int64_t>& offsets, GatedActivation act, scalar_t* out, int64_t ldo,
                             bool bf16_inputs, const RowGather* gather = nullptr);

// Gated activations on rows of `n` values: out = act(gate) * up.
void silu_mul(const float* gate, const float* up, float* out, int64_t n);
void gelu_mul(const float* gate, const float* up, float* out, int64_t n);
void silu_mul(const double* gate, const double* up, double* out, int64_t n);
void gelu_mul(const double* gate, const double* up, double* out, int64_t n);
// The instruction set the hand-vectorised kernels use: the widest the CPU has, capped by the environment variable
// EUREKA_FAST_CPU_ISA=baseline|avx2|avx512 (read once per process).
enum class CpuIsa { Baseline = 0, Avx2 = 1, Avx512 = 2 };
CpuIsa cpu_isa();
// "baseline" | "avx2" | "avx512": cpu_isa() by name (build reports).
const char* cpu_isa_name();

// Row-major C[m, n] = A[m, K] * B[n, K]^T for a few rows (the weight-streaming regime: B rows contiguous, each
// read once and reused from L1 by every row of A; BLAS packs B first).
void skinny_gemm_abt(int64_t m, int64_t n, int64_t K, const float* a, int64_t lda, const float* b, int64_t ldb,
                     float* c, int64_t ldc);
// Row counts [min, max] for which skinny_gemm_abt beats MKL's sgemm on this CPU: AVX2 4..8 (below 4 its 4-row
// blocks waste work, above 8 the BLAS wins back its packing cost); AVX-512 1..kSkinnyMaxRowsAvx512.
// The AVX-512 copy (skinny_gemm_avx512.cpp); call only when cpu_isa() == CpuIsa::Avx512.
void skinny_gemm_abt_avx512(int64_t m, int64_t n, int64_t K, const float* a, int64_t lda, const float* b, int64_t ldb,
                            float* c, int64_t ldc);
// The same with 2-byte weights (bf16 / fp16, widened in registers: half the bytes streamed, no fp32 copy).
void skinny_gemm_abt_avx512(int64_t m, int64_t n, int64_t K, const float* a, int64_t lda, const uint16_t* b,
                            int64_t ldb, WeightFormat format, float* c, int64_t ldc);
// dst[i] = float(src[i]) for 2-byte weights: the AVX-512 copy (call only when cpu_isa() == CpuIsa::Avx512) and the
// portable entry point that dispatches.
void widen_to_float_avx512(const uint16_t* src, int64_t n, WeightFormat format, float* dst);
void widen_to_float(const uint16_t* src, int64_t n, WeightFormat format, float* dst);
// Whether bf16 matmuls (oneDNN) have hardware support here: AVX512-BF16 or AMX-BF16, and EUREKA_FAST_CPU_ISA
// does not cap the kernels below AVX-512.
bool cpu_has_bf16_matmul();
// dst[i] = bf16(src[i]) (nearest even) with the AVX512-BF16 instruction; call only when cpu_has_bf16_matmul().
void narrow_to_bf16_avx512bf16(const float* src, int64_t n, uint16_t* dst);
// The many-rows AVX-512 GEMM (gemm_avx512.cpp), C[m, n] = A[m, K] * B[n, K]^T with B's rows contiguous (ldb >= K)
// and read in place: A is packed once (pack_a_avx512, into packed_a_floats(m, K) floats, 64-byte aligned, e.g.
// packed_a_scratch: per thread, valid until the next call on that thread) and reused for any number of weight
// matrices (gate and up). Call only when cpu_isa() == CpuIsa::Avx512; grouped_mm uses it for
// kPackedGemmMinRowsAvx512 or more rows (fewer: skinny_gemm_abt_avx512).
int64_t packed_a_floats(int64_t m, int64_t K);
float* packed_a_scratch(int64_t m, int64_t K);
void pack_a_avx512(int64_t m, int64_t K, const float* a, int64_t lda, float* packed);
// pack_a_avx512 with row i of A at x + rows[i] * ldx (a gather fused into the packing).
void pack_a_gather_avx512(int64_t m, int64_t K, const float* x, int64_t ldx, const int64_t* rows, float* packed);
void gemm_abt_packed_avx512(int64_t m, int64_t n, int64_t K, const float* packed, const float* b, int64_t ldb,
                            float* c, int64_t ldc);
constexpr int64_t kPackedGemmMinRowsAvx512 = 17;
struct SkinnyRows {
  int64_t min, max;
};
SkinnyRows skinny_rows();
constexpr int64_t kSkinnyMaxRowsAvx512 = 16;

// Per-thread scratch (64-byte aligned), grown on demand and kept; kSlot tells apart buffers a task uses at the
// same time (a buffer stays valid until the next call with the same type and slot on that thread).
template <typename T, int kSlot = 0>
T* thread_scratch(int64_t elements) {
  thread_local std::vector<char> buffer;
  const size_t bytes = static_cast<size_t>(elements) * sizeof(T) + 64;
  if (buffer.size() < bytes) buffer.resize(bytes);
  return reinterpret_cast<T*>((reinterpret_cast<uintptr_t>(buffer.data()) + 63) & ~uintptr_t(63));
}

// fused_experts' scratch for its row buffers (fused_experts.cpp), kept between calls: a fresh allocation of that size
// is mmapped and page-faulted on every call (page-fault system time was about 7% of the fp32 layer at T = 1024-4096
// on one thread). One buffer per process, shared by the fp32 and bf16 paths and used by one call at a time (a
// concurrent call, or one over kMaxCachedWorkspaceBytes, allocates its own), so a long prefill pins at most that.
constexpr int64_t kMaxCachedWorkspaceBytes = int64_t(256) << 20;
class WorkspaceLease {
 public:
  explicit WorkspaceLease(int64_t bytes);
  template <typename T>
  T* at_offset(int64_t bytes) const {
    return reinterpret_cast<T*>(static_cast<char*>(data_) + bytes);
  }

 private:
  std::unique_lock<std::mutex> lock_;
  at::Tensor own_;
  void* data_ = nullptr;
};

// fused_experts for bf16 x and bf16 row-major expert weights on a CPU with bf16 matmuls (fused_experts_bf16.cpp):
// whether it takes the layer (EUREKA_FAST_BF16_EXPERTS=0 turns it off; all-decode layers stay on the float path),
// and the layer itself from the plan (offsets[E+1], sorted_rows / inverse_rows [T*k]); T, H, I, k all > 0.
bool fused_experts_bf16_applies(const at::Tensor& x, const at::Tensor& w_gate_up, const at::Tensor& w_down,
                                const std::vector<int64_t>& offsets);
at::Tensor fused_experts_bf16(const at::Tensor& x, const at::Tensor& w_gate_up, const at::Tensor& w_down,
                              const at::Tensor& weights, const std::vector<int64_t>& offsets,
                              const std::vector<int64_t>& sorted_rows, const std::vector<int64_t>& inverse_rows,
                              int64_t k, GatedActivation act);

// In-place elementwise activations (used by stack_norm_project).
void silu_inplace(float* x, int64_t n);
void gelu_inplace(float* x, int64_t n);
void silu_inplace(double* x, int64_t n);
void gelu_inplace(double* x, int64_t n);

}  // namespace cpu
}  // namespace eureka_fast
