// permute, combine and combine_backward on the CPU: the gather of token rows into the plan's expert order and the
// deterministic weighted sum of each token's k expert rows (slot order) with its backward.
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <cstring>

#include "cpu/common.h"
#include "cpu/moe_cpu.h"

namespace eureka_fast {
namespace cpu {
namespace {

// Rows as int64 indices, each in [0, limit).
at::Tensor checked_rows(const at::Tensor& rows, int64_t limit, const char* name) {
  check_cpu(rows, name);
  TORCH_CHECK(rows.dim() == 1, name, " must be 1-D, got shape ", rows.sizes());
  TORCH_CHECK(!at::isFloatingType(rows.scalar_type()) && rows.scalar_type() != at::kBool, name,
              " must be an integer tensor, got ", rows.scalar_type());
  at::Tensor r = rows.to(at::kLong).contiguous();
  const int64_t* p = r.data_ptr<int64_t>();
  for (int64_t i = 0; i < r.numel(); ++i)
    TORCH_CHECK(p[i] >= 0 && p[i] < limit, name, " must lie in [0, ", limit, "), found ", p[i], " at position ", i);
  return r;
}

at::Tensor permute_cpu(const at::Tensor& x, const at::Tensor& sorted_rows, int64_t top_k) {
  check_cpu(x, "x");
  check_dim(x, 2, "x");
  TORCH_CHECK(top_k >= 1, "top_k must be >= 1, got ", top_k);
  const int64_t T = x.size(0), H = x.size(1);
  at::Tensor rows = checked_rows(sorted_rows, T * top_k, "sorted_rows");
  const int64_t S = rows.numel();
  TORCH_CHECK(S == T * top_k, "sorted_rows must have T*top_k = ", T * top_k, " entries (one per routed row of x), got ",
              S);
  at::Tensor xc = x.stride(1) == 1 || H <= 1 ? x : x.contiguous();
  at::Tensor out = empty_large_output({S, H}, x.options());
  if (S == 0 || H == 0) return out;
  const int64_t elem = xc.element_size(), src_stride = xc.stride(0) * elem, row_bytes = H * elem;
  const char* src = static_cast<const char*>(xc.data_ptr());
  char* dst = static_cast<char*>(out.data_ptr());
  const int64_t* rp = rows.data_ptr<int64_t>();
  at::parallel_for(0, S, std::max<int64_t>(1, 16384 / std::max<int64_t>(row_bytes, 1)), [&](int64_t s0, int64_t s1) {
    for (int64_t s = s0; s < s1; ++s) std::memcpy(dst + s * row_bytes, src + (rp[s] / top_k) * src_stride, row_bytes);
  });
  return out;
}

}  // namespace

// out[t] = sum_j w[t,j] * y[inverse_rows[t*k+j]], accumulated in acc_t in slot order.
template <typename scalar_t, typename acc_t>
void combine_rows(const scalar_t* y, int64_t y_stride, const int64_t* inverse_rows, const acc_t* w, int64_t T,
                  int64_t k, int64_t H, scalar_t* out) {
  at::parallel_for(0, T, std::max<int64_t>(1, 4096 / std::max<int64_t>(H * k, 1)), [&](int64_t t0, int64_t t1) {
    if constexpr (std::is_same_v<scalar_t, float> && std::is_same_v<acc_t, float>) {
      static const bool avx512 = cpu_isa() == CpuIsa::Avx512;
      if (avx512) return combine_rows_avx512(y, y_stride, inverse_rows, w, t0, t1, k, H, out);
    }
    std::vector<acc_t> acc(H);
    for (int64_t t = t0; t < t1; ++t) {
      std::fill(acc.begin(), acc.end(), acc_t(0));
      for (int64_t j = 0; j < k; ++j) {
        const acc_t wj = w[t * k + j];
        const scalar_t* src = y + inverse_rows[t * k + j] * y_stride;
        for (int64_t h = 0; h < H; ++h) acc[h] += wj * static_cast<acc_t>(src[h]);
      }
      scalar_t* dst = out + t * H;
      for (int64_t h = 0; h < H; ++h) dst[h] = static_cast<scalar_t>(acc[h]);
    }
  });
}
template void combine_rows<float, float>(const float*, int64_t, const int64_t*, const float*, int64_t, int64_t,
                                         int64_t, float*);
template void combine_rows<double, double>(const double*, int64_t, const int64_t*, const double*, int64_t, int64_t,
                                           int64_t, double*);
template void combine_rows<c10::BFloat16, float>(const c10::BFloat16*, int64_t, const int64_t*, const float*, int64_t,
                                                 int64_t, int64_t, c10::BFloat16*);
template void combine_rows<c10::Half, float>(const c10::Half*, int64_t, const int64_t*, const float*, int64_t, int64_t,
                                             int64_t, c10::Half*);

namespace {

at::Tensor combine_cpu(const at::Tensor& y_sorted, const at::Tensor& inverse_rows, const at::Tensor& weights) {
  check_float_tensor(y_sorted, 2, "y_sorted");
  check_float_tensor(weights, 2, "weights");
  const int64_t T = weights.size(0), k = weights.size(1), S = y_sorted.size(0), H = y_sorted.size(1);
  TORCH_CHECK(k >= 1, "weights must have shape [T, k] with k >= 1, got ", weights.sizes());
  at::Tensor inv = checked_rows(inverse_rows, S, "inverse_rows");
  TORCH_CHECK(inv.numel() == T * k, "inverse_rows must have T*k = ", T * k, " entries, got ", inv.numel());
  const at::ScalarType cd = compute_dtype(y_sorted.scalar_type());
  at::Tensor out = at::empty({T, H}, y_sorted.options());
  if (T == 0 || H == 0) return out;
  at::Tensor w = weights.to(cd).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, y_sorted.scalar_type(), "combine", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    using w_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    at::Tensor y = y_sorted.stride(1) == 1 ? y_sorted : y_sorted.contiguous();
    const scalar_t* yp = y.data_ptr<scalar_t>();
    const int64_t ys = y.stride(0);
    const int64_t* ip = inv.data_ptr<int64_t>();
    const w_t* wp = w.data_ptr<w_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    static_assert(std::is_same_v<acc_t, w_t>, "combine_rows takes the weights in the accumulation type");
    combine_rows<scalar_t, acc_t>(yp, ys, ip, wp, T, k, H, op);
  });
  return out;
}

// grad_y[inverse_rows[t*k+j]] = w[t,j] * grad_out[t];  grad_w[t,j] = <grad_out[t], y[inverse_rows[t*k+j]]>.
std::tuple<at::Tensor, at::Tensor> combine_backward_cpu(const at::Tensor& grad_out, const at::Tensor& y_sorted,
                                                        const at::Tensor& inverse_rows, const at::Tensor& weights) {
  check_cpu(grad_out, "grad_out");
  check_dim(grad_out, 2, "grad_out");
  check_cpu(y_sorted, "y_sorted");
  check_dim(y_sorted, 2, "y_sorted");
  check_cpu(weights, "weights");
  check_dim(weights, 2, "weights");
  const int64_t T = weights.size(0), k = weights.size(1), S = y_sorted.size(0), H = y_sorted.size(1);
  TORCH_CHECK(grad_out.size(0) == T && grad_out.size(1) == H, "grad_out must have shape [", T, ", ", H, "], got ",
              grad_out.sizes());
  TORCH_CHECK(k >= 1, "weights must have shape [T, k] with k >= 1, got ", weights.sizes());
  at::Tensor inv = checked_rows(inverse_rows, S, "inverse_rows");
  TORCH_CHECK(inv.numel() == T * k, "inverse_rows must have T*k = ", T * k, " entries, got ", inv.numel());
  const at::ScalarType cd = compute_dtype(y_sorted.scalar_type());
  at::Tensor g = grad_out.to(cd).contiguous(), y = y_sorted.to(cd).contiguous(), w = weights.to(cd).contiguous();
  at::Tensor grad_y = S > T * k ? at::zeros({S, H}, g.options()) : at::empty({S, H}, g.options());
  at::Tensor grad_w = at::empty({T, k}, g.options());
  AT_DISPATCH_FLOATING_TYPES(cd, "combine_backward", [&] {
    const scalar_t* gp = g.data_ptr<scalar_t>();
    const scalar_t* yp = y.data_ptr<scalar_t>();
    const scalar_t* wp = w.data_ptr<scalar_t>();
    const int64_t* ip = inv.data_ptr<int64_t>();
    scalar_t* gyp = grad_y.data_ptr<scalar_t>();
    scalar_t* gwp = grad_w.data_ptr<scalar_t>();
    at::parallel_for(0, T, std::max<int64_t>(1, 4096 / std::max<int64_t>(H * k, 1)), [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const scalar_t* go = gp + t * H;
        for (int64_t j = 0; j < k; ++j) {
          const int64_t r = ip[t * k + j];
          const scalar_t wj = wp[t * k + j];
          const scalar_t* yr = yp + r * H;
          scalar_t* gy = gyp + r * H;
          scalar_t dot = 0;
          for (int64_t h = 0; h < H; ++h) {
            gy[h] = wj * go[h];
            dot += go[h] * yr[h];
          }
          gwp[t * k + j] = dot;
        }
      }
    });
  });
  return {grad_y.to(y_sorted.scalar_type()), grad_w.to(weights.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(eureka_fast, CPU, m) {
  m.impl("permute", &permute_cpu);
  m.impl("combine", &combine_cpu);
  m.impl("combine_backward", &combine_backward_cpu);
}

}  // namespace cpu
}  // namespace eureka_fast
