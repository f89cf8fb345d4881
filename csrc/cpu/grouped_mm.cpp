// grouped_mm and grouped_mm_backward on the CPU: GEMMs over expert row blocks (forward with a fused gated
// activation, and backward), plus the grouped GEMM building blocks fused_experts.cpp composes.
#include <torch/library.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>

#include "cpu/common.h"
#include "cpu/moe_cpu.h"

namespace eureka_fast {
namespace cpu {

GatedActivation parse_gated_activation(const std::string& name, bool fused_names) {
  if (fused_names) {
    if (name == "silu") return GatedActivation::SiluMul;
    if (name == "gelu") return GatedActivation::GeluMul;
    TORCH_CHECK(false, "activation must be 'silu' or 'gelu', got '", name, "'");
  }
  if (name == "none") return GatedActivation::None;
  if (name == "silu_mul") return GatedActivation::SiluMul;
  if (name == "gelu_mul") return GatedActivation::GeluMul;
  TORCH_CHECK(false, "activation must be 'none', 'silu_mul' or 'gelu_mul', got '", name, "'");
}

namespace {

// One unit of parallel work: rows [row0, row0 + rows) of expert `expert`, output columns [col0, col0 + cols).
struct Tile {
  int64_t expert, row0, rows, col0, cols;
};

// Rows per tile: large enough for an efficient GEMM, small enough that several tiles exist per expert in prefill.
constexpr int64_t kRowBlock = 256;

// Experts with at least this many rows run as one multi-threaded BLAS call each (all their rows, all columns)
// instead of single-threaded tiles. Tiles on our AVX-512 many-rows GEMM (packed_tiles) keep up with MKL's own
// threading to more rows than BLAS tiles do: 2 threads, T = 4096, E = 64 (512 rows per expert), best of 14
// alternating runs: tiles 376 ms, whole experts 438 ms; at 750-1024 rows per expert the whole-expert call is ~4-5%
// ahead. BLAS tiles (2-byte weights widened per tile, no AVX-512, double) switch at 384: with bf16 weights at
// T = 4096 the whole-expert path is 5-10% ahead of them.
// EUREKA_FAST_WHOLE_EXPERT_ROWS overrides both switches (read once; for tuning on other machines).
int64_t whole_expert_min_rows(bool packed_tiles) {
  static const int64_t override_rows = [] {
    const char* env = std::getenv("EUREKA_FAST_WHOLE_EXPERT_ROWS");
    if (env == nullptr || *env == '\0') return int64_t(0);
    char* end = nullptr;
    const long long v = std::strtoll(env, &end, 10);
    if (*end != '\0' || v < 1) {
      TORCH_WARN("EUREKA_FAST_WHOLE_EXPERT_ROWS must be a positive integer, got '", env, "'; using the defaults");
      return int64_t(0);
    }
    return static_cast<int64_t>(v);
  }();
  if (override_rows > 0) return override_rows;
  return packed_tiles ? 640 : 384;
}

bool runs_whole(const std::vector<int64_t>& offsets, int64_t e, int64_t min_rows) {
  return at::get_num_threads() > 1 && !at::in_parallel_region() && offsets[e + 1] - offsets[e] >= min_rows;
}

// Rows per tile for an expert's `rows` rows: an even split into blocks of at most kRowBlock (no tiny trailing block;
// the last block may be a few rows shorter).
int64_t row_block(int64_t rows) {
  const int64_t n_blocks = (rows + kRowBlock - 1) / kRowBlock;
  return (rows + n_blocks - 1) / n_blocks;
}

// Tiles for the experts that do not run whole.
std::vector<Tile> plan_tiles(const std::vector<int64_t>& offsets, int64_t n_out, int64_t whole_rows) {
  const int64_t E = static_cast<int64_t>(offsets.size()) - 1;
  struct Block {
    int64_t expert, row0, rows;
  };
  std::vector<Block> blocks;
  for (int64_t e = 0; e < E; ++e) {
    const int64_t rows = offsets[e + 1] - offsets[e];
    if (rows <= 0 || runs_whole(offsets, e, whole_rows)) continue;
    const int64_t per = row_block(rows);
    for (int64_t r = 0; r < rows; r += per) blocks.push_back({e, offsets[e] + r, std::min(per, rows - r)});
  }
  std::vector<Tile> tiles;
  if (blocks.empty() || n_out == 0) return tiles;
  // Enough tiles to keep every thread busy until the end (the scheduler is dynamic), but columns per tile stay
  // wide enough that each BLAS call is efficient: weight-streaming tiles (few rows) may be narrow, GEMM tiles not.
  const int64_t target = 8 * std::max<int64_t>(1, at::get_num_threads());
  const int64_t chunks = std::max<int64_t>(1, (target + static_cast<int64_t>(blocks.size()) - 1) /
                                                  static_cast<int64_t>(blocks.size()));
  for (const Block& b : blocks) {
    const int64_t min_cols = b.rows >= 64 ? 128 : 32;
    int64_t cols = std::max(min_cols, (n_out + chunks - 1) / chunks);
    cols = std::min(n_out, (cols + 15) / 16 * 16);
    for (int64_t c = 0; c < n_out; c += cols) tiles.push_back({b.expert, b.row0, b.rows, c, std::min(cols, n_out - c)});
  }
  // Most expensive first, so the dynamic scheduler ends balanced (stable: same order on every run).
  std::stable_sort(tiles.begin(), tiles.end(),
                   [](const Tile& x, const Tile& y) { return x.rows * x.cols > y.rows * y.cols; });
  return tiles;
}

// Whether a tile of m rows of float goes to the AVX-512 many-rows GEMM (unit-stride weight rows only).
template <typename scalar_t>
bool use_packed_gemm(int64_t m, int64_t K, int64_t b_col_stride) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    static const bool avx512 = cpu_isa() == CpuIsa::Avx512;
    return avx512 && m >= kPackedGemmMinRowsAvx512 && b_col_stride == 1 && K > 0;
  }
  return false;
}

// The row count from which an expert of a grouped GEMM in scalar_t (weights with column stride w_col_stride) runs
// whole: later if its tiles run the AVX-512 many-rows GEMM.
template <typename scalar_t>
int64_t whole_rows_for(int64_t K, int64_t w_col_stride) {
  return whole_expert_min_rows(use_packed_gemm<scalar_t>(kRowBlock, K, w_col_stride));
}

}  // namespace

