// moe_aux_loss on CUDA: E * sum_e mean_t(P[t,e]) * count_e / (T*k) from one histogram launch and a few ATen
// reductions (no host sync).
#include "common.cuh"

namespace eureka_fast {
namespace cuda {
namespace {

template <typename I>
__global__ void expert_histogram_kernel(const I* __restrict__ ids, int64_t n, int E, int* __restrict__ counts) {
  extern __shared__ int hist[];
  for (int e = threadIdx.x; e < E; e += blockDim.x) hist[e] = 0;
  __syncthreads();
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t e = static_cast<int64_t>(ids[i]);
    if (e >= 0 && e < E) atomicAdd(&hist[e], 1);
  }
  __syncthreads();
  for (int e = threadIdx.x; e < E; e += blockDim.x)
    if (hist[e]) atomicAdd(&counts[e], hist[e]);
}

at::Tensor moe_aux_loss_cuda(const at::Tensor& probs, const at::Tensor& ids_in) {
  TORCH_CHECK(probs.dim() == 2, "moe_aux_loss: router_probs must be [T, E]");
  c10::cuda::CUDAGuard guard(probs.device());
  const int64_t T = probs.size(0), E = probs.size(1);
  TORCH_CHECK(ids_in.dim() == 2 && ids_in.size(0) == T, "moe_aux_loss: ids must be [T = ", T, ", k], got ",
              ids_in.sizes());
  TORCH_CHECK(ids_in.size(1) >= 1 && ids_in.size(1) <= E, "moe_aux_loss: ids must have between 1 and E = ", E,
              " columns (top-k), got k = ", ids_in.size(1));
  const at::ScalarType acc = probs.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const int64_t n = ids_in.numel();
  if (T == 0 || n == 0) return probs.to(acc).sum() * 0.0;
  TORCH_CHECK(E * 4 <= 48 * 1024, "moe_aux_loss: too many experts for the CUDA histogram");
  at::Tensor ids = ids_in.contiguous();
  at::Tensor counts = at::zeros({E}, probs.options().dtype(at::kInt));
  const int threads = 256;
  const int blocks = static_cast<int>(std::min<int64_t>(ceil_div(n, threads), 4 * num_sms()));
  if (ids.scalar_type() == at::kLong) {
    expert_histogram_kernel<int64_t><<<blocks, threads, E * 4, stream()>>>(ids.data_ptr<int64_t>(), n,
                                                                            static_cast<int>(E), counts.data_ptr<int>());
  } else {
    TORCH_CHECK(ids.scalar_type() == at::kInt, "moe_aux_loss: ids must be int32 or int64");
    expert_histogram_kernel<int><<<blocks, threads, E * 4, stream()>>>(ids.data_ptr<int>(), n, static_cast<int>(E),
                                                                       counts.data_ptr<int>());
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  at::Tensor p_mean = probs.to(acc).mean(0);
  at::Tensor f = counts.to(acc) / static_cast<double>(n);
  return (p_mean * f).sum() * static_cast<double>(E);
}

}  // namespace

TORCH_LIBRARY_IMPL(eureka_fast, CUDA, m) {
  m.impl("moe_aux_loss", &moe_aux_loss_cuda);
}

}  // namespace cuda
}  // namespace eureka_fast
