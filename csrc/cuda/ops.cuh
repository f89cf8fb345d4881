// CUDA op entry points shared between translation units (fused_experts composes plan + grouped GEMM + combine).
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

}  // namespace cuda
}  // namespace eureka_fast
