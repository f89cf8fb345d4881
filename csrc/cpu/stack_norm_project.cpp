// stack_norm_project on the CPU: stack (or mean-pool) k frames -> LayerNorm / RMSNorm -> Linear -> activation ->
// optional Linear, for ragged batches.
//
// The stacking and the norm run in one pass per output row (the stacked row stays in cache between gather,
// statistics and normalisation); only the valid output rows of a ragged batch are computed (padding rows are
// never projected), then the projections run as single large multi-threaded GEMMs.
#include <torch/library.h>

#include <cmath>
#include <cstring>

#include "cpu/common.h"
#include "cpu/moe_cpu.h"

namespace eureka_fast {
namespace cpu {
namespace {

enum class Norm { None, Layer, Rms };
enum class Act { None, Silu, Gelu, SwiGlu };

void check_vector(const c10::optional<at::Tensor>& t, int64_t size, const char* name) {
  if (!t.has_value()) return;
  check_cpu(*t, name);
  check_floating(*t, name);
  TORCH_CHECK(t->dim() == 1 && t->size(0) == size, name, " must have shape [", size, "], got ", t->sizes());
}

void check_matrix(const at::Tensor& t, int64_t in_features, const char* name) {
  check_cpu(t, name);
  check_floating(t, name);
  TORCH_CHECK(t.dim() == 2 && t.size(1) == in_features, name, " must have shape [out, ", in_features, "], got ",
              t.sizes());
}

// Row reductions with 16 independent partial sums: the compiler vectorises them (a single running sum is a serial
// dependency it may not reorder), and 16 short partial sums also lose less precision than one long one.
constexpr int kLanes = 16;
template <typename scalar_t>
scalar_t lane_sum(const scalar_t* x, int64_t n, scalar_t shift) {
  scalar_t acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int l = 0; l < kLanes; ++l) acc[l] += x[i + l] - shift;
  for (; i < n; ++i) acc[0] += x[i] - shift;
  scalar_t total = 0;
  for (int l = 0; l < kLanes; ++l) total += acc[l];
  return total;
}
template <typename scalar_t>
scalar_t lane_sum_sq(const scalar_t* x, int64_t n, scalar_t shift) {
  scalar_t acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int l = 0; l < kLanes; ++l) {
      const scalar_t d = x[i + l] - shift;
      acc[l] += d * d;
    }
  for (; i < n; ++i) acc[0] += (x[i] - shift) * (x[i] - shift);
  scalar_t total = 0;
  for (int l = 0; l < kLanes; ++l) total += acc[l];
  return total;
}

template <typename scalar_t>
void stack_and_norm_rows(const scalar_t* x, int64_t T, int64_t D, int64_t k, bool mean_pool, const int64_t* row_batch,
                         const int64_t* row_time, const int64_t* frame_limit, int64_t n_rows, Norm norm,
                         const scalar_t* norm_w, const scalar_t* norm_b, double eps, scalar_t* out) {
  const int64_t width = mean_pool ? D : k * D;
  at::parallel_for(0, n_rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(width, 1)), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t b = row_batch[r], t = row_time[r], limit = frame_limit[b];
      const scalar_t* xb = x + b * T * D;
      scalar_t* dst = out + r * width;
      if (!mean_pool) {
        // time-major stacking: frame t*k+j fills channels j*D..(j+1)*D; frames past the clip are zeros
        for (int64_t j = 0; j < k; ++j) {
          const int64_t f = t * k + j;
          if (f < limit)
            std::memcpy(dst + j * D, xb + f * D, D * sizeof(scalar_t));
          else
            std::fill(dst + j * D, dst + (j + 1) * D, scalar_t(0));
        }
      } else {
        std::fill(dst, dst + D, scalar_t(0));
        int64_t n_valid = 0;
        for (int64_t j = 0; j < k; ++j) {
          const int64_t f = t * k + j;
          if (f >= limit) break;
          const scalar_t* src = xb + f * D;
          for (int64_t d = 0; d < D; ++d) dst[d] += src[d];
          ++n_valid;
        }
        const scalar_t inv = scalar_t(1) / static_cast<scalar_t>(std::max<int64_t>(n_valid, 1));
        for (int64_t d = 0; d < D; ++d) dst[d] *= inv;
      }
      if (norm == Norm::None) continue;
      if (norm == Norm::Layer) {
        const scalar_t mean = lane_sum(dst, width, scalar_t(0)) / static_cast<scalar_t>(width);
        const scalar_t var = lane_sum_sq(dst, width, mean) / static_cast<scalar_t>(width);
        const scalar_t rstd = static_cast<scalar_t>(1.0 / std::sqrt(static_cast<double>(var) + eps));
        if (norm_w && norm_b) {
          for (int64_t c = 0; c < width; ++c) dst[c] = (dst[c] - mean) * rstd * norm_w[c] + norm_b[c];
        } else {
          for (int64_t c = 0; c < width; ++c) {
            scalar_t v = (dst[c] - mean) * rstd;
            if (norm_w) v *= norm_w[c];
            if (norm_b) v += norm_b[c];
            dst[c] = v;
          }
        }
      } else {
        const scalar_t ms = lane_sum_sq(dst, width, scalar_t(0)) / static_cast<scalar_t>(width);
        const scalar_t rstd = static_cast<scalar_t>(1.0 / std::sqrt(static_cast<double>(ms) + eps));
        if (norm_w) {
          for (int64_t c = 0; c < width; ++c) dst[c] = dst[c] * rstd * norm_w[c];
        } else {
          for (int64_t c = 0; c < width; ++c) dst[c] *= rstd;
        }
      }
    }
  });
}

