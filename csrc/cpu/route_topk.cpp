// route_topk on the CPU: softmax / sigmoid scoring, the selection-only correction bias, DeepSeek grouped top-k,
// renormalisation and the routed scaling factor; ties go to the lower expert id.
#include <torch/library.h>

#include <atomic>
#include <cmath>
#include <limits>

#include "cpu/common.h"

namespace eureka_fast {
namespace cpu {
namespace {

// Descending by value, ties to the lower index: the order of a stable descending sort.
template <typename acc_t>
struct DescendingStable {
  const acc_t* values;
  bool operator()(int64_t a, int64_t b) const {
    return values[a] > values[b] || (values[a] == values[b] && a < b);
  }
};

// The k best of values[0..E) into order[0..k), descending, ties to the lower index (the order of a stable
// descending sort). Small k: one pass keeping a sorted list of the best k (a value enters only if it beats the
// current k-th, so for random scores ~k ln(E/k) insertions), ~5x cheaper than partial_sort over an index array at
// E = 64, k = 8; larger k: partial_sort. NaN never enters the small-k list, which would then leave order[] short:
// route_rows skips rows with a non-finite logit (and route_topk_cpu then raises) and rejects a non-finite bias.
template <typename acc_t>
void select_topk(const acc_t* values, int64_t E, int64_t k, int64_t* order) {
  constexpr int64_t kInsertionMaxK = 16;
  if (k > kInsertionMaxK) {
    for (int64_t e = 0; e < E; ++e) order[e] = e;
    std::partial_sort(order, order + k, order + E, DescendingStable<acc_t>{values});
    return;
  }
  acc_t best[kInsertionMaxK];
  int64_t filled = 0;
  for (int64_t e = 0; e < E; ++e) {
    const acc_t v = values[e];
    if (filled == k && !(v > best[k - 1])) continue;  // ties keep the earlier (lower) index
    int64_t pos = filled < k ? filled++ : k - 1;
    while (pos > 0 && v > best[pos - 1]) {  // strictly greater: equal values stay in index order
      best[pos] = best[pos - 1];
      order[pos] = order[pos - 1];
      --pos;
    }
    best[pos] = v;
    order[pos] = e;
  }
}

// Returns the first row (token) with a NaN or infinite logit, or -1; such rows are skipped (outputs unwritten).
template <typename acc_t>
int64_t route_rows(const at::Tensor& logits, int64_t k, bool use_softmax, bool renormalize, const acc_t* bias,
                   int64_t n_group, int64_t topk_group, double routed_scaling, at::Tensor& weights, at::Tensor& ids) {
  const int64_t T = logits.size(0), E = logits.size(1);
  const acc_t* in = logits.data_ptr<acc_t>();
  acc_t* w_out = weights.data_ptr<acc_t>();
  int32_t* id_out = ids.data_ptr<int32_t>();
  const int64_t group_size = E / n_group;
  std::atomic<int64_t> first_bad{std::numeric_limits<int64_t>::max()};
  at::parallel_for(0, T, 64, [&](int64_t t0, int64_t t1) {
    std::vector<acc_t> scores(E), choice(E), group_score(n_group);
    std::vector<int64_t> order(E), group_order(n_group);
    for (int64_t t = t0; t < t1; ++t) {
      const acc_t* row = in + t * E;
      bool finite = true;
      for (int64_t e = 0; e < E; ++e) finite &= std::isfinite(row[e]);
      if (!finite) {
        int64_t seen = first_bad.load();
        while (t < seen && !first_bad.compare_exchange_weak(seen, t)) {
        }
        continue;
      }
      if (use_softmax) {
        acc_t mx = row[0];
        for (int64_t e = 1; e < E; ++e) mx = std::max(mx, row[e]);
        acc_t sum = 0;
        for (int64_t e = 0; e < E; ++e) {
          scores[e] = std::exp(row[e] - mx);
          sum += scores[e];
        }
        for (int64_t e = 0; e < E; ++e) scores[e] /= sum;
      } else {
        for (int64_t e = 0; e < E; ++e) scores[e] = acc_t(1) / (acc_t(1) + std::exp(-row[e]));
      }
      for (int64_t e = 0; e < E; ++e) choice[e] = bias ? scores[e] + bias[e] : scores[e];
      if (n_group > 1) {
        // Score each group by the sum of its two best selection scores; only the best topk_group groups compete.
        for (int64_t g = 0; g < n_group; ++g) {
          const acc_t* c = choice.data() + g * group_size;
          acc_t best = -std::numeric_limits<acc_t>::infinity(), second = best;
          for (int64_t j = 0; j < group_size; ++j) {
            if (c[j] > best) {
              second = best;
              best = c[j];
            } else if (c[j] > second) {
              second = c[j];
            }
          }
          group_score[g] = group_size >= 2 ? best + second : best;
          group_order[g] = g;
        }
        std::partial_sort(group_order.begin(), group_order.begin() + topk_group, group_order.end(),
                          DescendingStable<acc_t>{group_score.data()});
        std::vector<char> keep(n_group, 0);
        for (int64_t g = 0; g < topk_group; ++g) keep[group_order[g]] = 1;
        for (int64_t e = 0; e < E; ++e)
          if (!keep[e / group_size]) choice[e] = -std::numeric_limits<acc_t>::infinity();
      }
      select_topk(choice.data(), E, k, order.data());
      acc_t total = 0;
      for (int64_t j = 0; j < k; ++j) total += scores[order[j]];
      for (int64_t j = 0; j < k; ++j) {
        // Same rounding as the reference: (w / (sum + eps)) * scaling.
        acc_t w = renormalize ? scores[order[j]] / (total + acc_t(1e-20)) : scores[order[j]];
        w_out[t * k + j] = w * acc_t(routed_scaling);
        id_out[t * k + j] = static_cast<int32_t>(order[j]);
      }
    }
  });
  const int64_t bad = first_bad.load();
  return bad == std::numeric_limits<int64_t>::max() ? -1 : bad;
}

std::tuple<at::Tensor, at::Tensor> route_topk_cpu(const at::Tensor& logits, int64_t k, c10::string_view scoring,
                                                   bool renormalize, const c10::optional<at::Tensor>& correction_bias,
                                                   int64_t n_group, int64_t topk_group, double routed_scaling) {
  check_float_tensor(logits, 2, "logits");
  const int64_t T = logits.size(0), E = logits.size(1);
  TORCH_CHECK(E >= 1, "logits must have at least one expert column, got shape ", logits.sizes());
  TORCH_CHECK(k >= 1 && k <= E, "k must lie in [1, num_experts=", E, "], got ", k);
  const bool use_softmax = scoring == "softmax";
  TORCH_CHECK(use_softmax || scoring == "sigmoid", "scoring must be 'softmax' or 'sigmoid', got '", std::string(scoring),
              "'");
  TORCH_CHECK(n_group >= 1 && E % n_group == 0, "n_group must be >= 1 and divide num_experts=", E, ", got ", n_group);
  TORCH_CHECK(topk_group >= 1 && topk_group <= n_group, "topk_group must lie in [1, n_group=", n_group, "], got ",
              topk_group);
  TORCH_CHECK(n_group == 1 || k <= topk_group * (E / n_group), "k=", k, " exceeds the ", topk_group * (E / n_group),
              " experts in the topk_group=", topk_group, " kept groups");
  TORCH_CHECK(std::isfinite(routed_scaling), "routed_scaling must be a finite number, got ", routed_scaling);
  const at::ScalarType cd = compute_dtype(logits.scalar_type());
  at::Tensor x = logits.to(cd).contiguous();
  at::Tensor bias;
  if (correction_bias.has_value()) {
    check_cpu(*correction_bias, "correction_bias");
    check_floating(*correction_bias, "correction_bias");
    TORCH_CHECK(correction_bias->dim() == 1 && correction_bias->size(0) == E, "correction_bias must have shape [", E,
                "], got ", correction_bias->sizes());
    bias = correction_bias->to(cd).contiguous();
    AT_DISPATCH_FLOATING_TYPES(cd, "route_topk_bias", [&] {
      const scalar_t* b = bias.data_ptr<scalar_t>();
      for (int64_t e = 0; e < E; ++e)
        TORCH_CHECK(std::isfinite(b[e]), "correction_bias contains NaN or infinite values (", b[e], " at expert ", e,
                    ")");
    });
  }
  at::Tensor weights = at::empty({T, k}, logits.options().dtype(cd));
  at::Tensor ids = at::empty({T, k}, logits.options().dtype(at::kInt));
  if (T == 0) return {weights, ids};
  int64_t bad_row = -1;
  AT_DISPATCH_FLOATING_TYPES(cd, "route_topk", [&] {
    bad_row = route_rows<scalar_t>(x, k, use_softmax, renormalize, bias.defined() ? bias.data_ptr<scalar_t>() : nullptr,
                                   n_group, topk_group, routed_scaling, weights, ids);
  });
  TORCH_CHECK(bad_row < 0, "logits contain NaN or infinite values (first in row ", bad_row, ")");
  return {weights, ids};
}

}  // namespace

TORCH_LIBRARY_IMPL(eureka_fast, CPU, m) { m.impl("route_topk", &route_topk_cpu); }

}  // namespace cpu
}  // namespace eureka_fast
