// CUDA op entry points and GEMM helpers shared between translation units (fused_experts.cu composes moe_plan.cu,
// grouped_mm.cu and permute_combine.cu).
#pragma once

#include "common.cuh"

namespace eureka_fast {
namespace cuda {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> moe_plan_cuda(const at::Tensor& ids,
                                                                                      int64_t num_experts,
                                                                                      int64_t block);
at::Tensor permute_cuda(const at::Tensor& x, const at::Tensor& sorted_rows, int64_t top_k);
at::Tensor combine_cuda(const at::Tensor& y_sorted, const at::Tensor& inverse_rows, const at::Tensor& weights);
std::tuple<at::Tensor, at::Tensor> combine_backward_cuda(const at::Tensor& grad_out, const at::Tensor& y_sorted,
                                                         const at::Tensor& inverse_rows, const at::Tensor& weights);

// grouped_mm.cu: one GROUP_M grouped GEMM out[S, N or N/2] = act(A B_e^T) over the rows of each expert (offsets
// [E+1] int64 on the device), A row m read from a (or from a row gather[m] / gather_div), B_e(n, kk) =
// w[e * b_es + n * b_sn + kk * b_sk]; the regime (stream / tiled / wgmma / SIMT) is chosen from shapes among the
// allowed ones (gemm_regimes.h).
void run_group_m(const at::Tensor& a, const int64_t* gather, int64_t gather_div, int64_t S, const at::Tensor& w,
                 int64_t b_es, int64_t b_sn, int64_t b_sk, int64_t N, int64_t Kred, const at::Tensor& offsets, int E,
                 int act, at::Tensor& out, bool allow_stream);
// The weight [E, N, K] as B_e(n, kk) strides (es, sn, sk); non-unit inner strides on both sides -> contiguous copy.
at::Tensor weight_view(const at::Tensor& w, int64_t& es, int64_t& sn, int64_t& sk);

}  // namespace cuda
}  // namespace eureka_fast