bool expert_tiles_pack(const std::vector<int64_t>& offsets, int64_t e, int64_t K, int64_t w_col_stride) {
  const int64_t rows = offsets[e + 1] - offsets[e];
  if (rows <= 0 || runs_whole(offsets, e, whole_rows_for<float>(K, w_col_stride))) return false;
  const int64_t per = row_block(rows), last = rows - per * ((rows - 1) / per);  // the shortest block
  return use_packed_gemm<float>(last, K, w_col_stride);
}

namespace {

// One tile's product C = A B^T: the streaming kernel for a few rows of float with unit-stride weight rows, the
// AVX-512 many-rows GEMM for more rows, the BLAS otherwise (a single row is a GEMV, which the BLAS already streams).
template <typename scalar_t>
void tile_gemm(int64_t m, int64_t n, int64_t K, const scalar_t* a, int64_t lda, const scalar_t* b, int64_t b_row_stride,
               int64_t b_col_stride, scalar_t* c, int64_t ldc) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (use_packed_gemm<float>(m, K, b_col_stride)) {
      float* packed = packed_a_scratch(m, K);
      pack_a_avx512(m, K, a, lda, packed);
      gemm_abt_packed_avx512(m, n, K, packed, b, b_row_stride, c, ldc);
      return;
    }
    static const SkinnyRows skinny = skinny_rows();
    if (m >= skinny.min && m <= skinny.max && b_col_stride == 1 && K > 0) {
      skinny_gemm_abt(m, n, K, a, lda, b, b_row_stride, c, ldc);
      return;
    }
  }
  gemm_abt<scalar_t>(m, n, K, a, lda, b, b_row_stride, b_col_stride, c, ldc);
}

// The gate and up products of one tile, side by side in c (columns [0, n) and [n, 2n)): with the AVX-512 many-rows
// GEMM the token rows are packed once for both.
// With `gather`, the tile's A rows are read from the gather's source rows by the packing (the many-rows GEMM only;
// see RowGather).
template <typename scalar_t>
void tile_gemm_gate_up(int64_t m, int64_t n, int64_t K, const scalar_t* a, int64_t lda, const scalar_t* w_gate,
                       const scalar_t* w_up, int64_t b_row_stride, int64_t b_col_stride, scalar_t* c, int64_t ldc,
                       const RowGather* gather = nullptr, int64_t row0 = 0) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (use_packed_gemm<float>(m, K, b_col_stride)) {
      float* packed = packed_a_scratch(m, K);
      if (gather != nullptr)
        pack_a_gather_avx512(m, K, gather->x, gather->ldx, gather->rows + row0, packed);
      else
        pack_a_avx512(m, K, a, lda, packed);
      gemm_abt_packed_avx512(m, n, K, packed, w_gate, b_row_stride, c, ldc);
      gemm_abt_packed_avx512(m, n, K, packed, w_up, b_row_stride, c + n, ldc);
      return;
    }
  }
  tile_gemm<scalar_t>(m, n, K, a, lda, w_gate, b_row_stride, b_col_stride, c, ldc);
  tile_gemm<scalar_t>(m, n, K, a, lda, w_up, b_row_stride, b_col_stride, c + n, ldc);
}

