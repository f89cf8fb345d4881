// fused_experts on the CPU (float compute): the routed-expert layer from the plan, a gather of token rows into
// expert order (fused into the GEMM's packing where the AVX-512 many-rows GEMM runs), the gate+up grouped GEMM with
// the gated activation in its epilogue, the down grouped GEMM and a deterministic combine. bf16 layers on bf16
// matmul hardware take fused_experts_bf16.cpp instead.
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <mutex>
#include <vector>

#include "cpu/common.h"
#include "cpu/moe_cpu.h"

namespace eureka_fast {
namespace cpu {

WorkspaceLease::WorkspaceLease(int64_t bytes) {
  static std::mutex mutex;
  static at::Tensor cached;
  if (bytes <= kMaxCachedWorkspaceBytes && mutex.try_lock()) {
    lock_ = std::unique_lock<std::mutex>(mutex, std::adopt_lock);
    if (!cached.defined() || cached.numel() < bytes) {
      cached = at::Tensor();  // release the old buffer before allocating the larger one
      cached = empty_large_output({bytes}, at::TensorOptions().dtype(at::kByte));
    }
    data_ = cached.data_ptr();
  } else {
    own_ = empty_large_output({bytes}, at::TensorOptions().dtype(at::kByte));
    data_ = own_.data_ptr();
  }
}

namespace {

at::Tensor fused_experts_cpu(const at::Tensor& x, const at::Tensor& w_gate_up, const at::Tensor& w_down,
                             const at::Tensor& weights, const at::Tensor& ids, c10::string_view activation) {
  const GatedActivation act = parse_gated_activation(std::string(activation), true);
  check_float_tensor(x, 2, "x");
  check_float_tensor(w_gate_up, 3, "w_gate_up");
  check_float_tensor(w_down, 3, "w_down");
  check_float_tensor(weights, 2, "weights");
  const int64_t T = x.size(0), H = x.size(1), E = w_gate_up.size(0), I2 = w_gate_up.size(1);
  TORCH_CHECK(I2 % 2 == 0 && w_gate_up.size(2) == H, "w_gate_up must have shape [E, 2I, H=", H, "], got ",
              w_gate_up.sizes());
  const int64_t I = I2 / 2;
  TORCH_CHECK(w_down.size(0) == E && w_down.size(1) == H && w_down.size(2) == I, "w_down must have shape [", E, ", ",
              H, ", ", I, "], got ", w_down.sizes());
  TORCH_CHECK(weights.size(0) == T, "weights must have ", T, " rows, got shape ", weights.sizes());
  TORCH_CHECK(ids.dim() == 2 && ids.size(0) == T && ids.size(1) == weights.size(1), "ids must have the shape of weights ",
              weights.sizes(), ", got ", ids.sizes());
  const int64_t k = weights.size(1);
  check_top_k(k, E, "weights and ids", "E = w_gate_up.size(0)");
  at::Tensor ids_l = checked_ids(ids, E, "ids");
  const at::ScalarType cd = compute_dtype(x.scalar_type());
  at::Tensor out = empty_large_output({T, H}, x.options().dtype(cd));
  if (T == 0 || H == 0) return out.to(x.scalar_type());
  if (I == 0) return out.zero_().to(x.scalar_type());
  const int64_t S = T * k;
  std::vector<int64_t> counts(E), offsets(E + 1), padded(E + 1), sorted_rows(S), inverse_rows(S);
  build_plan(ids_l.data_ptr<int64_t>(), S, E, 0, counts.data(), offsets.data(), padded.data(), sorted_rows.data(),
             inverse_rows.data());
  // bf16 layer on bf16 matmul hardware: stays in bf16 end to end (fused_experts_bf16.cpp)
  if (fused_experts_bf16_applies(x, w_gate_up, w_down, offsets))
    return fused_experts_bf16(x, w_gate_up, w_down, weights, offsets, sorted_rows, inverse_rows, k, act);
  at::Tensor xc = rows_contiguous(x, cd);
  at::Tensor wts = weights.to(cd).contiguous();
  AT_DISPATCH_FLOATING_TYPES(cd, "fused_experts", [&] {
    // 1. gather token rows into expert-contiguous order (uninitialised scratch: every row is written below)
    const int64_t xs_bytes = (S * H * static_cast<int64_t>(sizeof(scalar_t)) + 63) / 64 * 64;
    const WorkspaceLease workspace(xs_bytes + S * I * static_cast<int64_t>(sizeof(scalar_t)));
    scalar_t* xs = workspace.at_offset<scalar_t>(0);
    const scalar_t* xp = xc.data_ptr<scalar_t>();
    const int64_t x_stride = xc.stride(0);
    // Experts whose gate+up tiles run the AVX-512 many-rows GEMM pack their token rows straight from x (the
    // gather fused into the packing: the dense copy was ~2% of the layer at T = 1024, E = 64 on one thread); the
    // others (few rows, whole-expert BLAS, 2-byte or strided weights) read the dense rows gathered here.
    const bool two_byte = reads_2byte_weights(w_gate_up, cd);
    const at::Tensor wgu = two_byte ? w_gate_up : blas_ready_weight(w_gate_up, cd);
    const bool fuse_gather = std::is_same_v<scalar_t, float> && !two_byte && inner_strides(wgu).second == 1;
    std::vector<int64_t> token_of(S);  // x row of each expert-sorted row
    for (int64_t s = 0; s < S; ++s) token_of[s] = sorted_rows[s] / k;
    std::vector<char> dense(E, 1);
    if (fuse_gather)
      for (int64_t e = 0; e < E; ++e) dense[e] = !expert_tiles_pack(offsets, e, H, 1);
    at::parallel_for(0, S, std::max<int64_t>(1, 4096 / H), [&](int64_t s0, int64_t s1) {
      int64_t e = std::upper_bound(offsets.begin(), offsets.end(), s0) - offsets.begin() - 1;
      for (int64_t s = s0; s < s1; ++s) {
        while (s >= offsets[e + 1]) ++e;
        if (dense[e]) std::memcpy(xs + s * H, xp + token_of[s] * x_stride, H * sizeof(scalar_t));
      }
    });
    // 2. gate+up GEMM with the gated activation in the epilogue -> [S, I]
    scalar_t* hidden = workspace.at_offset<scalar_t>(xs_bytes);
    // bf16 activations: the hidden activations are rounded to bf16 before the down GEMM when that GEMM runs in
    // bf16, as in the model's own bf16 layer.
    const bool bf16_inputs = x.scalar_type() == at::kBFloat16;
    // (the cast only type-checks the double instantiation, where fuse_gather is false)
    const RowGather gather{reinterpret_cast<const float*>(xp), x_stride, token_of.data()};
    grouped_forward_weights<scalar_t>(xs, H, H, wgu, cd, offsets, act, hidden, I, bf16_inputs,
                                      fuse_gather ? &gather : nullptr);
    // 3. down GEMM -> [S, H] (reuses the gather buffer)
    grouped_forward_weights<scalar_t>(hidden, I, I, w_down, cd, offsets, GatedActivation::None, xs, H, bf16_inputs);
    // 4. each token sums its own k rows in slot order: deterministic, no atomics
    combine_rows<scalar_t, scalar_t>(xs, H, inverse_rows.data(), wts.data_ptr<scalar_t>(), T, k, H,
                                     out.data_ptr<scalar_t>());
  });
  return out.scalar_type() == x.scalar_type() ? out : out.to(x.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(eureka_fast, CPU, m) { m.impl("fused_experts", &fused_experts_cpu); }

}  // namespace cpu
}  // namespace eureka_fast
