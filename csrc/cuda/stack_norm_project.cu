// stack_norm_project on CUDA: one fused kernel does the frame stacking (an index remap, never materialised),
// length masking, mean pooling and the LayerNorm / RMSNorm, one block per output row, statistics in fp32 (fp64 for
// double). The projections run on cuBLAS through ATen (tensor cores for bf16/fp16), the activation through ATen.
#include "common.cuh"

namespace eureka_fast {
namespace cuda {
namespace {

enum Norm : int { kNormNone = 0, kNormLayer = 1, kNormRms = 2 };

template <typename T>
__global__ void stack_norm_kernel(const T* __restrict__ x, int64_t B, int64_t Tn, int64_t D, int64_t k,
                                  const int64_t* __restrict__ lengths, bool pool_mean, int norm,
                                  const typename AccType<T>::type* __restrict__ nw,
                                  const typename AccType<T>::type* __restrict__ nb, double eps, T* __restrict__ out,
                                  bool* __restrict__ row_valid, int64_t T_out) {
  using Acc = typename AccType<T>::type;
  extern __shared__ unsigned char smem_raw[];
  Acc* row = reinterpret_cast<Acc*>(smem_raw);
  __shared__ Acc scratch[32];
  const int64_t orow = blockIdx.x;
  const int64_t b = orow / T_out, t = orow - b * T_out;
  const int64_t len = lengths ? lengths[b] : Tn;
  const int64_t C = pool_mean ? D : k * D;
  const T* xb = x + b * Tn * D;
  int64_t n_valid = 0;
  for (int64_t j = 0; j < k; ++j) n_valid += (t * k + j < len) ? 1 : 0;
  // gather (stack or mean) into shared memory, masked
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
    Acc v = 0;
    if (pool_mean) {
      for (int64_t j = 0; j < k; ++j) {
        const int64_t f = t * k + j;
        if (f < len && f < Tn) v += static_cast<Acc>(to_float(xb[f * D + c]));
      }
      v /= static_cast<Acc>(n_valid > 0 ? n_valid : 1);
    } else {
      const int64_t j = c / D, d = c - j * D, f = t * k + j;
      if (f < len && f < Tn) v = static_cast<Acc>(to_float(xb[f * D + d]));
    }
    row[c] = v;
  }
  __syncthreads();
  Acc shift = 0, scale = 1;
  if (norm == kNormLayer) {
    Acc s = 0;
    for (int64_t c = threadIdx.x; c < C; c += blockDim.x) s += row[c];
    const Acc mean = block_sum(s, scratch) / static_cast<Acc>(C);
    Acc q = 0;
    for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
      const Acc dlt = row[c] - mean;
      q += dlt * dlt;
    }
    const Acc var = block_sum(q, scratch) / static_cast<Acc>(C);
    shift = mean;
    scale = Acc(1) / sqrt(var + static_cast<Acc>(eps));
  } else if (norm == kNormRms) {
    Acc q = 0;
    for (int64_t c = threadIdx.x; c < C; c += blockDim.x) q += row[c] * row[c];
    const Acc ms = block_sum(q, scratch) / static_cast<Acc>(C);
    scale = Acc(1) / sqrt(ms + static_cast<Acc>(eps));
  }
  T* o = out + orow * C;
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
    Acc v = (row[c] - shift) * scale;
    if (norm != kNormNone && nw) v *= nw[c];
    if (norm == kNormLayer && nb) v += nb[c];
    o[c] = from_acc<T>(v);
  }
  if (threadIdx.x == 0) row_valid[orow] = n_valid > 0;
}

at::Tensor opt_to(const c10::optional<at::Tensor>& t, at::ScalarType dt, const at::Device& dev) {
  if (!t.has_value() || !t->defined()) return at::Tensor();
  return t->to(dev, dt).contiguous();
}