// out[r, :cols] = act(h[r, :cols]) * h[r, cols:2 cols] for `rows` rows of h (leading dimension ldh).
template <typename scalar_t>
void gated_epilogue(const scalar_t* h, int64_t rows, int64_t cols, int64_t ldh, GatedActivation act, scalar_t* out,
                    int64_t ldo) {
  for (int64_t r = 0; r < rows; ++r) {
    const scalar_t* g = h + r * ldh;
    if (act == GatedActivation::SiluMul)
      silu_mul(g, g + cols, out + r * ldo, cols);
    else
      gelu_mul(g, g + cols, out + r * ldo, cols);
  }
}

// One expert's rows with the GEMM's own threading (product(m, a_rows, c, ldc) computes c = a_rows * w_e^T over all
// N columns): straight into `out` without activation; with a gated activation, blocks of rows into a [rows, N]
// buffer (gate and up side by side, one GEMM over both halves), then the activation epilogue in parallel.
template <typename scalar_t, typename Product>
void whole_expert_rows(int64_t rows, const scalar_t* a, int64_t lda, int64_t N, GatedActivation act, scalar_t* out,
                       int64_t ldo, const Product& product) {
  if (act == GatedActivation::None) {
    product(rows, a, out, ldo);
    return;
  }
  const int64_t n_out = N / 2;
  constexpr int64_t kRowsPerCall = 1024;  // bounds the buffer (<= 1024 x N) without shrinking the GEMM much
  scalar_t* buf = thread_scratch<scalar_t>(std::min(rows, kRowsPerCall) * N);
  for (int64_t r0 = 0; r0 < rows; r0 += kRowsPerCall) {
    const int64_t m = std::min(kRowsPerCall, rows - r0);
    product(m, a + r0 * lda, buf, N);
    at::parallel_for(0, m, 16, [&](int64_t i0, int64_t i1) {
      gated_epilogue(buf + i0 * N, i1 - i0, n_out, N, act, out + (r0 + i0) * ldo, ldo);
    });
  }
}

template <typename scalar_t>
void whole_expert_gemm(int64_t rows, int64_t K, const scalar_t* a, int64_t lda, const scalar_t* w_e,
                       int64_t w_row_stride, int64_t w_col_stride, int64_t N, GatedActivation act, scalar_t* out,
                       int64_t ldo) {
  whole_expert_rows<scalar_t>(rows, a, lda, N, act, out, ldo, [&](int64_t m, const scalar_t* a_rows, scalar_t* c,
                                                                  int64_t ldc) {
    gemm_abt<scalar_t>(m, N, K, a_rows, lda, w_e, w_row_stride, w_col_stride, c, ldc);
  });
}

// Rows of fp32 activations rounded to bf16 (nearest even), dense [m, K].
void round_rows_to_bf16(const float* a, int64_t m, int64_t K, int64_t lda, c10::BFloat16* dst) {
  const bool avx512_bf16 = cpu_has_bf16_matmul();
  at::parallel_for(0, m, std::max<int64_t>(1, 16384 / std::max<int64_t>(K, 1)), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      if (avx512_bf16) {
        narrow_to_bf16_avx512bf16(a + r * lda, K, reinterpret_cast<uint16_t*>(dst + r * K));
      } else {
        for (int64_t kk = 0; kk < K; ++kk) dst[r * K + kk] = c10::BFloat16(a[r * lda + kk]);
      }
    }
  });
}

// C[m, n] (fp32, leading dimension ldc) = A16[m, K] * B^T for bf16 activations (dense) and bf16 weight rows B (row
// stride ldb), through ATen's bf16 matmul (oneDNN: AMX or AVX512-BF16 where the CPU has them, several times the fp32
// FMA rate). The products of bf16 values are exact in fp32 and oneDNN accumulates in fp32; its result comes back
// rounded to bf16, as in transformers' own bf16 experts, and is widened here. Multi-threaded outside a parallel
// region, single-threaded inside one.
void bf16_matmul_abt(int64_t m, int64_t n, int64_t K, const c10::BFloat16* a16, const uint16_t* b, int64_t ldb,
                     float* c, int64_t ldc) {
  const auto bf16 = at::TensorOptions().dtype(at::kBFloat16);
  c10::BFloat16* c16 = thread_scratch<c10::BFloat16, 3>(m * n);
  at::Tensor out = at::from_blob(c16, {m, n}, bf16);
  at::mm_out(out, at::from_blob(const_cast<c10::BFloat16*>(a16), {m, K}, bf16),
             at::from_blob(const_cast<uint16_t*>(b), {n, K}, {ldb, 1}, bf16).t());
  at::parallel_for(0, m, std::max<int64_t>(1, 16384 / std::max<int64_t>(n, 1)), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r)
      widen_to_float(reinterpret_cast<const uint16_t*>(c16 + r * n), n, WeightFormat::BFloat16, c + r * ldc);
  });
}

}  // namespace

