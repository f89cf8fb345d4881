// Stand-alone micro-benchmark: the AVX-512 many-rows GEMM (csrc/cpu/gemm_avx512.cpp) against MKL's sgemm_ on the
// tile shapes of grouped_mm / fused_experts, one thread, cold weights (a pool of >= 64 weight matrices, >= 300 MB,
// cycled through so every call reads its weights from L3/DRAM), thread CPU time, contenders interleaved round-robin,
// best of several repeats.
//   g++ -O3 -std=c++17 -Icsrc bench/gemm_tiles.cpp -o /tmp/gemm_tiles \
//       -L$TORCH_LIB -Wl,-rpath,$TORCH_LIB -ltorch_cpu -lc10
//   /tmp/gemm_tiles [repeats]
#include <time.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "cpu/gemm_avx512.cpp"
#ifdef VARIANT_FILE  // a second copy of the kernel (other macros or source) for A/B runs in one process
namespace vx {
#include VARIANT_FILE
}
#endif

extern "C" void sgemm_(const char*, const char*, const int*, const int*, const int*, const float*, const float*,
                       const int*, const float*, const int*, const float*, float*, const int*);
extern "C" int MKL_Set_Num_Threads_Local(int);

namespace ef = eureka_fast::cpu;

static double thread_seconds() {
  timespec ts;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return ts.tv_sec + 1e-9 * ts.tv_nsec;
}

static void mkl_abt(int m, int n, int K, const float* a, int lda, const float* b, int ldb, float* c, int ldc) {
  const float one = 1.f, zero = 0.f;
  sgemm_("T", "N", &n, &m, &K, &one, b, &ldb, a, &lda, &zero, c, &ldc);
}

struct Shape {
  const char* name;
  int m, n, K, calls;  // calls: weight matrices per tile (2 = gate and up against the same A)
};

struct Kernel {
  const char* name;
  int64_t (*floats)(int64_t, int64_t);
  void (*pack)(int64_t, int64_t, const float*, int64_t, float*);
  void (*gemm)(int64_t, int64_t, int64_t, const float*, const float*, int64_t, float*, int64_t);
  int split;  // rows per call (0: all rows of the tile in one call)
};

