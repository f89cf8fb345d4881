// moe_plan on the CPU: the routing plan, a stable counting sort of the routed rows (token * k + slot) by expert.
#include <torch/library.h>

#include <vector>

#include "cpu/common.h"
#include "cpu/moe_cpu.h"

namespace eureka_fast {
namespace cpu {

void build_plan(const int64_t* ids, int64_t rows, int64_t num_experts, int64_t block, int64_t* counts,
                int64_t* offsets, int64_t* padded_offsets, int64_t* sorted_rows, int64_t* inverse_rows) {
  std::fill(counts, counts + num_experts, int64_t(0));
  for (int64_t r = 0; r < rows; ++r) counts[ids[r]]++;
  offsets[0] = 0;
  padded_offsets[0] = 0;
  for (int64_t e = 0; e < num_experts; ++e) {
    offsets[e + 1] = offsets[e] + counts[e];
    const int64_t padded = block > 0 ? (counts[e] + block - 1) / block * block : counts[e];
    padded_offsets[e + 1] = padded_offsets[e] + padded;
  }
  // Stable scatter: rows of one expert keep token order.
  std::vector<int64_t> cursor(offsets, offsets + num_experts);
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t pos = cursor[ids[r]]++;
    sorted_rows[pos] = r;
    inverse_rows[r] = pos;
  }
}

namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> moe_plan_cpu(const at::Tensor& ids,
                                                                                    int64_t num_experts,
                                                                                    int64_t block) {
  TORCH_CHECK(num_experts >= 1, "num_experts must be >= 1, got ", num_experts);
  TORCH_CHECK(block >= 0, "block must be >= 0, got ", block);
  at::Tensor ids_l = checked_ids(ids, num_experts, "ids");
  check_top_k(ids.size(1), num_experts, "ids", "num_experts");
  const int64_t rows = ids_l.numel();
  auto opts = ids.options().dtype(at::kLong);
  at::Tensor counts = at::empty({num_experts}, opts), offsets = at::empty({num_experts + 1}, opts),
             padded = at::empty({num_experts + 1}, opts), sorted_rows = at::empty({rows}, opts),
             inverse_rows = at::empty({rows}, opts);
  build_plan(ids_l.data_ptr<int64_t>(), rows, num_experts, block, counts.data_ptr<int64_t>(),
             offsets.data_ptr<int64_t>(), padded.data_ptr<int64_t>(), sorted_rows.data_ptr<int64_t>(),
             inverse_rows.data_ptr<int64_t>());
  return {counts, offsets, padded, sorted_rows, inverse_rows};
}

}  // namespace

TORCH_LIBRARY_IMPL(eureka_fast, CPU, m) { m.impl("moe_plan", &moe_plan_cpu); }

}  // namespace cpu
}  // namespace eureka_fast