template <typename scalar_t>
void grouped_gemm_forward(const scalar_t* a, int64_t lda, int64_t K, const scalar_t* w, int64_t w_expert_stride,
                          int64_t w_row_stride, int64_t w_col_stride, int64_t N, const std::vector<int64_t>& offsets,
                          GatedActivation act, scalar_t* out, int64_t ldo, const RowGather* gather) {
  const bool gated = act != GatedActivation::None;
  const int64_t n_out = gated ? N / 2 : N;
  const int64_t E = static_cast<int64_t>(offsets.size()) - 1;
  const int64_t whole_rows = whole_rows_for<scalar_t>(K, w_col_stride);
  for (int64_t e = 0; e < E; ++e) {
    if (runs_whole(offsets, e, whole_rows))
      whole_expert_gemm<scalar_t>(offsets[e + 1] - offsets[e], K, a + offsets[e] * lda, lda, w + e * w_expert_stride,
                                  w_row_stride, w_col_stride, N, act, out + offsets[e] * ldo, ldo);
  }
  const std::vector<Tile> tiles = plan_tiles(offsets, n_out, whole_rows);
  run_tasks(static_cast<int64_t>(tiles.size()), [&](int64_t i) {
    const Tile& t = tiles[i];
    const scalar_t* a_rows = a + t.row0 * lda;
    const scalar_t* w_e = w + t.expert * w_expert_stride;
    scalar_t* o = out + t.row0 * ldo + t.col0;
    if (!gated) {
      tile_gemm<scalar_t>(t.rows, t.cols, K, a_rows, lda, w_e + t.col0 * w_row_stride, w_row_stride, w_col_stride, o,
                          ldo);
      return;
    }
    // Gate and up columns of this chunk side by side in a per-thread buffer, then the activation epilogue while
    // they are still in cache.
    scalar_t* buf = thread_scratch<scalar_t>(t.rows * 2 * t.cols);
    const int64_t ldb = 2 * t.cols;
    tile_gemm_gate_up<scalar_t>(t.rows, t.cols, K, a_rows, lda, w_e + t.col0 * w_row_stride,
                                w_e + (n_out + t.col0) * w_row_stride, w_row_stride, w_col_stride, buf, ldb, gather,
                                t.row0);
    gated_epilogue(buf, t.rows, t.cols, ldb, act, o, ldo);
  });
}
template void grouped_gemm_forward<float>(const float*, int64_t, int64_t, const float*, int64_t, int64_t, int64_t,
                                          int64_t, const std::vector<int64_t>&, GatedActivation, float*, int64_t,
                                          const RowGather*);
template void grouped_gemm_forward<double>(const double*, int64_t, int64_t, const double*, int64_t, int64_t, int64_t,
                                           int64_t, const std::vector<int64_t>&, GatedActivation, double*, int64_t,
                                           const RowGather*);

