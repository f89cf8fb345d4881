// moe_plan on CUDA: the routing plan (a stable sort of the routed rows by expert, offsets, inverse map).
//
// moe_plan is a fixed launch sequence whose buffer sizes depend on shapes only (graph-capturable):
//   * small problems (T*k <= kSmallPlanRows): ONE block does histogram, scan and scatter;
//   * large problems: three launches (per-chunk histograms -> one-block scan -> per-chunk stable scatter).
// Stability (rows of one expert in increasing row order) comes from each warp owning a contiguous chunk of rows and
// walking it in order, 32 rows at a time, with __match_any_sync ranking equal experts inside a step.
#include "ops.cuh"

namespace eureka_fast {
namespace cuda {
namespace {

constexpr int64_t kSmallPlanRows = 16384;
constexpr int kSmemBudget = 48 * 1024;

__device__ __forceinline__ unsigned lanemask_lt() {
  unsigned m;
  asm("mov.u32 %0, %%lanemask_lt;" : "=r"(m));
  return m;
}

template <typename I>
__device__ __forceinline__ int load_expert(const I* ids, int64_t row, int64_t n, int E) {
  if (row >= n) return -1;
  const int64_t e = static_cast<int64_t>(ids[row]);
  return (e >= 0 && e < E) ? static_cast<int>(e) : -1;  // out-of-range ids are dropped (the API validates ids)
}

// Histogram of rows [r0, r1) into hist[E] (shared memory, atomics).
template <typename I>
__device__ __forceinline__ void warp_histogram(const I* ids, int64_t r0, int64_t r1, int E, int* hist) {
  const int lane = threadIdx.x & 31;
  for (int64_t r = r0 + lane; r < r1; r += 32) {
    const int e = load_expert(ids, r, r1, E);
    if (e >= 0) atomicAdd(&hist[e], 1);
  }
}

// Stable scatter of rows [r0, r1): position = base[e] + (rows of e earlier in this chunk). `cursor[E]` starts at
// base and is owned by this warp.
template <typename I>
__device__ __forceinline__ void warp_scatter(const I* ids, int64_t r0, int64_t r1, int E, int* cursor,
                                             int64_t* sorted_rows, int64_t* inverse_rows) {
  const int lane = threadIdx.x & 31;
  const unsigned lt = lanemask_lt();
  for (int64_t r = r0; r < r1; r += 32) {
    const int64_t row = r + lane;
    const int e = load_expert(ids, row, r1, E);
    const unsigned peers = __match_any_sync(kFullMask, e);
    int pos = 0;
    if (e >= 0) {
      pos = cursor[e] + __popc(peers & lt);
    }
    __syncwarp();
    if (e >= 0) {
      sorted_rows[pos] = row;
      inverse_rows[row] = pos;
      if ((peers & lt) == 0) cursor[e] += __popc(peers);  // lowest lane of the group advances the cursor
    }
    __syncwarp();
  }
}

// Exclusive scan over E experts by warp 0: tot[e] -> offsets / padded offsets (int64, global) and base[e] (shared).
__device__ __forceinline__ void warp_scan_offsets(const int* tot, int E, int64_t block, int64_t* counts,
                                                  int64_t* offsets, int64_t* padded, int* base) {
  const int lane = threadIdx.x & 31;
  int64_t run = 0, prun = 0;
  for (int b = 0; b < E; b += 32) {
    const int e = b + lane;
    const int64_t c = e < E ? tot[e] : 0;
    const int64_t pc = block > 0 ? (c + block - 1) / block * block : c;
    int64_t inc = c, pinc = pc;
#pragma unroll
    for (int d = 1; d < 32; d <<= 1) {
      const int64_t v = __shfl_up_sync(kFullMask, inc, d);
      const int64_t pv = __shfl_up_sync(kFullMask, pinc, d);
      if (lane >= d) {
        inc += v;
        pinc += pv;
      }
    }
    if (e < E) {
      counts[e] = c;
      offsets[e] = run + inc - c;
      padded[e] = prun + pinc - pc;
      base[e] = static_cast<int>(run + inc - c);
    }
    run += __shfl_sync(kFullMask, inc, 31);
    prun += __shfl_sync(kFullMask, pinc, 31);
  }
  if (lane == 0) {
    offsets[E] = run;
    padded[E] = prun;
  }
}

// One block: W warps, warp w owns rows [w*chunk, (w+1)*chunk). Shared: hist[W][E] then tot[E] then base[E].
template <typename I>
__global__ void plan_small_kernel(const I* __restrict__ ids, int64_t n, int E, int64_t block, int64_t chunk,
                                  int64_t* __restrict__ counts, int64_t* __restrict__ offsets,
                                  int64_t* __restrict__ padded, int64_t* __restrict__ sorted_rows,
                                  int64_t* __restrict__ inverse_rows) {
  extern __shared__ int sm[];
  const int W = blockDim.x >> 5, warp = threadIdx.x >> 5;
  int* hist = sm;               // [W][E]
  int* tot = sm + W * E;        // [E]
  int* base = tot + E;          // [E]
  for (int i = threadIdx.x; i < W * E; i += blockDim.x) hist[i] = 0;
  __syncthreads();
  const int64_t r0 = min(n, warp * chunk), r1 = min(n, (warp + 1) * chunk);
  warp_histogram(ids, r0, r1, E, hist + warp * E);
  __syncthreads();
  // per expert: exclusive prefix over warps (in place), total
  for (int e = threadIdx.x; e < E; e += blockDim.x) {
    int run = 0;
    for (int w = 0; w < W; ++w) {
      const int v = hist[w * E + e];
      hist[w * E + e] = run;
      run += v;
    }
    tot[e] = run;
  }
  __syncthreads();
  if (warp == 0) warp_scan_offsets(tot, E, block, counts, offsets, padded, base);
  __syncthreads();
  for (int i = threadIdx.x; i < W * E; i += blockDim.x) hist[i] += base[i % E];
  __syncthreads();
  warp_scatter(ids, r0, r1, E, hist + warp * E, sorted_rows, inverse_rows);
}

// Large path, launch 1: chunk c (one warp) -> chunk_counts[c][E].
template <typename I>
__global__ void plan_hist_kernel(const I* __restrict__ ids, int64_t n, int E, int64_t chunk, int64_t nchunks,
                                 int* __restrict__ chunk_counts) {
  extern __shared__ int sm[];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * (blockDim.x >> 5) + warp;
  int* hist = sm + warp * E;
  for (int e = lane; e < E; e += 32) hist[e] = 0;
  __syncwarp();
  if (c < nchunks) {
    const int64_t r0 = c * chunk, r1 = min(n, r0 + chunk);
    warp_histogram(ids, r0, r1, E, hist);
    __syncwarp();
    for (int e = lane; e < E; e += 32) chunk_counts[c * E + e] = hist[e];
  }
}

// Large path, launch 2 (one block): chunk_counts -> exclusive prefix over chunks (in place, + expert base), offsets.
__global__ void plan_scan_kernel(int* __restrict__ chunk_counts, int64_t nchunks, int E, int64_t block,
                                 int64_t* __restrict__ counts, int64_t* __restrict__ offsets,
                                 int64_t* __restrict__ padded) {
  extern __shared__ int sm[];
  int* tot = sm;
  int* base = sm + E;
  for (int e = threadIdx.x; e < E; e += blockDim.x) {
    int run = 0;
    for (int64_t c = 0; c < nchunks; ++c) {
      const int v = chunk_counts[c * E + e];
      chunk_counts[c * E + e] = run;
      run += v;
    }
    tot[e] = run;
  }
  __syncthreads();
  if (threadIdx.x < 32) warp_scan_offsets(tot, E, block, counts, offsets, padded, base);
  __syncthreads();
  for (int e = threadIdx.x; e < E; e += blockDim.x) {
    const int b = base[e];
    for (int64_t c = 0; c < nchunks; ++c) chunk_counts[c * E + e] += b;
  }
}

// Large path, launch 3: chunk c (one warp) scatters its rows from cursor = chunk_counts[c][*].
template <typename I>
__global__ void plan_scatter_kernel(const I* __restrict__ ids, int64_t n, int E, int64_t chunk, int64_t nchunks,
                                    const int* __restrict__ chunk_counts, int64_t* __restrict__ sorted_rows,
                                    int64_t* __restrict__ inverse_rows) {
  extern __shared__ int sm[];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * (blockDim.x >> 5) + warp;
  if (c >= nchunks) return;
  int* cursor = sm + warp * E;
  for (int e = lane; e < E; e += 32) cursor[e] = chunk_counts[c * E + e];
  __syncwarp();
  const int64_t r0 = c * chunk, r1 = min(n, r0 + chunk);
  warp_scatter(ids, r0, r1, E, cursor, sorted_rows, inverse_rows);
}

template <typename I>
void launch_plan(const at::Tensor& ids, int64_t n, int E, int64_t block, at::Tensor& counts, at::Tensor& offsets,
                 at::Tensor& padded, at::Tensor& sorted_rows, at::Tensor& inverse_rows) {
  const I* idp = ids.data_ptr<I>();
  if (n <= kSmallPlanRows) {
    const int64_t fixed = 2 * E * 4;
    int W = static_cast<int>(std::min<int64_t>(32, (kSmemBudget - fixed) / (4 * E)));
    if (W < 1) W = 1;
    // small n: fewer warps so each chunk spans several 32-row steps only when it must
    W = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(W, ceil_div(n, 32))));
    const int64_t chunk = ceil_div(ceil_div(n, W), 32) * 32;
    const int64_t smem = (static_cast<int64_t>(W) * E + 2 * E) * 4;
    plan_small_kernel<I><<<1, W * 32, smem, stream()>>>(idp, n, E, block, std::max<int64_t>(chunk, 32),
                                                         counts.data_ptr<int64_t>(), offsets.data_ptr<int64_t>(),
                                                         padded.data_ptr<int64_t>(), sorted_rows.data_ptr<int64_t>(),
                                                         inverse_rows.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  // chunk size: at least 1024 rows, at most ~512 chunks so the scan stays short
  const int64_t chunk = std::max<int64_t>(1024, ceil_div(ceil_div(n, 512), 32) * 32);
  const int64_t nchunks = ceil_div(n, chunk);
  const int wpb = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(4, kSmemBudget / (4 * E))));
  at::Tensor chunk_counts = at::empty({nchunks, E}, ids.options().dtype(at::kInt));
  const unsigned blocks = static_cast<unsigned>(ceil_div(nchunks, wpb));
  plan_hist_kernel<I><<<blocks, wpb * 32, wpb * E * 4, stream()>>>(idp, n, E, chunk, nchunks,
                                                                    chunk_counts.data_ptr<int>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  plan_scan_kernel<<<1, 1024, 2 * E * 4, stream()>>>(chunk_counts.data_ptr<int>(), nchunks, E, block,
                                                      counts.data_ptr<int64_t>(), offsets.data_ptr<int64_t>(),
                                                      padded.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  plan_scatter_kernel<I><<<blocks, wpb * 32, wpb * E * 4, stream()>>>(idp, n, E, chunk, nchunks,
                                                                       chunk_counts.data_ptr<int>(),
                                                                       sorted_rows.data_ptr<int64_t>(),
                                                                       inverse_rows.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

// Declared in ops.cuh: fused_experts reuses it.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> moe_plan_cuda(const at::Tensor& ids_in,
                                                                                      int64_t num_experts,
                                                                                      int64_t block) {
  TORCH_CHECK(num_experts >= 1, "moe_plan: num_experts must be >= 1");
  TORCH_CHECK(num_experts * 16 <= kSmemBudget, "moe_plan: num_experts=", num_experts, " too large for CUDA");
  TORCH_CHECK(block >= 0, "moe_plan: block must be >= 0");
  TORCH_CHECK(ids_in.dim() == 2 && ids_in.size(1) >= 1 && ids_in.size(1) <= num_experts,
              "moe_plan: ids must be [T, k] with 1 <= k <= num_experts = ", num_experts, ", got ", ids_in.sizes());
  c10::cuda::CUDAGuard guard(ids_in.device());
  at::Tensor ids = ids_in.contiguous();
  const int64_t n = ids.numel();
  TORCH_CHECK(n < (int64_t(1) << 31) - 1, "moe_plan: T*k must fit in int32");
  auto opts = ids.options().dtype(at::kLong);
  at::Tensor counts = at::empty({num_experts}, opts);
  at::Tensor offsets = at::empty({num_experts + 1}, opts);
  at::Tensor padded = at::empty({num_experts + 1}, opts);
  at::Tensor sorted_rows = at::empty({n}, opts);
  at::Tensor inverse_rows = at::empty({n}, opts);
  const int E = static_cast<int>(num_experts);
  if (ids.scalar_type() == at::kLong) {
    launch_plan<int64_t>(ids, n, E, block, counts, offsets, padded, sorted_rows, inverse_rows);
  } else {
    TORCH_CHECK(ids.scalar_type() == at::kInt, "moe_plan: ids must be int32 or int64, got ", ids.scalar_type());
    launch_plan<int>(ids, n, E, block, counts, offsets, padded, sorted_rows, inverse_rows);
  }
  return {counts, offsets, padded, sorted_rows, inverse_rows};
}

TORCH_LIBRARY_IMPL(eureka_fast, CUDA, m) { m.impl("moe_plan", &moe_plan_cuda); }

}  // namespace cuda
}  // namespace eureka_fast
