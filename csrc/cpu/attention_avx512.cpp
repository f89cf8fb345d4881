// AVX-512 attention for head_dim 64, float32 (the Whisper encoder's heads): our own register-blocked microkernels
// instead of two MKL GEMMs per query block (MKL runs K = 64 / N = 64 shapes at ~85% of its square rate and repacks
// K for every query block).
//
// Per (batch, head): K and V as contiguous [keys, 64] (L2-resident, 2 x 384 KB at 1500 keys): read in place when
// dense, else copied once (the rows of a fused QKV output are 3 * H * 64 floats apart). Per block of 64 queries:
//   1. Q^T [64 dims][64 queries] packed once by gathers from dense rows (q's bias and the scale folded in; missing
//      queries zero), L1-resident.
//   2. Scores transposed, S^T[key][query] = K Q^T: register tiles of 6 keys x 64 queries (24 zmm accumulators,
//      one broadcast K element per 4 FMAs); the column (per-query) max is folded into the tile's store. S^T
//      (keys x 256 B, 384 KB at 1500 keys) stays in L2 next to K and V.
//   3. Per chunk of 256 keys: P^T = 2^((S^T - max) log2 e) in place (the softmax runs down the columns:
//      elementwise over rows, vectorised over 16 queries, no horizontal reductions; column sums in registers), then
//      O[q][0..63] += P^T[key][q] V[key][0..63] with register tiles of 6 queries x 64 dims (24 zmm accumulators,
//      one broadcast P element per 4 FMAs), V and P^T streamed from L2. The chunks keep the running sums short:
//      one 1500-term sum per output lost ~3x more to rounding than MKL's blocked GEMM (1.4e-5 vs 5e-6 max error
//      against float64 on peaked scores; 5e-6 with the chunks).
//   4. out rows = O / column sums (+ v's bias, when the caller's projection left it out: the weights sum to 1).
// Measured (1 thread, tiny: 6 heads, T = 1500): both products run at ~96% of the FMA peak, the exps take ~8% of the
// time. Smaller chunks that keep V's chunk in L1 (32-128 keys) were slower (the accumulators' reload per chunk
// costs more than streaming V from L2).
// Each task runs with FTZ/DAZ set (restored after): exponentials below 2^-126 (natural-log argument below ~-87.3)
// give exactly 0, so no denormal ever reaches the FMAs, and a tiny V element cannot make one either.
#include "cpu/attention_avx512.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <limits>
#include <vector>

#define EF_AVX512 __attribute__((target("avx512f,avx512dq,avx512bw,avx512vl,avx2,fma")))