namespace {

// rows x K weights (row stride ld) widened to a dense float [rows, K] buffer.
void widen_rows(const uint16_t* w, int64_t rows, int64_t K, int64_t ld, WeightFormat format, float* dst) {
  for (int64_t r = 0; r < rows; ++r) widen_to_float(w + r * ld, K, format, dst + r * K);
}

// grouped_gemm_forward<float> on 2-byte weights read as stored (row-major [E, N, K], unit inner stride): the
// few-rows kernel widens them in registers; other tiles widen their own weight rows into a per-thread buffer just
// before the GEMM. So a call reads only the experts it routes to, at 2 bytes per weight, and never materialises an
// fp32 copy of the whole tensor (which cost 170 ms at one token for 64 experts of 1024 x 512).
// With bf16_inputs (the caller's activations were bf16, so rounding them to bf16 loses nothing the caller had) and
// bf16 weights on a CPU with bf16 matrix instructions, tiles beyond the few-rows kernel's range and whole experts
// run as bf16 matmuls (bf16_matmul_abt).
void grouped_gemm_forward_2byte(const float* a, int64_t lda, int64_t K, const uint16_t* w, WeightFormat format,
                                int64_t w_expert_stride, int64_t w_row_stride, int64_t N,
                                const std::vector<int64_t>& offsets, GatedActivation act, float* out, int64_t ldo,
                                bool bf16_inputs) {
  const bool gated = act != GatedActivation::None;
  const int64_t n_out = gated ? N / 2 : N;
  const int64_t E = static_cast<int64_t>(offsets.size()) - 1;
  const bool bf16_matmul = bf16_inputs && format == WeightFormat::BFloat16 && cpu_has_bf16_matmul();
  const int64_t whole_rows = whole_expert_min_rows(false);  // these tiles widen their weights and run the BLAS
  for (int64_t e = 0; e < E; ++e) {
    if (!runs_whole(offsets, e, whole_rows)) continue;
    if (bf16_matmul) {
      const uint16_t* w_e = w + e * w_expert_stride;
      whole_expert_rows<float>(offsets[e + 1] - offsets[e], a + offsets[e] * lda, lda, N, act, out + offsets[e] * ldo,
                               ldo, [&](int64_t m, const float* a_rows, float* c, int64_t ldc) {
                                 at::Tensor a16 = at::empty({m, K}, at::kBFloat16);
                                 round_rows_to_bf16(a_rows, m, K, lda, a16.data_ptr<c10::BFloat16>());
                                 bf16_matmul_abt(m, N, K, a16.data_ptr<c10::BFloat16>(), w_e, w_row_stride, c, ldc);
                               });
      continue;
    }
    at::Tensor widened = at::empty({N, K}, at::kFloat);
    float* wf = widened.data_ptr<float>();
    const uint16_t* w_e = w + e * w_expert_stride;
    at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
      widen_rows(w_e + n0 * w_row_stride, n1 - n0, K, w_row_stride, format, wf + n0 * K);
    });
    whole_expert_gemm<float>(offsets[e + 1] - offsets[e], K, a + offsets[e] * lda, lda, wf, K, 1, N, act,
                             out + offsets[e] * ldo, ldo);
  }
  const std::vector<Tile> tiles = plan_tiles(offsets, n_out, whole_rows);
  const bool skinny_2byte = cpu_isa() == CpuIsa::Avx512;
  run_tasks(static_cast<int64_t>(tiles.size()), [&](int64_t i) {
    const Tile& t = tiles[i];
    const float* a_rows = a + t.row0 * lda;
    const uint16_t* w_e = w + t.expert * w_expert_stride;
    float* o = out + t.row0 * ldo + t.col0;
    if (bf16_matmul && !(skinny_2byte && t.rows <= kSkinnyMaxRowsAvx512)) {
      c10::BFloat16* a16 = thread_scratch<c10::BFloat16, 2>(t.rows * K);
      round_rows_to_bf16(a_rows, t.rows, K, lda, a16);
      if (!gated) {
        bf16_matmul_abt(t.rows, t.cols, K, a16, w_e + t.col0 * w_row_stride, w_row_stride, o, ldo);
        return;
      }
      float* buf = thread_scratch<float>(t.rows * 2 * t.cols);
      if (t.cols == n_out) {  // gate and up rows are one contiguous block of N weight rows: one matmul
        bf16_matmul_abt(t.rows, N, K, a16, w_e, w_row_stride, buf, N);
      } else {
        bf16_matmul_abt(t.rows, t.cols, K, a16, w_e + t.col0 * w_row_stride, w_row_stride, buf, 2 * t.cols);
        bf16_matmul_abt(t.rows, t.cols, K, a16, w_e + (n_out + t.col0) * w_row_stride, w_row_stride, buf + t.cols,
                        2 * t.cols);
      }
      gated_epilogue(buf, t.rows, t.cols, 2 * t.cols, act, o, ldo);
      return;
    }
    // C[rows, cols] = a_rows * (weight rows starting at b)^T
    auto product = [&](const uint16_t* b, float* c, int64_t ldc) {
      if (skinny_2byte && t.rows <= kSkinnyMaxRowsAvx512) {
        skinny_gemm_abt_avx512(t.rows, t.cols, K, a_rows, lda, b, w_row_stride, format, c, ldc);
        return;
      }
      float* wf = thread_scratch<float, 1>(t.cols * K);
      widen_rows(b, t.cols, K, w_row_stride, format, wf);
      tile_gemm<float>(t.rows, t.cols, K, a_rows, lda, wf, K, 1, c, ldc);
    };
    if (!gated) {
      product(w_e + t.col0 * w_row_stride, o, ldo);
      return;
    }
    float* buf = thread_scratch<float>(t.rows * 2 * t.cols);
    const uint16_t* w_gate = w_e + t.col0 * w_row_stride;
    const uint16_t* w_up = w_e + (n_out + t.col0) * w_row_stride;
    if (skinny_2byte && t.rows <= kSkinnyMaxRowsAvx512) {
      product(w_gate, buf, 2 * t.cols);
      product(w_up, buf + t.cols, 2 * t.cols);
    } else {  // both weight slices widened, then one gate+up call (the token rows packed once)
      float* wf = thread_scratch<float, 1>(2 * t.cols * K);
      widen_rows(w_gate, t.cols, K, w_row_stride, format, wf);
      widen_rows(w_up, t.cols, K, w_row_stride, format, wf + t.cols * K);
      tile_gemm_gate_up<float>(t.rows, t.cols, K, a_rows, lda, wf, wf + t.cols * K, K, 1, buf, 2 * t.cols);
    }
    gated_epilogue(buf, t.rows, t.cols, 2 * t.cols, act, o, ldo);
  });
}

}  // namespace

