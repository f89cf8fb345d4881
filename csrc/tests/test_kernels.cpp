// C++ unit tests of the CPU kernels, run by ctest (no Python). Each op is called through the dispatcher and
// compared with a plain loop written here with ATen ops; plan invariants and error paths are checked directly.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cstdio>
#include <string>

#include "cpu/moe_cpu.h"

namespace {

int failures = 0;

#define EXPECT(cond, what)                                                     \
  do {                                                                         \
    if (!(cond)) {                                                             \
      std::fprintf(stderr, "FAIL %s:%d: %s\n", __FILE__, __LINE__, what);      \
      ++failures;                                                              \
    }                                                                          \
  } while (0)

bool close(const at::Tensor& a, const at::Tensor& b, double atol = 1e-5, double rtol = 1e-4) {
  return a.sizes() == b.sizes() && at::allclose(a.to(at::kDouble), b.to(at::kDouble), rtol, atol);
}

c10::OperatorHandle op(const char* name) { return c10::Dispatcher::singleton().findSchemaOrThrow(name, ""); }

// Naive expert layer: per token, per slot, the expert's MLP.
at::Tensor loop_experts(const at::Tensor& x, const at::Tensor& wgu, const at::Tensor& wd, const at::Tensor& w,
                        const at::Tensor& ids) {
  at::Tensor out = at::zeros_like(x);
  const int64_t I = wgu.size(1) / 2;
  for (int64_t t = 0; t < x.size(0); ++t)
    for (int64_t j = 0; j < ids.size(1); ++j) {
      const int64_t e = ids[t][j].item<int64_t>();
      at::Tensor h = at::mv(wgu[e], x[t]);
      at::Tensor act = at::silu(h.slice(0, 0, I)) * h.slice(0, I, 2 * I);
      out[t] += w[t][j] * at::mv(wd[e], act);
    }
  return out;
}

void test_plan_invariants() {
  // expert 1 gets nothing, expert 2 gets most rows; order within an expert must follow the row index
  at::Tensor ids = at::tensor({2, 0, 2, 3, 2, 0, 3, 2}, at::kLong).view({4, 2});
  const int64_t E = 4, rows = 8;
  std::vector<int64_t> counts(E), offsets(E + 1), padded(E + 1), sorted(rows), inverse(rows);
  eureka_fast::cpu::build_plan(ids.data_ptr<int64_t>(), rows, E, 4, counts.data(), offsets.data(), padded.data(),
                               sorted.data(), inverse.data());
  EXPECT(counts == (std::vector<int64_t>{2, 0, 4, 2}), "counts");
  EXPECT(offsets == (std::vector<int64_t>{0, 2, 2, 6, 8}), "offsets");
  EXPECT(padded == (std::vector<int64_t>{0, 4, 4, 8, 12}), "padded offsets");
  EXPECT(sorted == (std::vector<int64_t>{1, 5, 0, 2, 4, 7, 3, 6}), "sorted rows (stable)");
  for (int64_t r = 0; r < rows; ++r) EXPECT(sorted[inverse[r]] == r, "inverse o sorted = identity");
  auto outs = op("eureka_fast::moe_plan")
                  .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&,
                                                                                                  int64_t, int64_t)>()
                  .call(ids.to(at::kInt), E, 4);
  EXPECT(std::get<3>(outs).equal(at::tensor(sorted, at::kLong)), "moe_plan op sorted rows");
}

void test_grouped_mm() {
  at::manual_seed(0);
  const int64_t S = 37, K = 19, N = 26, E = 5;
  at::Tensor a = at::randn({S, K});
  at::Tensor w = at::randn({E, N, K}).transpose(1, 2).contiguous().transpose(1, 2);  // strided (column-major) w
  at::Tensor offsets = at::tensor({0, 3, 3, 20, 36, 36}, at::kLong);                 // expert 1 and 4 empty, row 36 uncovered
  auto gmm = op("eureka_fast::grouped_mm")
                 .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, c10::string_view)>();
  at::Tensor got = gmm.call(a, w, offsets, "silu_mul");
  at::Tensor want = at::zeros({S, N / 2});
  const int64_t o[] = {0, 3, 3, 20, 36, 36};
  for (int64_t e = 0; e < E; ++e) {
    if (o[e + 1] == o[e]) continue;
    at::Tensor h = at::mm(a.slice(0, o[e], o[e + 1]), w[e].t());
    want.slice(0, o[e], o[e + 1]).copy_(at::silu(h.slice(1, 0, N / 2)) * h.slice(1, N / 2, N));
  }
  EXPECT(close(got, want), "grouped_mm silu_mul vs loop");
  bool threw = false;
  try {
    gmm.call(a, w, at::tensor({0, 3, 2, 20, 36, 36}, at::kLong), "none");
  } catch (const c10::Error& e) {
    threw = std::string(e.what()).find("offsets") != std::string::npos;
  }
  EXPECT(threw, "decreasing offsets rejected with a message naming offsets");
}

