// fused_experts on CUDA: the routed-expert layer as plan -> gate+up grouped GEMM (token gather in its prologue,
// act(gate) * up in its epilogue) -> down grouped GEMM -> deterministic combine; the GEMMs take grouped_mm.cu's
// regimes (run_group_m).
#include "ops.cuh"

namespace eureka_fast {
namespace cuda {

at::Tensor fused_experts_cuda(const at::Tensor& x_in, const at::Tensor& w_gate_up_in, const at::Tensor& w_down_in,
                              const at::Tensor& weights, const at::Tensor& ids, c10::string_view activation) {
  TORCH_CHECK(x_in.dim() == 2, "fused_experts: x must be [T, H]");
  TORCH_CHECK(w_gate_up_in.dim() == 3 && w_down_in.dim() == 3, "fused_experts: weights must be 3-D");
  TORCH_CHECK(ids.dim() == 2 && weights.sizes() == ids.sizes(), "fused_experts: ids and weights must be [T, k]");
  c10::cuda::CUDAGuard guard(x_in.device());
  const std::string act_s(activation);
  const int act = parse_gated_activation(act_s, "fused_experts");
  TORCH_CHECK(act != kActNone, "fused_experts: activation must be 'silu' or 'gelu'");
  const int64_t T = x_in.size(0), H = x_in.size(1), E = w_gate_up_in.size(0), N1 = w_gate_up_in.size(1);
  const int64_t k = ids.size(1), I = N1 / 2;
  TORCH_CHECK(N1 % 2 == 0 && w_gate_up_in.size(2) == H, "fused_experts: w_gate_up must be [E, 2I, H]");
  TORCH_CHECK(w_down_in.size(0) == E && w_down_in.size(1) == H && w_down_in.size(2) == I,
              "fused_experts: w_down must be [E, H, I]");
  TORCH_CHECK(ids.size(0) == T, "fused_experts: ids must have T rows");
  TORCH_CHECK(k >= 1 && k <= E, "fused_experts: weights and ids must have between 1 and E = ", E,
              " columns (top-k), got k = ", k);
  if (T == 0 || H == 0) return at::zeros({T, H}, x_in.options());
  const auto dt = x_in.scalar_type();
  at::Tensor x = x_in.contiguous();
  at::Tensor w1 = w_gate_up_in.scalar_type() == dt ? w_gate_up_in : w_gate_up_in.to(dt);
  at::Tensor w2 = w_down_in.scalar_type() == dt ? w_down_in : w_down_in.to(dt);
  auto plan = moe_plan_cuda(ids, E, 0);
  const at::Tensor& offsets = std::get<1>(plan);
  const at::Tensor& sorted_rows = std::get<3>(plan);
  const at::Tensor& inverse_rows = std::get<4>(plan);
  const int64_t S = T * k;
  if (S == 0) return at::zeros({T, H}, x_in.options());
  int64_t es1, sn1, sk1, es2, sn2, sk2;
  w1 = weight_view(w1, es1, sn1, sk1);
  w2 = weight_view(w2, es2, sn2, sk2);
  // GEMM 1 with the token gather in its prologue and act(gate) * up in its epilogue: h [S, I]
  at::Tensor h = at::empty({S, I}, x.options());
  if (I > 0 && H > 0) {
    run_group_m(x, sorted_rows.data_ptr<int64_t>(), k, S, w1, es1, sn1, sk1, N1, H, offsets, static_cast<int>(E), act,
                h, true);
  } else {
    h.zero_();
  }
  // GEMM 2: y [S, H]
  at::Tensor y = at::empty({S, H}, x.options());
  if (I > 0) {
    run_group_m(h, nullptr, 1, S, w2, es2, sn2, sk2, H, I, offsets, static_cast<int>(E), kActNone, y, true);
  } else {
    y.zero_();
  }
  // deterministic weighted combine (slot order, fp32)
  return combine_cuda(y, inverse_rows, weights);
}

TORCH_LIBRARY_IMPL(eureka_fast, CUDA, m) { m.impl("fused_experts", &fused_experts_cuda); }

}  // namespace cuda
}  // namespace eureka_fast