bool reads_2byte_weights(const at::Tensor& w, at::ScalarType cd) {
  const at::ScalarType t = w.scalar_type();
  return cd == at::kFloat && (t == at::kBFloat16 || t == at::kHalf) && (w.stride(2) == 1 || w.size(2) <= 1) &&
         (w.stride(1) >= w.size(2) || w.size(1) <= 1);
}

at::Tensor blas_ready_weight(const at::Tensor& w, at::ScalarType cd) {
  at::Tensor r = w.scalar_type() == cd ? w : w.to(cd);
  const int64_t N = r.size(1), K = r.size(2), sN = r.stride(1), sK = r.stride(2);
  const bool row_major = (sK == 1 || K <= 1) && (sN >= K || N <= 1);
  const bool col_major = (sN == 1 || N <= 1) && (sK >= N || K <= 1);
  if (!(row_major || col_major) || (r.size(0) > 1 && r.stride(0) == 0)) r = r.contiguous();
  return r;
}

std::pair<int64_t, int64_t> inner_strides(const at::Tensor& w) {
  const int64_t N = w.size(1), K = w.size(2);
  int64_t sN = w.stride(1), sK = w.stride(2);
  if (K <= 1) sK = 1;
  if (sK != 1 && N <= 1) sN = 1;
  return {sN, sK};
}

template <typename scalar_t>
void grouped_forward_weights(const scalar_t* a, int64_t lda, int64_t K, const at::Tensor& w, at::ScalarType cd,
                             const std::vector<int64_t>& offsets, GatedActivation act, scalar_t* out, int64_t ldo,
                             bool bf16_inputs, const RowGather* gather) {
  const int64_t N = w.size(1);
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (reads_2byte_weights(w, cd)) {
      const WeightFormat format = w.scalar_type() == at::kBFloat16 ? WeightFormat::BFloat16 : WeightFormat::Half;
      grouped_gemm_forward_2byte(a, lda, K, static_cast<const uint16_t*>(w.data_ptr()), format, w.stride(0),
                                 N <= 1 ? K : w.stride(1), N, offsets, act, out, ldo, bf16_inputs);
      return;
    }
  }
  const at::Tensor wc = blas_ready_weight(w, cd);
  auto [sN, sK] = inner_strides(wc);
  grouped_gemm_forward<scalar_t>(a, lda, K, wc.data_ptr<scalar_t>(), wc.stride(0), sN, sK, N, offsets, act, out, ldo,
                                 gather);
}

template void grouped_forward_weights<float>(const float*, int64_t, int64_t, const at::Tensor&, at::ScalarType,
                                             const std::vector<int64_t>&, GatedActivation, float*, int64_t, bool,
                                             const RowGather*);
template void grouped_forward_weights<double>(const double*, int64_t, int64_t, const at::Tensor&, at::ScalarType,
                                              const std::vector<int64_t>&, GatedActivation, double*, int64_t, bool,
                                              const RowGather*);

