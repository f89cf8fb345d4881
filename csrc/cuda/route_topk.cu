// route_topk on CUDA: one warp per token row, scoring + selection bias + grouped top-k + renormalisation fused in
// one launch.
#include <cmath>

#include "common.cuh"

namespace eureka_fast {
namespace cuda {
namespace {

constexpr int kRouteWarps = 4;  // warps (token rows) per block

// Stable arg-max step over a warp: larger value wins, equal values go to the lower index. NaN entries are the
// "already taken" marker and never win.
template <typename A>
__device__ __forceinline__ void warp_argmax(A& v, int& idx) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    A ov = __shfl_xor_sync(kFullMask, v, o);
    int oi = __shfl_xor_sync(kFullMask, idx, o);
    bool take = (oi >= 0) && (idx < 0 || ov > v || (ov == v && oi < idx));
    if (take) {
      v = ov;
      idx = oi;
    }
  }
}

// One warp per token row. Shared memory per warp: scores[E] and choice[E] in the accumulation type, then the group
// scores / masks. Selection: k rounds of a stable warp arg-max over the not-yet-taken choice values.
template <typename T, typename A>
__global__ void route_topk_kernel(const T* __restrict__ logits, int64_t T_rows, int E, int k, bool use_softmax,
                                  bool renormalize, const A* __restrict__ bias, int n_group, int topk_group,
                                  A routed_scaling, A* __restrict__ weights_out, int* __restrict__ ids_out) {
  extern __shared__ unsigned char smem_raw[];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRouteWarps + warp;
  // per-warp slice: scores[E], choice[E], gscore[n_group], gkeep[n_group]
  const int per_warp = 2 * E + 2 * n_group;
  A* scores = reinterpret_cast<A*>(smem_raw) + static_cast<int64_t>(warp) * per_warp;
  A* choice = scores + E;
  A* gscore = choice + E;
  A* gkeep = gscore + n_group;
  if (row >= T_rows) return;  // whole warp leaves together; no block barrier below
  const T* in = logits + row * E;

  // ---- scores ----
  A mx = -INFINITY;
  for (int e = lane; e < E; e += 32) {
    A v = static_cast<A>(to_float(in[e]));
    scores[e] = v;
    mx = max(mx, v);
  }
  if (use_softmax) {
    mx = warp_max(mx);
    A sum = 0;
    for (int e = lane; e < E; e += 32) {
      A v = exp(scores[e] - mx);
      scores[e] = v;
      sum += v;
    }
    sum = warp_sum(sum);
    const A inv = A(1) / sum;
    for (int e = lane; e < E; e += 32) scores[e] *= inv;
  } else {
    for (int e = lane; e < E; e += 32) scores[e] = A(1) / (A(1) + exp(-scores[e]));
  }
  for (int e = lane; e < E; e += 32) choice[e] = bias ? scores[e] + bias[e] : scores[e];
  __syncwarp();

  // ---- grouped selection (DeepSeek-V3): keep the best topk_group groups by the sum of their top-2 choices ----
  if (n_group > 1) {
    const int gsize = E / n_group;
    for (int g = lane; g < n_group; g += 32) {
      A b1 = -INFINITY, b2 = -INFINITY;
      for (int e = g * gsize; e < (g + 1) * gsize; ++e) {
        A v = choice[e];
        if (v > b1) {
          b2 = b1;
          b1 = v;
        } else if (v > b2) {
          b2 = v;
        }
      }
      gscore[g] = gsize >= 2 ? b1 + b2 : b1;
      gkeep[g] = A(0);
    }
    __syncwarp();
    for (int r = 0; r < topk_group; ++r) {
      A bv = -INFINITY;
      int bi = -1;
      for (int g = lane; g < n_group; g += 32) {
        A v = gscore[g];
        if (gkeep[g] == A(0) && (bi < 0 || v > bv)) {  // g ascends per lane: strict > keeps the lower index
          bv = v;
          bi = g;
        }
      }
      warp_argmax(bv, bi);
      if (lane == 0 && bi >= 0) gkeep[bi] = A(1);
      __syncwarp();
    }
    for (int e = lane; e < E; e += 32)
      if (gkeep[e / gsize] == A(0)) choice[e] = -INFINITY;
    __syncwarp();
  }

  // ---- top-k: k rounds of a stable arg-max; taken entries become NaN ----
  A wsum = 0;
  A my_w = 0;  // lane j keeps the weight of slot j (k <= 32), else written directly
  int my_id = 0;
  for (int j = 0; j < k; ++j) {
    A bv = -INFINITY;
    int bi = -1;
    for (int e = lane; e < E; e += 32) {
      A v = choice[e];
      if (v == v && (bi < 0 || v > bv)) {
        bv = v;
        bi = e;
      }
    }
    warp_argmax(bv, bi);
    // bi >= 0 always when k <= E (the API checks k <= E)
    const A w = bi >= 0 ? scores[bi] : A(0);
    wsum += w;
    if (lane == 0 && bi >= 0) choice[bi] = NAN;
    __syncwarp();
    if (k <= 32) {
      if (lane == j) {
        my_w = w;
        my_id = bi;
      }
    } else if (lane == 0) {
      weights_out[row * k + j] = w;
      ids_out[row * k + j] = bi;
    }
  }
  const A scale = renormalize ? routed_scaling / (wsum + A(1e-20)) : routed_scaling;
  if (k <= 32) {
    if (lane < k) {
      weights_out[row * k + lane] = renormalize ? my_w / (wsum + A(1e-20)) * routed_scaling : my_w * routed_scaling;
      ids_out[row * k + lane] = my_id;
    }
  } else {
    __syncwarp();
    for (int j = lane; j < k; j += 32) {
      A w = weights_out[row * k + j];
      weights_out[row * k + j] = renormalize ? w / (wsum + A(1e-20)) * routed_scaling : w * scale;
    }
  }
}

std::tuple<at::Tensor, at::Tensor> route_topk_cuda(const at::Tensor& logits_in, int64_t k, c10::string_view scoring,
                                                    bool renormalize, const c10::optional<at::Tensor>& correction_bias,
                                                    int64_t n_group, int64_t topk_group, double routed_scaling) {
  TORCH_CHECK(logits_in.dim() == 2, "route_topk: logits must be [T, E], got ", logits_in.sizes());
  TORCH_CHECK(at::isFloatingType(logits_in.scalar_type()), "route_topk: logits must be floating point");
  const bool use_softmax = scoring == "softmax";
  TORCH_CHECK(use_softmax || scoring == "sigmoid", "route_topk: scoring must be 'softmax' or 'sigmoid', got '",
              std::string(scoring), "'");
  c10::cuda::CUDAGuard guard(logits_in.device());
  const int64_t T = logits_in.size(0), E = logits_in.size(1);
  TORCH_CHECK(k >= 1 && k <= E, "route_topk: need 1 <= k <= E, got k=", k, " E=", E);
  // (finite logits and correction_bias would need a device sync to check here: the Python API checks them)
  TORCH_CHECK(std::isfinite(routed_scaling), "route_topk: routed_scaling must be a finite number, got ",
              routed_scaling);
  if (n_group < 1) n_group = 1;
  TORCH_CHECK(E % n_group == 0, "route_topk: E=", E, " is not divisible by n_group=", n_group);
  TORCH_CHECK(topk_group >= 1 && topk_group <= n_group, "route_topk: need 1 <= topk_group <= n_group");
  TORCH_CHECK(n_group == 1 || topk_group * (E / n_group) >= k,
              "route_topk: topk_group groups hold fewer than k experts");
  const at::ScalarType acc = logits_in.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor weights = at::empty({T, k}, logits_in.options().dtype(acc));
  at::Tensor ids = at::empty({T, k}, logits_in.options().dtype(at::kInt));
  if (T == 0) return {weights, ids};
  at::Tensor logits = logits_in.contiguous();
  at::Tensor bias;
  if (correction_bias.has_value() && correction_bias->defined()) {
    TORCH_CHECK(correction_bias->numel() == E, "route_topk: correction_bias must have E elements");
    bias = correction_bias->to(logits.device(), acc).contiguous();
  }
  const int64_t elem = acc == at::kDouble ? 8 : 4;
  const int64_t smem = kRouteWarps * (2 * E + 2 * n_group) * elem;
  TORCH_CHECK(smem <= 200 * 1024, "route_topk: E=", E, " is too large for the CUDA kernel");
  const dim3 grid(static_cast<unsigned>(ceil_div(T, kRouteWarps)));
  EF_DISPATCH_FLOATING(logits.scalar_type(), "route_topk", [&] {
    using A = typename AccType<scalar_t>::type;
    auto kernel = route_topk_kernel<scalar_t, A>;
    if (smem > 48 * 1024) {
      C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
    }
    kernel<<<grid, kRouteWarps * 32, smem, stream()>>>(
        reinterpret_cast<const scalar_t*>(logits.data_ptr()), T, static_cast<int>(E), static_cast<int>(k), use_softmax,
        renormalize, bias.defined() ? bias.data_ptr<A>() : nullptr, static_cast<int>(n_group),
        static_cast<int>(topk_group), static_cast<A>(routed_scaling), weights.data_ptr<A>(), ids.data_ptr<int>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {weights, ids};
}

}  // namespace

TORCH_LIBRARY_IMPL(eureka_fast, CUDA, m) { m.impl("route_topk", &route_topk_cuda); }

}  // namespace cuda
}  // namespace eureka_fast
