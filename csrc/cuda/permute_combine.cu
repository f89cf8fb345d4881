// permute, combine and combine_backward on CUDA: the gather of token rows into the plan's expert order and the
// deterministic weighted sum of each token's k expert rows (slot order, fp32) with its backward.
#include "ops.cuh"

namespace eureka_fast {
namespace cuda {
namespace {

// ---------------------------------------------------------------------------------------------------------------
// permute: out[i, :] = x[sorted_rows[i] / k, :]  (raw bytes, widest vector the row size and alignment allow)
// ---------------------------------------------------------------------------------------------------------------
template <typename V>
__global__ void gather_rows_kernel(const V* __restrict__ x, int64_t x_row_vecs, const int64_t* __restrict__ rows,
                                   int64_t div, int64_t n_out, int64_t vecs, V* __restrict__ out) {
  const int64_t total = n_out * vecs;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / vecs, v = i - r * vecs;
    const int64_t src = rows[r] / div;
    out[i] = x[src * x_row_vecs + v];
  }
}

template <typename V>
void launch_gather(const at::Tensor& x, const at::Tensor& rows, int64_t div, at::Tensor& out) {
  const int64_t row_bytes = x.size(1) * x.element_size();
  const int64_t vecs = row_bytes / static_cast<int64_t>(sizeof(V));
  const int64_t x_row_vecs = x.stride(0) * x.element_size() / static_cast<int64_t>(sizeof(V));
  const int64_t n_out = out.size(0);
  const int64_t total = n_out * vecs;
  if (total == 0) return;
  const int threads = 256;
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>(ceil_div(total, threads), 16LL * num_sms()));
  gather_rows_kernel<V><<<blocks, threads, 0, stream()>>>(reinterpret_cast<const V*>(x.data_ptr()), x_row_vecs,
                                                          rows.data_ptr<int64_t>(), div, n_out, vecs,
                                                          reinterpret_cast<V*>(out.data_ptr()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Picks the widest of 16/8/4/2/1-byte units that divides the row size, the row stride and the base addresses.
void gather_rows(const at::Tensor& x, const at::Tensor& rows, int64_t div, at::Tensor& out) {
  const int64_t es = x.element_size();
  const int64_t row_bytes = x.size(1) * es, stride_bytes = x.stride(0) * es;
  const uintptr_t addr = reinterpret_cast<uintptr_t>(x.data_ptr()) | reinterpret_cast<uintptr_t>(out.data_ptr());
  auto fits = [&](int64_t w) { return row_bytes % w == 0 && stride_bytes % w == 0 && addr % w == 0; };
  if (fits(16)) return launch_gather<uint4>(x, rows, div, out);
  if (fits(8)) return launch_gather<uint2>(x, rows, div, out);
  if (fits(4)) return launch_gather<uint32_t>(x, rows, div, out);
  if (fits(2)) return launch_gather<uint16_t>(x, rows, div, out);
  return launch_gather<uint8_t>(x, rows, div, out);
}

// ---------------------------------------------------------------------------------------------------------------
// combine: out[t, h] = sum_j w[t, j] * y[inv[t*k + j], h], slot order, accumulation type; VEC elements per thread.
// ---------------------------------------------------------------------------------------------------------------
template <typename T, typename W, int VEC>
__global__ void combine_kernel(const T* __restrict__ y, const int64_t* __restrict__ inv, const W* __restrict__ w,
                               int64_t Tn, int k, int64_t H, T* __restrict__ out) {
  using A = typename AccType<T>::type;
  const int64_t hv = H / VEC;
  const int64_t total = Tn * hv;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t t = i / hv, c = (i - t * hv) * VEC;
    A acc[VEC];
#pragma unroll
    for (int v = 0; v < VEC; ++v) acc[v] = A(0);
    for (int j = 0; j < k; ++j) {
      const int64_t src = inv[t * k + j];
      const A wj = static_cast<A>(w[t * k + j]);
      const T* yr = y + src * H + c;
      if constexpr (VEC == 1) {
        acc[0] += wj * static_cast<A>(to_float(yr[0]));
      } else {
        union {
          uint4 u;
          T e[VEC];
        } pack;
        pack.u = *reinterpret_cast<const uint4*>(yr);
#pragma unroll
        for (int v = 0; v < VEC; ++v) acc[v] += wj * static_cast<A>(to_float(pack.e[v]));
      }
    }
    if constexpr (VEC == 1) {
      out[t * H + c] = from_acc<T>(acc[0]);
    } else {
      union {
        uint4 u;
        T e[VEC];
      } pack;
#pragma unroll
      for (int v = 0; v < VEC; ++v) pack.e[v] = from_acc<T>(acc[v]);
      *reinterpret_cast<uint4*>(out + t * H + c) = pack.u;
    }
  }
}

// combine_backward: one block per token. grad_y[inv[t*k+j]] = w[t,j] * g[t]; grad_w[t,j] = <g[t], y[inv[t*k+j]]>.
template <typename T, typename W>
__global__ void combine_backward_kernel(const T* __restrict__ g, const T* __restrict__ y,
                                        const int64_t* __restrict__ inv, const W* __restrict__ w, int64_t Tn, int k,
                                        int64_t H, T* __restrict__ gy, W* __restrict__ gw) {
  using A = typename AccType<T>::type;
  __shared__ A scratch[32];
  const int64_t t = blockIdx.x;
  const T* gr = g + t * H;
  for (int j = 0; j < k; ++j) {
    const int64_t dst = inv[t * k + j];
    const A wj = static_cast<A>(w[t * k + j]);
    const T* yr = y + dst * H;
    T* gyr = gy + dst * H;
    A dot = 0;
    for (int64_t h = threadIdx.x; h < H; h += blockDim.x) {
      const A gv = static_cast<A>(to_float(gr[h]));
      dot += gv * static_cast<A>(to_float(yr[h]));
      gyr[h] = from_acc<T>(wj * gv);
    }
    dot = block_sum(dot, scratch);
    if (threadIdx.x == 0) gw[t * k + j] = static_cast<W>(dot);
  }
}

__global__ void zero_rows_kernel(unsigned char* __restrict__ base, int64_t row_bytes, int64_t r0, int64_t r1) {
  const int64_t total = (r1 - r0) * row_bytes;
  unsigned char* p = base + r0 * row_bytes;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    p[i] = 0;
}

}  // namespace

// Op entry points (declared in ops.cuh: fused_experts reuses them)
at::Tensor permute_cuda(const at::Tensor& x_in, const at::Tensor& sorted_rows_in, int64_t top_k) {
  TORCH_CHECK(x_in.dim() == 2, "permute: x must be [T, H]");
  TORCH_CHECK(top_k >= 1, "permute: top_k must be >= 1");
  c10::cuda::CUDAGuard guard(x_in.device());
  at::Tensor x = x_in.stride(1) == 1 ? x_in : x_in.contiguous();
  at::Tensor rows = sorted_rows_in.to(at::kLong).contiguous();
  at::Tensor out = at::empty({rows.numel(), x.size(1)}, x.options());
  if (rows.numel() > 0 && x.size(1) > 0) gather_rows(x, rows, top_k, out);
  return out;
}

at::Tensor combine_cuda(const at::Tensor& y_in, const at::Tensor& inv_in, const at::Tensor& weights_in) {
  TORCH_CHECK(y_in.dim() == 2 && weights_in.dim() == 2, "combine: y_sorted [S, H], weights [T, k]");
  c10::cuda::CUDAGuard guard(y_in.device());
  const int64_t Tn = weights_in.size(0), k = weights_in.size(1), H = y_in.size(1);
  TORCH_CHECK(inv_in.numel() == Tn * k, "combine: inverse_rows must have T*k elements");
  at::Tensor out = at::empty({Tn, H}, y_in.options());
  if (Tn == 0 || H == 0) return out;
  if (k == 0) return out.zero_();
  at::Tensor y = y_in.contiguous();
  at::Tensor inv = inv_in.to(at::kLong).contiguous();
  const bool w64 = weights_in.scalar_type() == at::kDouble;
  at::Tensor w = weights_in.to(w64 ? at::kDouble : at::kFloat).contiguous();
  EF_DISPATCH_FLOATING(y.scalar_type(), "combine", [&] {
    constexpr int V = 16 / sizeof(scalar_t);
    const bool vec = (H % V == 0) && aligned16(y.data_ptr()) && aligned16(out.data_ptr());
    const int64_t total = Tn * (vec ? H / V : H);
    const int threads = 256;
    const unsigned blocks = static_cast<unsigned>(std::min<int64_t>(ceil_div(total, threads), 16LL * num_sms()));
    auto launch = [&](auto wtag) {
      using W = decltype(wtag);
      if (vec) {
        combine_kernel<scalar_t, W, V><<<blocks, threads, 0, stream()>>>(
            reinterpret_cast<const scalar_t*>(y.data_ptr()), inv.data_ptr<int64_t>(), w.data_ptr<W>(), Tn,
            static_cast<int>(k), H, reinterpret_cast<scalar_t*>(out.data_ptr()));
      } else {
        combine_kernel<scalar_t, W, 1><<<blocks, threads, 0, stream()>>>(
            reinterpret_cast<const scalar_t*>(y.data_ptr()), inv.data_ptr<int64_t>(), w.data_ptr<W>(), Tn,
            static_cast<int>(k), H, reinterpret_cast<scalar_t*>(out.data_ptr()));
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (w64) {
      launch(double{});
    } else {
      launch(float{});
    }
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> combine_backward_cuda(const at::Tensor& grad_in, const at::Tensor& y_in,
                                                         const at::Tensor& inv_in, const at::Tensor& weights_in) {
  TORCH_CHECK(y_in.dim() == 2 && weights_in.dim() == 2, "combine_backward: y_sorted [S, H], weights [T, k]");
  c10::cuda::CUDAGuard guard(y_in.device());
  const int64_t Tn = weights_in.size(0), k = weights_in.size(1), S = y_in.size(0), H = y_in.size(1);
  TORCH_CHECK(inv_in.numel() == Tn * k && S >= Tn * k, "combine_backward: inverse_rows must have T*k <= S elements");
  at::Tensor y = y_in.contiguous();
  at::Tensor g = grad_in.to(y.scalar_type()).contiguous();
  at::Tensor inv = inv_in.to(at::kLong).contiguous();
  const bool w64 = weights_in.scalar_type() == at::kDouble;
  at::Tensor w = weights_in.to(w64 ? at::kDouble : at::kFloat).contiguous();
  at::Tensor gy = at::empty({S, H}, y.options());
  at::Tensor gw = at::empty({Tn, k}, w.options());
  if (S > Tn * k && H > 0) {
    const int64_t total = (S - Tn * k) * H * gy.element_size();
    const unsigned blocks = static_cast<unsigned>(std::min<int64_t>(ceil_div(total, 256), 8LL * num_sms()));
    zero_rows_kernel<<<blocks, 256, 0, stream()>>>(reinterpret_cast<unsigned char*>(gy.data_ptr()),
                                                   H * gy.element_size(), Tn * k, S);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if (Tn == 0 || k == 0) return {gy, gw};
  if (H == 0) return {gy, gw.zero_()};
  EF_DISPATCH_FLOATING(y.scalar_type(), "combine_backward", [&] {
    const int threads = H >= 1024 ? 256 : 128;
    auto launch = [&](auto wtag) {
      using W = decltype(wtag);
      combine_backward_kernel<scalar_t, W><<<static_cast<unsigned>(Tn), threads, 0, stream()>>>(
          reinterpret_cast<const scalar_t*>(g.data_ptr()), reinterpret_cast<const scalar_t*>(y.data_ptr()),
          inv.data_ptr<int64_t>(), w.data_ptr<W>(), Tn, static_cast<int>(k), H,
          reinterpret_cast<scalar_t*>(gy.data_ptr()), gw.data_ptr<W>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (w64) {
      launch(double{});
    } else {
      launch(float{});
    }
  });
  return {gy, gw};
}

TORCH_LIBRARY_IMPL(eureka_fast, CUDA, m) {
  m.impl("permute", &permute_cuda);
  m.impl("combine", &combine_cuda);
  m.impl("combine_backward", &combine_backward_cuda);
}

}  // namespace cuda
}  // namespace eureka_fast