namespace {

void check_grouped_args(const at::Tensor& a, const at::Tensor& w, GatedActivation act) {
  check_float_tensor(a, 2, "a");
  check_float_tensor(w, 3, "w");
  TORCH_CHECK(w.size(2) == a.size(1), "w must have shape [E, N, K] with K = a.size(1) = ", a.size(1), ", got ",
              w.sizes());
  TORCH_CHECK(act == GatedActivation::None || w.size(1) % 2 == 0,
              "a gated activation needs an even N (gate and up halves), got w of shape ", w.sizes());
}

at::Tensor grouped_mm_cpu(const at::Tensor& a, const at::Tensor& w, const at::Tensor& offsets,
                          c10::string_view activation) {
  const GatedActivation act = parse_gated_activation(std::string(activation), false);
  check_grouped_args(a, w, act);
  const int64_t S = a.size(0), K = a.size(1), E = w.size(0), N = w.size(1);
  const std::vector<int64_t> offs = checked_offsets(offsets, E, S, "offsets");
  const int64_t n_out = act == GatedActivation::None ? N : N / 2;
  const at::ScalarType cd = compute_dtype(a.scalar_type());
  const bool covers_all = offs[0] == 0 && offs[E] == S;
  at::Tensor out = covers_all ? at::empty({S, n_out}, a.options().dtype(cd)) : at::zeros({S, n_out}, a.options().dtype(cd));
  if (S == 0 || n_out == 0) return out.to(a.scalar_type());
  at::Tensor ac = rows_contiguous(a, cd);
  if (K == 0) {
    // Empty reduction: the product is zero, the activation of zero gates times zero is zero.
    out.zero_();
    return out.to(a.scalar_type());
  }
  AT_DISPATCH_FLOATING_TYPES(cd, "grouped_mm", [&] {
    grouped_forward_weights<scalar_t>(ac.data_ptr<scalar_t>(), ac.stride(0), K, w, cd, offs, act,
                                      out.data_ptr<scalar_t>(), n_out, a.scalar_type() == at::kBFloat16);
  });
  return out.scalar_type() == a.scalar_type() ? out : out.to(a.scalar_type());
}

// d/dgate and d/dup of act(gate) * up, given the upstream gradient of the product.
template <typename scalar_t>
void gated_backward(const scalar_t* h, int64_t half, const scalar_t* grad, scalar_t* dh, GatedActivation act) {
  for (int64_t j = 0; j < half; ++j) {
    const double g = h[j], u = h[half + j], go = grad[j];
    double f, df;
    if (act == GatedActivation::SiluMul) {
      const double s = 1.0 / (1.0 + std::exp(-g));
      f = g * s;
      df = s * (1.0 + g * (1.0 - s));
    } else {
      const double cdf = 0.5 * (1.0 + std::erf(g * 0.70710678118654752));
      f = g * cdf;
      df = cdf + g * std::exp(-0.5 * g * g) * 0.39894228040143268;
    }
    dh[j] = static_cast<scalar_t>(go * u * df);
    dh[half + j] = static_cast<scalar_t>(go * f);
  }
}

// grad_a and grad_w start uninitialised: every active expert's rows of grad_a and its whole grad_w slice are
// overwritten by the backward GEMMs, so only the rows outside the experts and the experts with no rows (exactly zero)
// are cleared here. Returns the active experts, most rows first.
std::vector<int64_t> clear_uncovered_gradients(at::Tensor& grad_a, at::Tensor& grad_w,
                                               const std::vector<int64_t>& offs) {
  const int64_t S = grad_a.size(0), E = grad_w.size(0);
  grad_a.narrow(0, 0, offs[0]).zero_();
  grad_a.narrow(0, offs[E], S - offs[E]).zero_();
  std::vector<int64_t> active;
  for (int64_t e = 0; e < E; ++e) {
    if (offs[e + 1] > offs[e])
      active.push_back(e);
    else
      grad_w[e].zero_();
  }
  std::stable_sort(active.begin(), active.end(),
                   [&](int64_t x, int64_t y) { return offs[x + 1] - offs[x] > offs[y + 1] - offs[y]; });
  return active;
}

// Many small experts: one single-threaded expert per worker; few big ones: one after the other, each with the
// GEMM's own threads.
template <typename F>
void run_expert_backward(int64_t n_active, const F& expert_backward) {
  if (n_active >= 2 * at::get_num_threads()) {
    run_tasks(n_active, expert_backward);
  } else {
    for (int64_t i = 0; i < n_active; ++i) expert_backward(i);
  }
}

// Backward of the plain (no activation) grouped GEMM when everything is bf16: per expert grad_a = g w_e and
// grad_w = g^T a_e as bf16 matmuls (oneDNN accumulates in fp32 and rounds once, as the fp32 route followed by the
// final cast to bf16 does, since every input is exactly representable either way), with no fp32 copies of the
// operands. Inactive experts get exactly zero weight gradient, rows outside the experts zero input gradient.
std::tuple<at::Tensor, at::Tensor> grouped_mm_backward_bf16(const at::Tensor& grad_out, const at::Tensor& a,
                                                            const at::Tensor& w, const std::vector<int64_t>& offs) {
  const int64_t S = a.size(0), K = a.size(1), E = w.size(0), N = w.size(1);
  const at::Tensor g = grad_out.contiguous(), ac = a.contiguous(), wc = w.contiguous();
  at::Tensor grad_a = at::empty({S, K}, ac.options());
  at::Tensor grad_w = at::empty({E, N, K}, wc.options());
  const std::vector<int64_t> active = clear_uncovered_gradients(grad_a, grad_w, offs);
  auto expert_backward = [&](int64_t idx) {
    // The saved a and w still require grad; these matmuls belong to no graph. Set on the thread that runs them
    // (grad mode is thread-local and the parallel workers do not inherit it).
    const at::NoGradGuard no_grad;
    const int64_t e = active[idx], r0 = offs[e], rows = offs[e + 1] - r0;
    const at::Tensor g_e = g.narrow(0, r0, rows);
    at::Tensor grad_a_e = grad_a.narrow(0, r0, rows), grad_w_e = grad_w[e];
    at::mm_out(grad_a_e, g_e, wc[e]);
    at::mm_out(grad_w_e, g_e.t(), ac.narrow(0, r0, rows));
  };
  run_expert_backward(static_cast<int64_t>(active.size()), expert_backward);
  return {grad_a, grad_w};
}

std::tuple<at::Tensor, at::Tensor> grouped_mm_backward_cpu(const at::Tensor& grad_out, const at::Tensor& a,
                                                           const at::Tensor& w, const at::Tensor& offsets,
                                                           c10::string_view activation) {
  const GatedActivation act = parse_gated_activation(std::string(activation), false);
  check_grouped_args(a, w, act);
  const int64_t S = a.size(0), K = a.size(1), E = w.size(0), N = w.size(1);
  const int64_t n_out = act == GatedActivation::None ? N : N / 2;
  check_cpu(grad_out, "grad_out");
  TORCH_CHECK(grad_out.dim() == 2 && grad_out.size(0) == S && grad_out.size(1) == n_out, "grad_out must have shape [",
              S, ", ", n_out, "], got ", grad_out.sizes());
  const std::vector<int64_t> offs = checked_offsets(offsets, E, S, "offsets");
  if (act == GatedActivation::None && a.scalar_type() == at::kBFloat16 && w.scalar_type() == at::kBFloat16 &&
      grad_out.scalar_type() == at::kBFloat16 && cpu_has_bf16_matmul() && S > 0 && K > 0 && N > 0)
    return grouped_mm_backward_bf16(grad_out, a, w, offs);
  const at::ScalarType cd = compute_dtype(a.scalar_type());
  at::Tensor g = grad_out.to(cd).contiguous(), ac = a.to(cd).contiguous(), wc = w.to(cd).contiguous();
  if (S == 0 || K == 0 || N == 0)
    return {at::zeros({S, K}, a.options().dtype(a.scalar_type())), at::zeros({E, N, K}, w.options())};
  // Uninitialised instead of zero-filled (grad_w is as large as the weights): see clear_uncovered_gradients.
  at::Tensor grad_a = at::empty({S, K}, ac.options());
  at::Tensor grad_w = at::empty({E, N, K}, ac.options());
  const std::vector<int64_t> active = clear_uncovered_gradients(grad_a, grad_w, offs);
  AT_DISPATCH_FLOATING_TYPES(cd, "grouped_mm_backward", [&] {
    const scalar_t* gp = g.data_ptr<scalar_t>();
    const scalar_t* ap = ac.data_ptr<scalar_t>();
    const scalar_t* wp = wc.data_ptr<scalar_t>();
    scalar_t* gap = grad_a.data_ptr<scalar_t>();
    scalar_t* gwp = grad_w.data_ptr<scalar_t>();
    auto expert_backward = [&](int64_t idx) {
      const int64_t e = active[idx], r0 = offs[e], rows = offs[e + 1] - r0;
      const scalar_t* w_e = wp + e * N * K;
      const scalar_t* a_e = ap + r0 * K;
      const scalar_t* dh = gp + r0 * n_out;
      std::unique_ptr<scalar_t[]> dh_buf;
      if (act != GatedActivation::None) {
        // Recompute the pre-activation h = a_e w_e^T, then turn it into dL/dh row by row (both fully written).
        std::unique_ptr<scalar_t[]> h(new scalar_t[static_cast<size_t>(rows) * N]);
        gemm_abt<scalar_t>(rows, N, K, a_e, K, w_e, K, 1, h.get(), N);
        dh_buf.reset(new scalar_t[static_cast<size_t>(rows) * N]);
        for (int64_t r = 0; r < rows; ++r)
          gated_backward<scalar_t>(h.get() + r * N, n_out, dh + r * n_out, dh_buf.get() + r * N, act);
        dh = dh_buf.get();
      }
      gemm_ab<scalar_t>(rows, K, N, dh, N, w_e, K, gap + r0 * K, K);           // grad_a = dh @ w_e
      gemm_atb<scalar_t>(N, K, rows, dh, N, a_e, K, gwp + e * N * K, K);       // grad_w = dh^T @ a_e
    };
    run_expert_backward(static_cast<int64_t>(active.size()), expert_backward);
  });
  return {grad_a.to(a.scalar_type()), grad_w.to(w.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(eureka_fast, CPU, m) {
  m.impl("grouped_mm", &grouped_mm_cpu);
  m.impl("grouped_mm_backward", &grouped_mm_backward_cpu);
}

}  // namespace cpu
}  // namespace eureka_fast