namespace eureka_fast {
namespace cpu {
namespace {

constexpr int kDh = 64;      // head dim this kernel handles
constexpr int kQBlock = 64;  // queries per block: 4 zmm
constexpr int kKeyTile = 6;  // keys per S^T register tile
constexpr int kQTile = 6;    // queries per P V register tile (12 x 32 dims, half the V bytes per FMA: no faster)
constexpr int kSumChunk = 256;  // keys per exp + P V chunk: partial sums per chunk (accuracy, see pv_tile)

// 2^t for t <= ~0: t = floor(t) + f, f in [0, 1) by vreduceps (exact, one instruction), 2^f by a degree-5
// polynomial (near-minimax for relative error, 1.6e-7 in float32 Horner), times 2^floor(t) by vscalefps (which
// floors its exponent operand itself). Results below 2^-126 (t < -126, -inf included) are exactly 0: vscalefps
// flushes them under the FTZ bit every task sets (no compare + mask: ~10% of the exps' instructions).
EF_AVX512 inline __m512 exp2_flushed(__m512 t) {
  const __m512 f = _mm512_reduce_ps(t, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  __m512 p = _mm512_set1_ps(1.877576695e-03f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(8.989340626e-03f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.582631752e-02f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.401536107e-01f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.931530833e-01f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.999999404e-01f));
  return _mm512_scalef_ps(p, t);
}

// S^T[KK keys][NZ*16 queries] = K[KK][64] Q^T[64][NZ*16]; rows of st and qt have stride kQBlock, k rows kDh.
// colmax[q] = max(colmax[q], the tile's column).
template <int KK, int NZ>
EF_AVX512 void scores_tile(const float* k, const float* qt, float* st, float* colmax) {
  __m512 acc[KK][NZ];
  for (int i = 0; i < KK; ++i)
    for (int j = 0; j < NZ; ++j) acc[i][j] = _mm512_setzero_ps();
  for (int d = 0; d < kDh; ++d) {
    __m512 qv[NZ];
    for (int j = 0; j < NZ; ++j) qv[j] = _mm512_loadu_ps(qt + d * kQBlock + 16 * j);
    for (int i = 0; i < KK; ++i) {
      const __m512 kb = _mm512_set1_ps(k[i * kDh + d]);
      for (int j = 0; j < NZ; ++j) acc[i][j] = _mm512_fmadd_ps(kb, qv[j], acc[i][j]);
    }
  }
  for (int j = 0; j < NZ; ++j) {
    __m512 m = _mm512_loadu_ps(colmax + 16 * j);
    for (int i = 0; i < KK; ++i) {
      _mm512_storeu_ps(st + i * kQBlock + 16 * j, acc[i][j]);
      m = _mm512_max_ps(m, acc[i][j]);
    }
    _mm512_storeu_ps(colmax + 16 * j, m);
  }
}

// O[NQ][64] (rows of stride kDh) = (FIRST ? 0 : O) + sum_t P^T[t][0..NQ) V[t][0..64) over nk >= 1 keys, summed in
// registers from zero (partial sums per chunk of keys: a 1500-term running sum would lose ~2x more to rounding);
// p rows have stride kQBlock.
template <int NQ, bool FIRST>
EF_AVX512 void pv_tile(const float* p, const float* v, int64_t nk, float* o) {
  __m512 acc[NQ][4];
  for (int i = 0; i < NQ; ++i)
    for (int j = 0; j < 4; ++j) acc[i][j] = _mm512_setzero_ps();
  int64_t t = 0;
  do {  // nk >= 1 (a loop that may run zero times makes GCC keep the accumulators on the stack)
    const float* vr = v + t * kDh;
    const __m512 v0 = _mm512_loadu_ps(vr), v1 = _mm512_loadu_ps(vr + 16), v2 = _mm512_loadu_ps(vr + 32),
                 v3 = _mm512_loadu_ps(vr + 48);
    for (int i = 0; i < NQ; ++i) {
      const __m512 pb = _mm512_set1_ps(p[t * kQBlock + i]);
      acc[i][0] = _mm512_fmadd_ps(pb, v0, acc[i][0]);
      acc[i][1] = _mm512_fmadd_ps(pb, v1, acc[i][1]);
      acc[i][2] = _mm512_fmadd_ps(pb, v2, acc[i][2]);
      acc[i][3] = _mm512_fmadd_ps(pb, v3, acc[i][3]);
    }
  } while (++t < nk);
  for (int i = 0; i < NQ; ++i)
    for (int j = 0; j < 4; ++j) {
      float* dst = o + i * kDh + 16 * j;
      _mm512_storeu_ps(dst, FIRST ? acc[i][j] : _mm512_add_ps(_mm512_loadu_ps(dst), acc[i][j]));
    }
}

using ScoresFn = void (*)(const float*, const float*, float*, float*);
using PvFn = void (*)(const float*, const float*, int64_t, float*);

template <int KK>
constexpr ScoresFn scores_fn(int nz) {
  return nz == 1 ? &scores_tile<KK, 1> : nz == 2 ? &scores_tile<KK, 2> : nz == 3 ? &scores_tile<KK, 3>
                                                                                  : &scores_tile<KK, 4>;
}
ScoresFn scores_dispatch(int kk, int nz) {
  switch (kk) {
    case 1: return scores_fn<1>(nz);
    case 2: return scores_fn<2>(nz);
    case 3: return scores_fn<3>(nz);
    case 4: return scores_fn<4>(nz);
    case 5: return scores_fn<5>(nz);
    default: return scores_fn<6>(nz);
  }
}
static_assert(kKeyTile == 6 && kQTile == 6, "the dispatch tables below cover tiles up to 6");
template <bool FIRST>
PvFn pv_dispatch(int nq) {
  switch (nq) {
    case 1: return &pv_tile<1, FIRST>;
    case 2: return &pv_tile<2, FIRST>;
    case 3: return &pv_tile<3, FIRST>;
    case 4: return &pv_tile<4, FIRST>;
    case 5: return &pv_tile<5, FIRST>;
    default: return &pv_tile<6, FIRST>;
  }
}

// p = 2^(s log2e - max log2e) for rows [0, nk) of S^T (NZ zmm per row) into p (may alias st), column sums added to
// colsum (one register per zmm column: no horizontal reductions).
template <int NZ>
EF_AVX512 void exp_rows(const float* st, int64_t nk, const float* neg_max_l2e, float* p, float* colsum) {
  const __m512 l2e = _mm512_set1_ps(1.44269504088896341f);
  __m512 shift[NZ], sum[NZ];
  for (int j = 0; j < NZ; ++j) {
    shift[j] = _mm512_loadu_ps(neg_max_l2e + 16 * j);
    sum[j] = _mm512_setzero_ps();
  }
  for (int64_t t = 0; t < nk; ++t) {
    for (int j = 0; j < NZ; ++j) {
      const __m512 e = exp2_flushed(_mm512_fmadd_ps(_mm512_loadu_ps(st + t * kQBlock + 16 * j), l2e, shift[j]));
      _mm512_storeu_ps(p + t * kQBlock + 16 * j, e);
      sum[j] = _mm512_add_ps(sum[j], e);
    }
  }
  for (int j = 0; j < NZ; ++j) _mm512_storeu_ps(colsum + 16 * j, _mm512_add_ps(_mm512_loadu_ps(colsum + 16 * j), sum[j]));
}
using ExpFn = void (*)(const float*, int64_t, const float*, float*, float*);
ExpFn exp_dispatch(int nz) {
  return nz == 1 ? &exp_rows<1> : nz == 2 ? &exp_rows<2> : nz == 3 ? &exp_rows<3> : &exp_rows<4>;
}

inline float* align64(float* p) {
  return reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(p) + 63) & ~static_cast<uintptr_t>(63));
}

EF_AVX512 void attention_head(const float* qb, int64_t q_row, const float* kb, int64_t k_row, const float* vb,
                              int64_t v_row, int64_t Tq, int64_t keys, float scale, const float* q_bias,
                              const float* v_bias, float* ob, int64_t o_row) {
  thread_local std::vector<float> buffer;
  // K, V and Q rows already dense ([keys, 64], e.g. contiguous [B, H, T, 64] inputs) are read in place; rows
  // further apart (the encoder's fused [T, 3d] qkv) are copied first: K, V once per head, Q per block of 64 rows
  // (then the Q^T gathers index 64-float rows: any caller stride, no 32-bit offset limit; measured no faster
  // than gathering from the strided rows directly)
  const bool k_dense = k_row == kDh, v_dense = v_row == kDh, q_dense = q_row == kDh;
  const int64_t need = (k_dense ? 0 : keys * kDh) + (v_dense ? 0 : keys * kDh) + keys * kQBlock + kDh * kQBlock +
                       kQBlock * kDh + (q_dense ? 0 : kQBlock * kDh) + 3 * kQBlock + 7 * 16;
  if (static_cast<int64_t>(buffer.size()) < need) buffer.resize(need);
  float* next = align64(buffer.data());
  const float* k_head = kb;
  const float* v_head = vb;
  if (!k_dense) {
    for (int64_t t = 0; t < keys; ++t) std::memcpy(next + t * kDh, kb + t * k_row, kDh * sizeof(float));
    k_head = next;
    next = align64(next + keys * kDh);
  }
  if (!v_dense) {
    for (int64_t t = 0; t < keys; ++t) std::memcpy(next + t * kDh, vb + t * v_row, kDh * sizeof(float));
    v_head = next;
    next = align64(next + keys * kDh);
  }
  float* st = next;
  float* qt = align64(st + keys * kQBlock);
  float* obuf = align64(qt + kDh * kQBlock);
  float* qrows = align64(obuf + kQBlock * kDh);  // used when !q_dense
  float* colmax = q_dense ? qrows : align64(qrows + kQBlock * kDh);
  float* colsum = colmax + kQBlock;
  float* neg_max_l2e = colsum + kQBlock;
  const __m512i row_index = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                                _mm512_set1_epi32(kDh));
  const __m512 vscale = _mm512_set1_ps(scale);
  for (int64_t q0 = 0; q0 < Tq; q0 += kQBlock) {
    const int64_t nq = std::min<int64_t>(kQBlock, Tq - q0);
    const int nz = static_cast<int>((nq + 15) / 16);
    const float* qblock = qb + q0 * q_row;
    if (!q_dense) {
      for (int64_t i = 0; i < nq; ++i) std::memcpy(qrows + i * kDh, qb + (q0 + i) * q_row, kDh * sizeof(float));
      qblock = qrows;
    }
    // Q^T, scaled, by 16-row gathers; the rows past nq in the last used zmm are zero
    for (int z = 0; z < nz; ++z) {
      const int64_t rows = std::min<int64_t>(16, nq - 16 * z);
      const __mmask16 mask = static_cast<__mmask16>((1u << rows) - 1u);
      const float* base = qblock + 16 * z * kDh;
      for (int64_t d = 0; d < kDh; ++d) {
        __m512 g = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), mask, row_index, base + d, 4);
        if (q_bias) g = _mm512_maskz_add_ps(mask, g, _mm512_set1_ps(q_bias[d]));
        _mm512_storeu_ps(qt + d * kQBlock + 16 * z, _mm512_mul_ps(g, vscale));
      }
    }
    for (int j = 0; j < kQBlock; ++j) {
      colmax[j] = -std::numeric_limits<float>::infinity();
      colsum[j] = 0.0f;
    }
    int64_t k0 = 0;
    const ScoresFn full = scores_dispatch(kKeyTile, nz);
    for (; k0 + kKeyTile <= keys; k0 += kKeyTile) full(k_head + k0 * kDh, qt, st + k0 * kQBlock, colmax);
    if (k0 < keys) scores_dispatch(static_cast<int>(keys - k0), nz)(k_head + k0 * kDh, qt, st + k0 * kQBlock, colmax);
    for (int j = 0; j < kQBlock; ++j) neg_max_l2e[j] = -colmax[j] * 1.44269504088896341f;
    // P^T in place of S^T, then O = P V in register tiles of kQTile queries, per chunk of kSumChunk keys
    const ExpFn exp_rows_nz = exp_dispatch(nz);
    const int64_t q_full = nq / kQTile * kQTile;
    const int q_rest = static_cast<int>(nq - q_full);
    for (int64_t c0 = 0; c0 < keys; c0 += kSumChunk) {
      const int64_t nk = std::min<int64_t>(kSumChunk, keys - c0);
      float* pc = st + c0 * kQBlock;
      const float* vc = v_head + c0 * kDh;
      exp_rows_nz(pc, nk, neg_max_l2e, pc, colsum);
      const PvFn full = c0 == 0 ? pv_dispatch<true>(kQTile) : pv_dispatch<false>(kQTile);
      for (int64_t i = 0; i < q_full; i += kQTile) full(pc + i, vc, nk, obuf + i * kDh);
      if (q_rest) (c0 == 0 ? pv_dispatch<true>(q_rest) : pv_dispatch<false>(q_rest))(pc + q_full, vc, nk, obuf + q_full * kDh);
    }
    // out = O / sum (+ v's bias: the weights sum to 1)
    __m512 vbias[4];
    for (int j = 0; j < 4; ++j) vbias[j] = v_bias ? _mm512_loadu_ps(v_bias + 16 * j) : _mm512_setzero_ps();
    for (int64_t i = 0; i < nq; ++i) {
      const __m512 f = _mm512_set1_ps(1.0f / colsum[i]);
      float* o = ob + (q0 + i) * o_row;
      for (int j = 0; j < 4; ++j)
        _mm512_storeu_ps(o + 16 * j, _mm512_fmadd_ps(_mm512_loadu_ps(obuf + i * kDh + 16 * j), f, vbias[j]));
    }
  }
}

}  // namespace