void test_fused_experts() {
  at::manual_seed(1);
  const int64_t T = 23, H = 13, I = 9, E = 6, k = 2;
  at::Tensor x = at::randn({T, H}), wgu = at::randn({E, 2 * I, H}) * 0.3, wd = at::randn({E, H, I}) * 0.3;
  at::Tensor w = at::rand({T, k});
  auto fe = op("eureka_fast::fused_experts")
                .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                  const at::Tensor&, c10::string_view)>();
  // uniform-ish routing, then everything on one expert
  at::Tensor ids = at::randint(0, E, {T, k}, at::kInt);
  EXPECT(close(fe.call(x, wgu, wd, w, ids, "silu"), loop_experts(x, wgu, wd, w, ids)), "fused_experts random routing");
  at::Tensor one = at::full({T, k}, 4, at::kInt);
  EXPECT(close(fe.call(x, wgu, wd, w, one, "silu"), loop_experts(x, wgu, wd, w, one)), "fused_experts all-to-one");
  EXPECT(fe.call(x.slice(0, 0, 0), wgu, wd, w.slice(0, 0, 0), ids.slice(0, 0, 0), "silu").size(0) == 0, "T = 0");
  bool threw = false;
  try {
    fe.call(x, wgu, wd, w, at::full({T, k}, E, at::kInt), "silu");
  } catch (const c10::Error& e) {
    threw = std::string(e.what()).find("ids") != std::string::npos;
  }
  EXPECT(threw, "out-of-range ids rejected with a message naming ids");
}

void test_route_topk_ties() {
  // equal logits: the lower expert ids win
  at::Tensor logits = at::tensor({0.5f, 1.0f, 1.0f, 1.0f, -2.0f}).view({1, 5});
  auto rt = op("eureka_fast::route_topk")
                .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, int64_t, c10::string_view, bool,
                                                          const c10::optional<at::Tensor>&, int64_t, int64_t, double)>();
  auto [weights, ids] = rt.call(logits, 2, "softmax", false, c10::nullopt, 1, 1, 1.0);
  EXPECT(ids.equal(at::tensor({1, 2}, at::kInt).view({1, 2})), "ties go to the lower expert id");
  EXPECT(close(weights, at::softmax(logits, 1).slice(1, 1, 3)), "softmax weights");
}

void test_stack_norm_project() {
  at::manual_seed(2);
  const int64_t B = 2, T = 7, D = 3, k = 4, O = 5;
  at::Tensor x = at::randn({B, T, D}), w1 = at::randn({O, k * D}), lengths = at::tensor({7, 2}, at::kLong);
  auto snp = op("eureka_fast::stack_norm_project")
                 .typed<at::Tensor(const at::Tensor&, int64_t, const c10::optional<at::Tensor>&, c10::string_view,
                                   const c10::optional<at::Tensor>&, const c10::optional<at::Tensor>&,
                                   const c10::optional<at::Tensor>&, const c10::optional<at::Tensor>&, c10::string_view,
                                   const c10::optional<at::Tensor>&, const c10::optional<at::Tensor>&, double,
                                   c10::string_view)>();
  at::Tensor got = snp.call(x, k, lengths, "layer", c10::nullopt, c10::nullopt, w1, c10::nullopt, "silu", c10::nullopt,
                            c10::nullopt, 1e-5, "stack");
  // by hand: zero the frames past each length, pad to 8 frames, stack, LayerNorm, Linear, SiLU; row 1 of clip 1 is 0
  at::Tensor xm = x.clone();
  xm[1].slice(0, 2, T).zero_();
  at::Tensor stacked = at::constant_pad_nd(xm, {0, 0, 0, 1}).view({B, 2, k * D});
  at::Tensor want = at::silu(at::linear(at::layer_norm(stacked, {k * D}), w1));
  want[1][1].zero_();
  EXPECT(close(got, want), "stack_norm_project ragged vs by-hand chain");
}

}  // namespace

int main() {
  test_plan_invariants();
  test_grouped_mm();
  test_fused_experts();
  test_route_topk_ties();
  test_stack_norm_project();
  if (failures) {
    std::fprintf(stderr, "%d check(s) failed\n", failures);
    return 1;
  }
  std::printf("all kernel tests passed\n");
  return 0;
}