at::Tensor stack_norm_project_cuda(const at::Tensor& x_in, int64_t k, const c10::optional<at::Tensor>& lengths_in,
                                   c10::string_view norm_s, const c10::optional<at::Tensor>& norm_weight,
                                   const c10::optional<at::Tensor>& norm_bias, const c10::optional<at::Tensor>& w1_in,
                                   const c10::optional<at::Tensor>& b1_in, c10::string_view activation_s,
                                   const c10::optional<at::Tensor>& w2_in, const c10::optional<at::Tensor>& b2_in,
                                   double eps, c10::string_view pool_s) {
  TORCH_CHECK(x_in.dim() == 3, "stack_norm_project: x must be [B, T, D], got ", x_in.sizes());
  TORCH_CHECK(k >= 1, "stack_norm_project: k must be >= 1");
  c10::cuda::CUDAGuard guard(x_in.device());
  const std::string norm_str(norm_s), act(activation_s), pool(pool_s);
  int norm;
  if (norm_str == "layer") norm = kNormLayer;
  else if (norm_str == "rms") norm = kNormRms;
  else if (norm_str == "none" || norm_str.empty()) norm = kNormNone;
  else TORCH_CHECK(false, "stack_norm_project: norm must be 'layer', 'rms' or 'none', got '", norm_str, "'");
  TORCH_CHECK(pool == "stack" || pool == "mean", "stack_norm_project: pool must be 'stack' or 'mean'");
  TORCH_CHECK(act == "none" || act.empty() || act == "silu" || act == "gelu" || act == "swiglu",
              "stack_norm_project: unknown activation '", act, "'");
  const bool pool_mean = pool == "mean";
  const auto dt = x_in.scalar_type();
  TORCH_CHECK(at::isFloatingType(dt), "stack_norm_project: x must be floating point");
  const at::ScalarType acc = dt == at::kDouble ? at::kDouble : at::kFloat;
  const int64_t B = x_in.size(0), Tn = x_in.size(1), D = x_in.size(2);
  const int64_t T_out = ceil_div(Tn, k);
  const int64_t C = pool_mean ? D : k * D;
  const auto dev = x_in.device();
  at::Tensor x = x_in.contiguous();
  at::Tensor lengths;
  if (lengths_in.has_value() && lengths_in->defined()) {
    TORCH_CHECK(lengths_in->numel() == B, "stack_norm_project: lengths must have B elements");
    lengths = lengths_in->to(dev, at::kLong).contiguous();
  }
  at::Tensor nw = norm != kNormNone ? opt_to(norm_weight, acc, dev) : at::Tensor();
  at::Tensor nb = norm == kNormLayer ? opt_to(norm_bias, acc, dev) : at::Tensor();
  if (nw.defined()) TORCH_CHECK(nw.numel() == C, "stack_norm_project: norm_weight must have ", C, " elements");
  if (nb.defined()) TORCH_CHECK(nb.numel() == C, "stack_norm_project: norm_bias must have ", C, " elements");

  at::Tensor h = at::empty({B * T_out, C}, x.options());
  at::Tensor row_valid = at::empty({B * T_out}, x.options().dtype(at::kBool));
  if (B * T_out > 0 && C > 0) {
    const int64_t smem = C * (acc == at::kDouble ? 8 : 4);
    TORCH_CHECK(smem <= 200 * 1024, "stack_norm_project: row of ", C, " channels is too wide for the CUDA kernel");
    TORCH_CHECK(B * T_out <= 0x7fffffffLL, "stack_norm_project: too many output rows");
    EF_DISPATCH_FLOATING(dt, "stack_norm_project", [&] {
      using A = typename AccType<scalar_t>::type;
      auto kernel = stack_norm_kernel<scalar_t>;
      if (smem > 48 * 1024) {
        C10_CUDA_CHECK(
            cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
      }
      kernel<<<static_cast<unsigned>(B * T_out), 256, smem, stream()>>>(
          reinterpret_cast<const scalar_t*>(x.data_ptr()), B, Tn, D, k,
          lengths.defined() ? lengths.data_ptr<int64_t>() : nullptr, pool_mean, norm,
          nw.defined() ? nw.data_ptr<A>() : nullptr, nb.defined() ? nb.data_ptr<A>() : nullptr, eps,
          reinterpret_cast<scalar_t*>(h.data_ptr()), row_valid.data_ptr<bool>(), T_out);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  } else if (B * T_out > 0) {
    row_valid.fill_(true);
  }
  at::Tensor w1 = opt_to(w1_in, dt, dev), b1 = opt_to(b1_in, dt, dev);
  at::Tensor w2 = opt_to(w2_in, dt, dev), b2 = opt_to(b2_in, dt, dev);
  if (w1.defined()) h = b1.defined() ? at::addmm(b1, h, w1.t()) : at::mm(h, w1.t());
  if (act == "silu") {
    h = at::silu(h);
  } else if (act == "gelu") {
    h = at::gelu(h);
  } else if (act == "swiglu") {
    const int64_t half = h.size(1) / 2;
    h = at::silu(h.narrow(1, 0, half)) * h.narrow(1, half, half);
  }
  if (w2.defined()) h = b2.defined() ? at::addmm(b2, h, w2.t()) : at::mm(h, w2.t());
  h = h.masked_fill(row_valid.logical_not().unsqueeze(1), 0);
  return h.view({B, T_out, h.size(1)});
}

}  // namespace

TORCH_LIBRARY_IMPL(eureka_fast, CUDA, m) { m.impl("stack_norm_project", &stack_norm_project_cuda); }

}  // namespace cuda
}  // namespace eureka_fast