at::Tensor linear(const at::Tensor& h, const at::Tensor& w, const c10::optional<at::Tensor>& b, at::ScalarType cd) {
  at::Tensor wc = w.to(cd);
  if (b.has_value()) return at::addmm(b->to(cd), h, wc.t());
  return at::mm(h, wc.t());
}

at::Tensor stack_norm_project_cpu(const at::Tensor& x, int64_t k, const c10::optional<at::Tensor>& lengths,
                                  c10::string_view norm_name, const c10::optional<at::Tensor>& norm_weight,
                                  const c10::optional<at::Tensor>& norm_bias, const c10::optional<at::Tensor>& w1,
                                  const c10::optional<at::Tensor>& b1, c10::string_view activation,
                                  const c10::optional<at::Tensor>& w2, const c10::optional<at::Tensor>& b2, double eps,
                                  c10::string_view pool) {
  check_float_tensor(x, 3, "x");
  TORCH_CHECK(k >= 1, "k must be >= 1, got ", k);
  TORCH_CHECK(pool == "stack" || pool == "mean", "pool must be 'stack' or 'mean', got '", std::string(pool), "'");
  TORCH_CHECK(eps >= 0, "eps must be >= 0, got ", eps);
  const bool mean_pool = pool == "mean";
  Norm norm;
  if (norm_name == "none") norm = Norm::None;
  else if (norm_name == "layer") norm = Norm::Layer;
  else if (norm_name == "rms") norm = Norm::Rms;
  else TORCH_CHECK(false, "norm must be 'layer', 'rms' or 'none', got '", std::string(norm_name), "'");
  Act act;
  if (activation == "none") act = Act::None;
  else if (activation == "silu") act = Act::Silu;
  else if (activation == "gelu") act = Act::Gelu;
  else if (activation == "swiglu") act = Act::SwiGlu;
  else TORCH_CHECK(false, "activation must be 'silu', 'gelu', 'swiglu' or 'none', got '", std::string(activation), "'");

  const int64_t B = x.size(0), T = x.size(1), D = x.size(2);
  const int64_t T_out = (T + k - 1) / k;
  const int64_t width = mean_pool ? D : k * D;
  check_vector(norm_weight, width, "norm_weight");
  check_vector(norm_bias, width, "norm_bias");
  TORCH_CHECK(!(norm_bias.has_value() && norm == Norm::Rms), "norm_bias is not used by norm='rms'; pass None");
  int64_t features = width;
  if (w1.has_value()) {
    check_matrix(*w1, features, "w1");
    features = w1->size(0);
    check_vector(b1, features, "b1");
  } else {
    TORCH_CHECK(!b1.has_value(), "b1 given without w1");
  }
  if (act == Act::SwiGlu) {
    TORCH_CHECK(features % 2 == 0, "activation='swiglu' needs an even number of features, got ", features);
    features /= 2;
  }
  if (w2.has_value()) {
    check_matrix(*w2, features, "w2");
    features = w2->size(0);
    check_vector(b2, features, "b2");
  } else {
    TORCH_CHECK(!b2.has_value(), "b2 given without w2");
  }

  // Frames of clip b are [0, frame_limit[b]); output rows [0, ceil(frame_limit[b] / k)) are computed, the rest zero.
  const std::vector<int64_t> frame_limit =
      lengths.has_value() ? checked_lengths(*lengths, B, 0, T, "lengths", "T") : std::vector<int64_t>(B, T);
  std::vector<int64_t> row_batch, row_time, row_dest;
  row_batch.reserve(B * T_out);
  row_time.reserve(B * T_out);
  for (int64_t b = 0; b < B; ++b) {
    const int64_t rows = (frame_limit[b] + k - 1) / k;
    for (int64_t t = 0; t < rows; ++t) {
      row_batch.push_back(b);
      row_time.push_back(t);
      row_dest.push_back(b * T_out + t);
    }
  }
  const int64_t n_rows = static_cast<int64_t>(row_batch.size());
  const at::ScalarType cd = compute_dtype(x.scalar_type());
  at::Tensor xc = x.to(cd).contiguous();
  at::Tensor h = at::empty({n_rows, width}, xc.options());
  at::Tensor nw = norm_weight.has_value() ? norm_weight->to(cd).contiguous() : at::Tensor();
  at::Tensor nb = norm_bias.has_value() ? norm_bias->to(cd).contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(cd, "stack_norm_project", [&] {
    stack_and_norm_rows<scalar_t>(xc.data_ptr<scalar_t>(), T, D, k, mean_pool, row_batch.data(), row_time.data(),
                                  frame_limit.data(), n_rows, norm, nw.defined() ? nw.data_ptr<scalar_t>() : nullptr,
                                  nb.defined() ? nb.data_ptr<scalar_t>() : nullptr, eps, h.data_ptr<scalar_t>());
  });
  if (w1.has_value()) h = linear(h, *w1, b1, cd);
  if (act != Act::None && h.numel() > 0) {
    // ATen's vectorised SiLU / exact-erf GELU, in place on the GEMM output: ~5x faster per element than the scalar
    // helpers of activations.cpp at these sizes (measured 0.9 vs 5.3 ms on 1500 x 1024), same results as the reference.
    h = h.contiguous();
    if (act == Act::SwiGlu) {
      const int64_t half = h.size(1) / 2;
      h = at::silu(h.narrow(1, 0, half)).mul_(h.narrow(1, half, half));
    } else if (act == Act::Silu) {
      at::silu_(h);
    } else {
      at::gelu_(h);
    }
  } else if (act == Act::SwiGlu) {
    h = at::empty({n_rows, h.size(1) / 2}, h.options());
  }
  if (w2.has_value()) h = linear(h, *w2, b2, cd);
  at::Tensor out;
  if (n_rows == B * T_out) {
    out = h.reshape({B, T_out, features});
  } else {
    out = at::zeros({B * T_out, features}, h.options());
    if (n_rows > 0) {
      at::Tensor dest = at::from_blob(row_dest.data(), {n_rows}, at::TensorOptions().dtype(at::kLong)).clone();
      out.index_copy_(0, dest, h);
    }
    out = out.view({B, T_out, features});
  }
  return out.scalar_type() == x.scalar_type() ? out : out.to(x.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(eureka_fast, CPU, m) { m.impl("stack_norm_project", &stack_norm_project_cpu); }

}  // namespace cpu
}  // namespace eureka_fast