int main(int argc, char** argv) {
  const int repeats = argc > 1 ? std::atoi(argv[1]) : 5;
  const char* only = argc > 2 && argv[2][0] ? argv[2] : nullptr;
  MKL_Set_Num_Threads_Local(1);
  std::vector<Kernel> kernels = {{"ours", ef::packed_a_floats, ef::pack_a_avx512, ef::gemm_abt_packed_avx512, 0}};
  if (argc > 3 && std::string(argv[3]).find("split") != std::string::npos)
    kernels.push_back({"ours/128", ef::packed_a_floats, ef::pack_a_avx512, ef::gemm_abt_packed_avx512, 128});
#ifdef VARIANT_FILE
  kernels.push_back({"variant", vx::eureka_fast::cpu::packed_a_floats, vx::eureka_fast::cpu::pack_a_avx512,
                     vx::eureka_fast::cpu::gemm_abt_packed_avx512, 0});
#endif
  const Shape shapes[] = {
      {"gate/up m=17", 17, 512, 1024, 2},    {"gate/up m=24", 24, 512, 1024, 2},
      {"down m=17", 17, 1024, 512, 1},       {"adapter gate/up m=20", 20, 1280, 2048, 2},
      {"gate/up m=32", 32, 512, 1024, 2},    {"gate/up m=64", 64, 512, 1024, 2},
      {"gate/up m=128", 128, 512, 1024, 2},  {"gate/up m=256", 256, 512, 1024, 2},
      {"down m=128", 128, 1024, 512, 1},     {"adapter gate/up m=250", 250, 1280, 2048, 2},
      {"adapter down m=250", 250, 2048, 1280, 1}, {"odd m=129 n=509 K=1000", 129, 509, 1000, 1},
      {"adapter down m=187", 187, 2048, 1280, 1}, {"adapter gate/up m=187", 187, 1280, 2048, 2},
      {"gate/up m=119", 119, 512, 1024, 2},  {"gate/up m=140", 140, 512, 1024, 2},
  };
  std::mt19937 rng(1);
  std::normal_distribution<float> nd;
  std::printf("%-24s %9s", "shape", "MKL");
  for (const Kernel& k : kernels) std::printf(" %9s %6s", k.name, "ratio");
  std::printf("  (GFLOP/s, one thread; ratio = MKL time / kernel time)\n");
  for (const Shape& s : shapes) {
    if (only && std::string(s.name).find(only) == std::string::npos) continue;
    const size_t wsize = static_cast<size_t>(s.n) * s.K;
    int pool = std::max<int>(64, static_cast<int>((320ull << 20) / (wsize * 4)) + 1);
    if (std::getenv("HOT")) pool = std::atoi(std::getenv("HOT"));  // warm-weights ceiling (pool stays in L3)
    std::vector<float*> w(pool);
    for (int i = 0; i < pool; ++i) {
      w[i] = static_cast<float*>(std::aligned_alloc(64, wsize * 4));
      for (size_t j = 0; j < wsize; ++j) w[i][j] = nd(rng) * 0.03f;
    }
    const int n_a = 4;
    std::vector<std::vector<float>> a(n_a, std::vector<float>(static_cast<size_t>(s.m) * s.K));
    for (auto& v : a)
      for (auto& x : v) x = nd(rng);
    const int ldc = s.calls * s.n;  // gate | up side by side, as in grouped_gemm_forward's buffer
    const size_t csize = static_cast<size_t>(s.m) * ldc;
    std::vector<std::vector<float>> c(kernels.size() + 1, std::vector<float>(csize));
    int64_t packed_floats = 0;  // the largest packed layout among the kernels
    for (const Kernel& k : kernels) packed_floats = std::max(packed_floats, k.floats(s.m, s.K));
    float* packed = static_cast<float*>(std::aligned_alloc(64, packed_floats * 4 + 64));
    const int tiles = std::getenv("HOT") ? 64 : std::max(8, pool / s.calls / (static_cast<int>(kernels.size()) + 1));
    // One tile of contender `which` (0 = MKL) against weight matrices starting at w[first].
    auto tile = [&](int which, int t, int first, float* cout) {
      const float* at = a[t % n_a].data();
      if (which == 0) {
        for (int q = 0; q < s.calls; ++q)
          mkl_abt(s.m, s.n, s.K, at, s.K, w[(first + q) % pool], s.K, cout + q * s.n, ldc);
        return;
      }
      const Kernel& k = kernels[which - 1];
      const int step = k.split > 0 ? k.split : s.m;
      for (int r0 = 0; r0 < s.m; r0 += step) {
        const int rows = std::min(step, s.m - r0);
        k.pack(rows, s.K, at + static_cast<size_t>(r0) * s.K, s.K, packed);
        for (int q = 0; q < s.calls; ++q)
          k.gemm(rows, s.n, s.K, packed, w[(first + q) % pool], s.K, cout + static_cast<size_t>(r0) * ldc + q * s.n,
                 ldc);
      }
    };
    // Contenders interleaved tile by tile (so they share the same machine noise), each on weights nobody touched
    // for a whole pass over the pool; per-contender sums of per-tile thread CPU time, best pass of `repeats`.
    const int nk = static_cast<int>(kernels.size()) + 1;
    std::vector<double> best(nk, 1e30);
    int cursor = 0;
    for (int r = 0; r < repeats; ++r) {
      std::vector<double> sum(nk, 0.0);
      for (int t = 0; t < tiles; ++t)
        for (int j = 0; j < nk; ++j) {
          const int which = (j + t) % nk;
          const double t0 = thread_seconds();
          tile(which, t, cursor, c[which].data());
          sum[which] += thread_seconds() - t0;
          cursor = (cursor + s.calls) % pool;
        }
      for (int j = 0; j < nk; ++j) best[j] = std::min(best[j], sum[j]);
    }
    // correctness: the same tile (A and weights) for everyone
    for (int j = 0; j < nk; ++j) tile(j, 0, 0, c[j].data());
    const double flops = 2.0 * s.m * s.n * s.K * s.calls * tiles;
    std::printf("%-24s %9.1f", s.name, flops / best[0] * 1e-9);
    double worst_err = 0;
    for (size_t which = 1; which <= kernels.size(); ++which) {
      std::printf(" %9.1f %6.3f", flops / best[which] * 1e-9, best[0] / best[which]);
      double err = 0, scale = 0;
      for (size_t i = 0; i < csize; ++i) {
        err = std::max(err, (double)std::fabs(c[0][i] - c[which][i]));
        scale = std::max(scale, (double)std::fabs(c[0][i]));
      }
      worst_err = std::max(worst_err, err / scale);
    }
    std::printf("  err %.1e\n", worst_err);
    std::fflush(stdout);
    std::free(packed);
    for (float* p : w) std::free(p);
  }
  return 0;
}
