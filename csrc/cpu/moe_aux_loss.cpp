// moe_aux_loss on the CPU: the load-balancing loss E * sum_e mean_t(router_probs[t, e]) * (rows routed to e) / (T k).
#include <torch/library.h>

#include <vector>

#include "cpu/common.h"

namespace eureka_fast {
namespace cpu {
namespace {

at::Tensor moe_aux_loss_cpu(const at::Tensor& router_probs, const at::Tensor& ids) {
  check_float_tensor(router_probs, 2, "router_probs");
  const int64_t T = router_probs.size(0), E = router_probs.size(1);
  at::Tensor ids_l = checked_ids(ids, E, "ids");
  TORCH_CHECK(ids.size(0) == T, "ids must have ", T, " rows (one per token of router_probs), got ", ids.size(0));
  check_top_k(ids.size(1), E, "ids", "E = router_probs.size(1)");
  const at::ScalarType cd = compute_dtype(router_probs.scalar_type());
  if (T == 0 || ids_l.numel() == 0) return at::zeros({}, router_probs.options().dtype(cd));
  at::Tensor p = router_probs.to(cd).contiguous();
  std::vector<int64_t> counts(E, 0);
  const int64_t* idp = ids_l.data_ptr<int64_t>();
  for (int64_t i = 0; i < ids_l.numel(); ++i) counts[idp[i]]++;
  at::Tensor out = at::empty({}, router_probs.options().dtype(cd));
  AT_DISPATCH_FLOATING_TYPES(cd, "moe_aux_loss", [&] {
    // Column sums of the probabilities, accumulated in double so the result does not depend on T's blocking.
    std::vector<double> col(E, 0.0);
    const scalar_t* pp = p.data_ptr<scalar_t>();
    for (int64_t t = 0; t < T; ++t)
      for (int64_t e = 0; e < E; ++e) col[e] += pp[t * E + e];
    double loss = 0;
    const double rows = static_cast<double>(ids_l.numel());
    for (int64_t e = 0; e < E; ++e) loss += (col[e] / T) * (counts[e] / rows);
    out.fill_(static_cast<scalar_t>(E * loss));
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(eureka_fast, CPU, m) {
  m.impl("moe_aux_loss", &moe_aux_loss_cpu);
}

}  // namespace cpu
}  // namespace eureka_fast