bool attention_dh64_avx512(const float* q, const int64_t* q_strides, const float* k, const int64_t* k_strides,
                           const float* v, const int64_t* v_strides, int64_t B, int64_t H, int64_t Tq,
                           const int64_t* key_len, int64_t Tk, float scale, const float* q_bias,
                           const float* v_bias, float* out) {
  run_tasks(B * H, [&](int64_t bh) {
    const int64_t b = bh / H, h = bh % H;
    const int64_t keys = key_len ? key_len[b] : Tk;
    // FTZ | DAZ for this task only; restored on every exit (an exception included)
    struct CsrGuard {
      unsigned int saved = _mm_getcsr();
      CsrGuard() { _mm_setcsr(saved | 0x8040); }
      ~CsrGuard() { _mm_setcsr(saved); }
    } const csr_guard;
    attention_head(q + b * q_strides[0] + h * q_strides[1], q_strides[2], k + b * k_strides[0] + h * k_strides[1],
                   k_strides[2], v + b * v_strides[0] + h * v_strides[1], v_strides[2], Tq, keys, scale,
                   q_bias ? q_bias + h * kDh : nullptr, v_bias ? v_bias + h * kDh : nullptr,
                   out + b * Tq * H * kDh + h * kDh, H * kDh);
  });
  return true;
}

}  // namespace cpu
}  // namespace eureka_fast

#else

namespace eureka_fast {
namespace cpu {
bool attention_dh64_avx512(const float*, const int64_t*, const float*, const int64_t*, const float*, const int64_t*,
                           int64_t, int64_t, int64_t, const int64_t*, int64_t, float, const float*, const float*,
                           float*) {
  return false;
}
}  // namespace cpu
}  // namespace eureka_fast

#endif
