// Grouped GEMM kernels on CUDA. One problem description (GemmArgs), three kernels:
//
//   tc_grouped_kernel      tensor cores (mma.sync m16n8k16 bf16/fp16 -> fp32), 128x128x32 block tile, 8 warps (2x4,
//                          64x32 each), 4-stage cp.async pipeline, ldmatrix(.trans) fragments, padded shared rows
//                          (conflict-free ldmatrix). Gated activation (act(gate) * up) fused in the epilogue, token
//                          gather fused in the A prologue. The "many rows per expert" regime.
//   stream_grouped_kernel  weight streaming for few rows per expert (decode): a warp streams 2 weight rows with
//                          16-byte loads and dots them with up to 8 activation rows at a time. One block per
//                          (active expert, column slice); inactive experts cost no blocks.
//   simt_grouped_kernel    plain fp32/fp64 SIMT tiles with arbitrary strides: float32/float64 inputs and shapes the
//                          tensor-core path cannot take (K not a multiple of 8, misaligned pointers).
//   wgmma_grouped_kernel   Hopper only (sm_90a): wgmma.mma_async from 128-byte-swizzled shared memory, 128x128 or
//                          128x256 tiles, forward problems; opt-in until a GPU run has validated it.
//
// Logical problem: C[m, n] = sum_kk A(m, kk) * B_e(n, kk).
//   GROUP_M (forward, dA): the rows m are grouped by expert through offsets[E+1]; e = expert of row m.
//           Tiles are scheduled on the device from offsets: tile slot y -> (expert, first row), with at most
//           ceil(S/BM) + E slots, so the grid depends on shapes only (no host sync).
//   GROUP_K (dW): the reduction kk runs over the rows of expert e (offsets[e]..offsets[e+1]); one output [M, N] per
//           expert, zero when the expert has no rows.
// Strides are in elements; every row * stride product is 64-bit.
#pragma once

#include "common.cuh"

namespace eureka_fast {
namespace cuda {

struct GemmArgs {
  const void* a;
  int64_t a_sm, a_sk;      // A(m, kk) = a[m * a_sm + kk * a_sk]   (m -> gathered row when gather != nullptr)
  const int64_t* gather;   // optional: A row of logical row m is gather[m] / gather_div
  int64_t gather_div;
  const void* b;
  int64_t b_es, b_sn, b_sk;  // B_e(n, kk) = b[e * b_es + n * b_sn + kk * b_sk]
  const int64_t* offsets;    // [E + 1] on the device
  int E;
  int64_t M;     // GROUP_M: number of logical rows S; GROUP_K: M extent
  int64_t N;     // n extent of B (gated: 2 * I; output has I columns)
  int64_t Kred;  // GROUP_M: reduction length; GROUP_K: number of rows S (the reduction range is clamped to it)
  void* out;
  int64_t ldo, out_es;  // out[(e * out_es) + m * ldo + n]  (out_es only for GROUP_K)
  int act;              // gated activation (kActSilu / kActGelu) when the kernel is instantiated GATED
};

struct TileInfo {
  int64_t m0, m_end, k_begin, k_end;
  int e;
};

// Device-side tile scheduling. GROUP_M: slot blockIdx.y -> expert whose tile range contains it. Warp 0 scans the
// per-expert tile counts 32 experts at a time. Every thread returns the same answer.
template <int BM, bool GROUP_K>
__device__ __forceinline__ bool resolve_tile(const GemmArgs& p, TileInfo& ti) {
  if constexpr (GROUP_K) {
    ti.e = blockIdx.z;
    ti.m0 = static_cast<int64_t>(blockIdx.y) * BM;
    ti.m_end = p.M;
    ti.k_begin = min(max(p.offsets[ti.e], int64_t(0)), p.Kred);  // Kred = number of rows S here
    ti.k_end = min(max(p.offsets[ti.e + 1], int64_t(0)), p.Kred);
    return ti.m0 < p.M;
  } else {
    __shared__ long long s_tile[3];
    __shared__ int s_e;
    const int64_t slot = blockIdx.y;
    if (threadIdx.x < 32) {
      const int lane = threadIdx.x;
      if (lane == 0) s_e = -1;
      __syncwarp();
      int64_t running = 0;
      for (int base = 0; base < p.E; base += 32) {
        const int e = base + lane;
        int64_t lo = 0, hi = 0;
        if (e < p.E) {  // clamped to [0, M]: offsets past the rows never read or write out of bounds
          lo = min(max(p.offsets[e], int64_t(0)), p.M);
          hi = min(max(p.offsets[e + 1], int64_t(0)), p.M);
        }
        const int64_t tiles = hi > lo ? (hi - lo + BM - 1) / BM : 0;
        int64_t inc = tiles;
#pragma unroll
        for (int d = 1; d < 32; d <<= 1) {
          const int64_t v = __shfl_up_sync(kFullMask, inc, d);
          if (lane >= d) inc += v;
        }
        const int64_t start = running + inc - tiles;
        if (tiles > 0 && slot >= start && slot < start + tiles) {
          s_e = e;
          s_tile[0] = lo + (slot - start) * BM;
          s_tile[1] = hi;
        }
        running += __shfl_sync(kFullMask, inc, 31);
        if (running > slot) break;  // warp-uniform
      }
    }
    __syncthreads();
    if (s_e < 0) return false;
    ti.e = s_e;
    ti.m0 = s_tile[0];
    ti.m_end = s_tile[1];
    ti.k_begin = 0;
    ti.k_end = p.Kred;
    return true;
  }
}

// ---------------------------------------------------------------------------------------------------------------
// PTX wrappers (sm_80+)
// ---------------------------------------------------------------------------------------------------------------
__device__ __forceinline__ unsigned smem_addr(const void* p) {
  return static_cast<unsigned>(__cvta_generic_to_shared(p));
}
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool pred) {
  const int sz = pred ? 16 : 0;  // src-size 0 -> the 16 bytes are zero-filled, nothing is read
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src), "r"(sz));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}
__device__ __forceinline__ void ldsm_x4(unsigned (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}
__device__ __forceinline__ void ldsm_x4_trans(unsigned (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}
template <typename T>
__device__ __forceinline__ void mma16816(float (&c)[4], const unsigned (&a)[4], const unsigned (&b)[2]);
template <>
__device__ __forceinline__ void mma16816<__nv_bfloat16>(float (&c)[4], const unsigned (&a)[4], const unsigned (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
template <>
__device__ __forceinline__ void mma16816<__half>(float (&c)[4], const unsigned (&a)[4], const unsigned (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

template <typename T>
__device__ __forceinline__ void store_pair(T* p, float v0, float v1, bool both, bool pair_ok) {
  if (both && pair_ok) {
    if constexpr (std::is_same<T, __nv_bfloat16>::value) {
      *reinterpret_cast<__nv_bfloat162*>(p) = __floats2bfloat162_rn(v0, v1);
    } else {
      *reinterpret_cast<__half2*>(p) = __floats2half2_rn(v0, v1);
    }
  } else {
    p[0] = from_acc<T>(v0);
    if (both) p[1] = from_acc<T>(v1);
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Tensor-core kernel
// ---------------------------------------------------------------------------------------------------------------
namespace tc {
constexpr int BM = 128, BN = 128, BK = 32, STAGES = 4, THREADS = 256, PAD = 8;
constexpr int LDK = BK + PAD;   // row length of a [rows][BK] tile (K contiguous)
constexpr int LDMN = BM + PAD;  // row length of a [BK][rows] tile (M/N contiguous); BM == BN
constexpr int TILE = (BM * LDK > BK * LDMN) ? BM * LDK : BK * LDMN;  // elements per operand per stage
constexpr int SMEM_BYTES = 2 * STAGES * TILE * 2;
}  // namespace tc

// A_MC: A stored m-contiguous (a_sm == 1) -> [BK][BM] tiles + ldmatrix.trans; else k-contiguous (a_sk == 1).
// B_NC: B stored n-contiguous (b_sn == 1) -> [BK][BN] tiles + ldmatrix.trans; else k-contiguous (b_sk == 1).
// Requirements (checked on the host): 16-byte aligned bases; the contiguous strides are 1 and every other stride
// and the chunked extents (Kred for k-contiguous operands, M / N for m/n-contiguous ones, I when gated) are
// multiples of 8, so each 16-byte chunk is entirely inside or entirely outside the problem.
template <typename T, bool A_MC, bool B_NC, bool GROUP_K, bool GATED, bool GATHER>
__global__ void __launch_bounds__(tc::THREADS, 1) tc_grouped_kernel(const GemmArgs p) {
  using namespace tc;
  static_assert(!GROUP_K || (A_MC && B_NC), "GROUP_K reduces over rows: both operands must be row-strided");
  static_assert(GROUP_K || !A_MC, "GROUP_M groups the A rows: A must be k-contiguous");
  static_assert(!(GATHER && A_MC), "gather applies to k-contiguous A rows");
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sA = reinterpret_cast<T*>(smem_raw);
  T* sB = sA + STAGES * TILE;

  TileInfo ti;
  if (!resolve_tile<BM, GROUP_K>(p, ti)) return;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wm = warp >> 2, wn = warp & 3;
  const int64_t I = p.N / 2;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * (GATED ? BN / 2 : BN);
  const T* A = reinterpret_cast<const T*>(p.a);
  const T* B = reinterpret_cast<const T*>(p.b) + static_cast<int64_t>(ti.e) * p.b_es;
  const int64_t lda = A_MC ? p.a_sk : p.a_sm;
  const int64_t ldb = B_NC ? p.b_sk : p.b_sn;

  // smem row r (k-contiguous B) / column r (n-contiguous B) -> B row n; gated tiles interleave 16 gate and 16 up
  // rows per warp column so that each warp holds matching gate/up accumulators.
  auto b_row = [&](int r, bool& ok) -> int64_t {
    if constexpr (GATED) {
      const int h = (r & 31) >> 4;
      const int64_t c = n0 + (r >> 5) * 16 + (r & 15);
      ok = c < I;
      return h * I + c;
    } else {
      const int64_t n = n0 + r;
      ok = n < p.N;
      return n;
    }
  };

  // ---- per-thread load descriptors: 2 chunks of 16 bytes per operand per stage ----
  int64_t a_base[2], b_base[2];
  bool a_ok[2], b_ok[2];
  int a_dst[2], b_dst[2], a_kr[2], b_kr[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int c = tid + i * THREADS;
    if constexpr (!A_MC) {  // [BM][BK]: row c/4, k chunk (c%4)*8
      const int r = c >> 2, kc = (c & 3) * 8;
      const int64_t m = ti.m0 + r;
      a_ok[i] = m < ti.m_end;
      int64_t src_row = m;
      if constexpr (GATHER) src_row = a_ok[i] ? p.gather[m] / p.gather_div : 0;
      a_base[i] = src_row * lda + kc;
      a_kr[i] = kc;
      a_dst[i] = r * LDK + kc;
    } else {  // [BK][BM]: k row c/16, m chunk (c%16)*8
      const int kr = c >> 4, mc = (c & 15) * 8;
      const int64_t m = ti.m0 + mc;
      a_ok[i] = m < ti.m_end;
      a_base[i] = m;
      a_kr[i] = kr;
      a_dst[i] = kr * LDMN + mc;
    }
    if constexpr (!B_NC) {  // [BN][BK]
      const int r = c >> 2, kc = (c & 3) * 8;
      bool ok;
      const int64_t n = b_row(r, ok);
      b_ok[i] = ok;
      b_base[i] = n * ldb + kc;
      b_kr[i] = kc;
      b_dst[i] = r * LDK + kc;
    } else {  // [BK][BN]
      const int kr = c >> 4, nc = (c & 15) * 8;
      bool ok;
      const int64_t n = b_row(nc, ok);
      b_ok[i] = ok;
      b_base[i] = n;
      b_kr[i] = kr;
      b_dst[i] = kr * LDMN + nc;
    }
  }

  auto load_stage = [&](int slot, int64_t kt) {
    T* dA = sA + slot * TILE;
    T* dB = sB + slot * TILE;
    const int64_t kk0 = ti.k_begin + kt * BK;
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int64_t kk = kk0 + a_kr[i];
      const bool ok = a_ok[i] && kk < ti.k_end;
      const T* src = ok ? (A_MC ? A + kk * lda + a_base[i] : A + a_base[i] + kk0) : A;
      cp_async16(dA + a_dst[i], src, ok);
    }
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int64_t kk = kk0 + b_kr[i];
      const bool ok = b_ok[i] && kk < ti.k_end;
      const T* src = ok ? (B_NC ? B + kk * ldb + b_base[i] : B + b_base[i] + kk0) : B;
      cp_async16(dB + b_dst[i], src, ok);
    }
  };

  float acc[4][4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int q = 0; q < 4; ++q) acc[i][j][q] = 0.f;

  const int64_t k_len = ti.k_end - ti.k_begin;
  const int64_t KT = k_len > 0 ? (k_len + BK - 1) / BK : 0;
#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < KT) load_stage(s, s);
    cp_async_commit();
  }

  for (int64_t kt = 0; kt < KT; ++kt) {
    cp_async_wait<STAGES - 2>();
    __syncthreads();
    {
      const int64_t pf = kt + STAGES - 1;
      if (pf < KT) load_stage(static_cast<int>(pf % STAGES), pf);
      cp_async_commit();
    }
    const T* tA = sA + static_cast<int>(kt % STAGES) * TILE;
    const T* tB = sB + static_cast<int>(kt % STAGES) * TILE;
#pragma unroll
    for (int ks = 0; ks < BK / 16; ++ks) {
      unsigned af[4][4], bfr[4][2];
#pragma unroll
      for (int mf = 0; mf < 4; ++mf) {
        if constexpr (!A_MC) {
          const int r = wm * 64 + mf * 16 + (lane & 15);
          const int k = ks * 16 + (lane >> 4) * 8;
          ldsm_x4(af[mf], tA + r * LDK + k);
        } else {
          const int j = lane >> 3;
          const int k = ks * 16 + (j >> 1) * 8 + (lane & 7);
          const int m = wm * 64 + mf * 16 + (j & 1) * 8;
          ldsm_x4_trans(af[mf], tA + k * LDMN + m);
        }
      }
#pragma unroll
      for (int pp = 0; pp < 2; ++pp) {
        unsigned r4[4];
        const int j = lane >> 3;
        if constexpr (!B_NC) {
          const int n = wn * 32 + pp * 16 + (j >> 1) * 8 + (lane & 7);
          const int k = ks * 16 + (j & 1) * 8;
          ldsm_x4(r4, tB + n * LDK + k);
        } else {
          const int k = ks * 16 + (j & 1) * 8 + (lane & 7);
          const int n = wn * 32 + pp * 16 + (j >> 1) * 8;
          ldsm_x4_trans(r4, tB + k * LDMN + n);
        }
        bfr[2 * pp][0] = r4[0];
        bfr[2 * pp][1] = r4[1];
        bfr[2 * pp + 1][0] = r4[2];
        bfr[2 * pp + 1][1] = r4[3];
      }
#pragma unroll
      for (int mf = 0; mf < 4; ++mf)
#pragma unroll
        for (int nf = 0; nf < 4; ++nf) mma16816<T>(acc[mf][nf], af[mf], bfr[nf]);
    }
  }
  cp_async_wait<0>();

  // ---- epilogue: fp32 accumulators -> T, straight from registers ----
  const int g = lane >> 2, t4 = lane & 3;
  T* out = reinterpret_cast<T*>(p.out);
  if constexpr (GROUP_K) out += static_cast<int64_t>(ti.e) * p.out_es;
  const int64_t nout = GATED ? I : p.N;
  const bool pair_ok = ((p.ldo | nout) & 1) == 0 && (!GROUP_K || (p.out_es & 1) == 0);
#pragma unroll
  for (int mf = 0; mf < 4; ++mf) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t row = ti.m0 + wm * 64 + mf * 16 + g + h * 8;
      if (row >= ti.m_end) continue;
      T* orow = out + row * p.ldo;
      if constexpr (GATED) {
#pragma unroll
        for (int nf = 0; nf < 2; ++nf) {
          const int64_t col = n0 + wn * 16 + nf * 8 + 2 * t4;
          if (col >= nout) continue;
          const float v0 = act_apply(p.act, acc[mf][nf][2 * h]) * acc[mf][nf + 2][2 * h];
          const float v1 = act_apply(p.act, acc[mf][nf][2 * h + 1]) * acc[mf][nf + 2][2 * h + 1];
          store_pair<T>(orow + col, v0, v1, col + 1 < nout, pair_ok);
        }
      } else {
#pragma unroll
        for (int nf = 0; nf < 4; ++nf) {
          const int64_t col = n0 + wn * 32 + nf * 8 + 2 * t4;
          if (col >= nout) continue;
          store_pair<T>(orow + col, acc[mf][nf][2 * h], acc[mf][nf][2 * h + 1], col + 1 < nout, pair_ok);
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Hopper kernel (sm_90a): wgmma.mma_async m64nBNk16, both operands from 128-byte-swizzled shared memory.
// 128 x BN x 64 block tile (BN = 128 or 256), two consumer warpgroups (64 rows each), all 256 threads load with
// cp.async (token gather fused), 4 stages. Forward only (A and B k-contiguous). Gated tiles hold BN/2 gate rows then
// the BN/2 matching up rows, so every thread owns matching gate/up accumulators (n8 chunks i and i + BN/16).
// Opt-in for now (EUREKA_FAST_GEMM=wgmma, or EUREKA_FAST_WGMMA=1 for the automatic choice) until a GPU run has
// measured it; compiled to an empty body for targets other than sm_90a and never launched there.
// ---------------------------------------------------------------------------------------------------------------
namespace wg {
constexpr int BM = 128, BK = 64, STAGES = 4, THREADS = 256;
template <int BN>
constexpr int smem_bytes() {
  return STAGES * (BM * BK + BN * BK) * 2 + 1024;  // + slack for 1024-byte alignment
}
}  // namespace wg

#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 900) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define EF_HAVE_WGMMA 1
#endif

#ifdef EF_HAVE_WGMMA
// sm90 shared-memory matrix descriptor: start >> 4 (bits 0-13), leading byte offset >> 4 (16-29, unused for swizzled
// K-major), stride byte offset >> 4 (32-45) = 1024 between 8-row groups, layout 1 = 128-byte swizzle (bits 62-63).
__device__ __forceinline__ uint64_t wg_desc(unsigned smem_byte_addr) {
  uint64_t d = 0;
  d |= static_cast<uint64_t>((smem_byte_addr & 0x3FFFF) >> 4);
  d |= static_cast<uint64_t>(16 >> 4) << 16;
  d |= static_cast<uint64_t>(1024 >> 4) << 32;
  d |= static_cast<uint64_t>(1) << 62;
  return d;
}
__device__ __forceinline__ void wg_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wg_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wg_wait0() { asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory"); }
__device__ __forceinline__ void wg_fence_operand(float& r) { asm volatile("" : "+f"(r)::"memory"); }

template <int N, typename T>
__device__ __forceinline__ void wgmma_m64nk16(float (&d)[N / 2], uint64_t da, uint64_t db);

// The specialisations are generated: wgmma takes its N / 2 fp32 accumulators as N / 2 separate "+f" operands
// %0 .. %(N/2 - 1), followed by the two descriptors and the scale-d immediate.
// EF_WG_REG(t, u) is the operand name "%tu" (t may be empty: "%u"); EF_WG_DECADE(t) names %t0 .. %t9.
#define EF_WG_REG(t, u) "%" #t #u
#define EF_WG_DECADE(t)                                                                                           \
  EF_WG_REG(t, 0) ", " EF_WG_REG(t, 1) ", " EF_WG_REG(t, 2) ", " EF_WG_REG(t, 3) ", " EF_WG_REG(t, 4) ", "          \
  EF_WG_REG(t, 5) ", " EF_WG_REG(t, 6) ", " EF_WG_REG(t, 7) ", " EF_WG_REG(t, 8) ", " EF_WG_REG(t, 9)
// "%0, ..., %63" and "%0, ..., %127"
#define EF_WG_REGS_64                                                                                             \
  EF_WG_DECADE() ", " EF_WG_DECADE(1) ", " EF_WG_DECADE(2) ", " EF_WG_DECADE(3) ", " EF_WG_DECADE(4) ", "           \
  EF_WG_DECADE(5) ", " EF_WG_REG(6, 0) ", " EF_WG_REG(6, 1) ", " EF_WG_REG(6, 2) ", " EF_WG_REG(6, 3)
#define EF_WG_REGS_128                                                                                            \
  EF_WG_DECADE() ", " EF_WG_DECADE(1) ", " EF_WG_DECADE(2) ", " EF_WG_DECADE(3) ", " EF_WG_DECADE(4) ", "           \
  EF_WG_DECADE(5) ", " EF_WG_DECADE(6) ", " EF_WG_DECADE(7) ", " EF_WG_DECADE(8) ", " EF_WG_DECADE(9) ", "          \
  EF_WG_DECADE(10) ", " EF_WG_DECADE(11) ", " EF_WG_REG(12, 0) ", " EF_WG_REG(12, 1) ", " EF_WG_REG(12, 2) ", "     \
  EF_WG_REG(12, 3) ", " EF_WG_REG(12, 4) ", " EF_WG_REG(12, 5) ", " EF_WG_REG(12, 6) ", " EF_WG_REG(12, 7)
// the accumulators d[i] .. d[i + 15] as "+f" operands, and all 64 / 128 of them
#define EF_WG_ACC4(i) "+f"(d[(i)]), "+f"(d[(i) + 1]), "+f"(d[(i) + 2]), "+f"(d[(i) + 3])
#define EF_WG_ACC16(i) EF_WG_ACC4(i), EF_WG_ACC4((i) + 4), EF_WG_ACC4((i) + 8), EF_WG_ACC4((i) + 12)
#define EF_WG_ACC_64 EF_WG_ACC16(0), EF_WG_ACC16(16), EF_WG_ACC16(32), EF_WG_ACC16(48)
#define EF_WG_ACC_128 EF_WG_ACC_64, EF_WG_ACC16(64), EF_WG_ACC16(80), EF_WG_ACC16(96), EF_WG_ACC16(112)
// One specialisation: N output columns, C++ element type CT with PTX type name PTX_T; DA, DB, SCALE_D are the
// operand numbers of the two descriptors and of the scale-d immediate (N / 2, N / 2 + 1, N / 2 + 2).
#define EF_WGMMA_SPECIALISATION(N, CT, PTX_T, REGS, ACCS, DA, DB, SCALE_D)                                        \
  template <>                                                                                                     \
  __device__ __forceinline__ void wgmma_m64nk16<N, CT>(float(&d)[N / 2], uint64_t da, uint64_t db) {              \
    asm volatile(                                                                                                 \
        "{\n"                                                                                                     \
        ".reg .pred p;\n"                                                                                         \
        "setp.ne.b32 p, %" #SCALE_D ", 0;\n"                                                                      \
        "wgmma.mma_async.sync.aligned.m64n" #N "k16.f32." PTX_T "." PTX_T " "                                     \
        "{" REGS "}, %" #DA ", %" #DB ", p, 1, 1, 0, 0;\n"                                                        \
        "}\n"                                                                                                     \
        : ACCS                                                                                                    \
        : "l"(da), "l"(db), "n"(1));                                                                              \
  }

EF_WGMMA_SPECIALISATION(128, __nv_bfloat16, "bf16", EF_WG_REGS_64, EF_WG_ACC_64, 64, 65, 66)
EF_WGMMA_SPECIALISATION(128, __half, "f16", EF_WG_REGS_64, EF_WG_ACC_64, 64, 65, 66)
EF_WGMMA_SPECIALISATION(256, __nv_bfloat16, "bf16", EF_WG_REGS_128, EF_WG_ACC_128, 128, 129, 130)
EF_WGMMA_SPECIALISATION(256, __half, "f16", EF_WG_REGS_128, EF_WG_ACC_128, 128, 129, 130)
#endif

template <typename T, int BN, bool GATED, bool GATHER>
__global__ void __launch_bounds__(wg::THREADS, 1) wgmma_grouped_kernel(const GemmArgs p) {
#ifdef EF_HAVE_WGMMA
  using namespace wg;
  constexpr int A_STAGE = BM * BK, B_STAGE = BN * BK;  // elements
  constexpr int NACC = BN / 2;                         // fp32 accumulators per thread (64 rows x BN per warpgroup)
  constexpr int B_CHUNKS = BN * 8 / THREADS;           // 16-byte chunks per thread for the B tile
  extern __shared__ __align__(16) unsigned char wg_smem_raw[];
  const unsigned raw_addr = smem_addr(wg_smem_raw);
  const unsigned pad = (1024u - (raw_addr & 1023u)) & 1023u;
  unsigned char* base = wg_smem_raw + pad;  // 1024-byte aligned: the swizzle pattern uses address bits 4-9
  unsigned char* sA = base;
  unsigned char* sB = base + STAGES * A_STAGE * 2;
  const unsigned sA_addr = raw_addr + pad, sB_addr = sA_addr + STAGES * A_STAGE * 2;

  TileInfo ti;
  if (!resolve_tile<BM, false>(p, ti)) return;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wgi = warp >> 2, wi = warp & 3;
  const int64_t I = p.N / 2;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * (GATED ? BN / 2 : BN);
  const T* A = reinterpret_cast<const T*>(p.a);
  const T* B = reinterpret_cast<const T*>(p.b) + static_cast<int64_t>(ti.e) * p.b_es;
  const int64_t lda = p.a_sm, ldb = p.b_sn;

  // chunk c -> row c / 8, k chunk c % 8, stored at 16-byte column (c ^ row) % 8 of its 128-byte row
  int64_t a_base[4], b_base[B_CHUNKS];
  bool a_ok[4], b_ok[B_CHUNKS];
  int a_kc[4], a_dst[4], b_kc[B_CHUNKS], b_dst[B_CHUNKS];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int c = tid + i * THREADS;
    const int r = c >> 3, ch = c & 7;
    a_kc[i] = ch * 8;
    a_dst[i] = r * 128 + ((ch ^ (r & 7)) << 4);
    const int64_t m = ti.m0 + r;
    a_ok[i] = m < ti.m_end;
    int64_t src_row = m;
    if constexpr (GATHER) src_row = a_ok[i] ? p.gather[m] / p.gather_div : 0;
    a_base[i] = src_row * lda + a_kc[i];
  }
#pragma unroll
  for (int i = 0; i < B_CHUNKS; ++i) {
    const int c = tid + i * THREADS;
    const int r = c >> 3, ch = c & 7;
    b_kc[i] = ch * 8;
    b_dst[i] = r * 128 + ((ch ^ (r & 7)) << 4);
    int64_t n;
    if constexpr (GATED) {
      const int64_t cc = n0 + (r & (BN / 2 - 1));
      b_ok[i] = cc < I;
      n = (r / (BN / 2)) * I + cc;
    } else {
      n = n0 + r;
      b_ok[i] = n < p.N;
    }
    b_base[i] = n * ldb + b_kc[i];
  }
  auto load_stage = [&](int slot, int64_t kt) {
    const int64_t kk0 = kt * BK;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const bool ok = a_ok[i] && kk0 + a_kc[i] < ti.k_end;
      cp_async16(sA + slot * A_STAGE * 2 + a_dst[i], ok ? A + a_base[i] + kk0 : A, ok);
    }
#pragma unroll
    for (int i = 0; i < B_CHUNKS; ++i) {
      const bool ok = b_ok[i] && kk0 + b_kc[i] < ti.k_end;
      cp_async16(sB + slot * B_STAGE * 2 + b_dst[i], ok ? B + b_base[i] + kk0 : B, ok);
    }
  };

  float acc[NACC];
#pragma unroll
  for (int i = 0; i < NACC; ++i) acc[i] = 0.f;
  const int64_t KT = (ti.k_end + BK - 1) / BK;
#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < KT) load_stage(s, s);
    cp_async_commit();
  }
  for (int64_t kt = 0; kt < KT; ++kt) {
    cp_async_wait<STAGES - 2>();
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");  // cp.async writes -> async-proxy reads
    __syncthreads();
    {
      const int64_t pf = kt + STAGES - 1;
      if (pf < KT) load_stage(static_cast<int>(pf % STAGES), pf);
      cp_async_commit();
    }
    const int slot = static_cast<int>(kt % STAGES);
    const unsigned a_tile = sA_addr + slot * A_STAGE * 2 + wgi * 64 * 128;
    const unsigned b_tile = sB_addr + slot * B_STAGE * 2;
#pragma unroll
    for (int i = 0; i < NACC; ++i) wg_fence_operand(acc[i]);
    wg_fence();
#pragma unroll
    for (int s = 0; s < BK / 16; ++s) wgmma_m64nk16<BN, T>(acc, wg_desc(a_tile + s * 32), wg_desc(b_tile + s * 32));
    wg_commit();
    wg_wait0();
#pragma unroll
    for (int i = 0; i < NACC; ++i) wg_fence_operand(acc[i]);
  }
  cp_async_wait<0>();

  const int g = lane >> 2, t4 = lane & 3;
  T* out = reinterpret_cast<T*>(p.out);
  const int64_t nout = GATED ? I : p.N;
  const bool pair_ok = ((p.ldo | nout) & 1) == 0;
  constexpr int CHUNKS = BN / 8;  // n8 chunks per thread row
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int64_t row = ti.m0 + wgi * 64 + wi * 16 + g + h * 8;
    if (row >= ti.m_end) continue;
    T* orow = out + row * p.ldo;
    if constexpr (GATED) {
#pragma unroll
      for (int i = 0; i < CHUNKS / 2; ++i) {
        const int64_t col = n0 + i * 8 + 2 * t4;
        if (col >= nout) continue;
        const float v0 = act_apply(p.act, acc[4 * i + 2 * h]) * acc[4 * (i + CHUNKS / 2) + 2 * h];
        const float v1 = act_apply(p.act, acc[4 * i + 2 * h + 1]) * acc[4 * (i + CHUNKS / 2) + 2 * h + 1];
        store_pair<T>(orow + col, v0, v1, col + 1 < nout, pair_ok);
      }
    } else {
#pragma unroll
      for (int i = 0; i < CHUNKS; ++i) {
        const int64_t col = n0 + i * 8 + 2 * t4;
        if (col >= nout) continue;
        store_pair<T>(orow + col, acc[4 * i + 2 * h], acc[4 * i + 2 * h + 1], col + 1 < nout, pair_ok);
      }
    }
  }
#endif
}

// True when this build holds sm_90a code for the wgmma kernel and the current device runs it.
inline bool wgmma_available() {
  static int cache[64];  // per device: 0 unknown, 1 yes, 2 no
  const int dev = static_cast<int>(c10::cuda::current_device()) & 63;
  if (cache[dev] == 0) {
    cudaFuncAttributes attr{};
    const bool hopper = at::cuda::getCurrentDeviceProperties()->major == 9;
    const bool ok = hopper &&
                    cudaFuncGetAttributes(&attr, wgmma_grouped_kernel<__nv_bfloat16, 128, false, false>) == cudaSuccess &&
                    attr.binaryVersion == 90;
    (void)cudaGetLastError();
    cache[dev] = ok ? 1 : 2;
  }
  return cache[dev] == 1;
}

// ---------------------------------------------------------------------------------------------------------------
// Weight-streaming kernel (few rows per expert). A and B k-contiguous, Kred % 8 == 0, 16-byte aligned.
// ---------------------------------------------------------------------------------------------------------------
namespace streamk {
constexpr int THREADS = 256, WARPS = 8, UNITS_PER_WARP = 2, ROWS = 8;
constexpr int UNITS_PER_BLOCK = WARPS * UNITS_PER_WARP;
}  // namespace streamk

template <typename T>
__device__ __forceinline__ void load8(const T* p, float (&f)[8], bool streaming) {
  uint4 u = streaming ? __ldcs(reinterpret_cast<const uint4*>(p)) : __ldg(reinterpret_cast<const uint4*>(p));
  const unsigned w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    if constexpr (std::is_same<T, __nv_bfloat16>::value) {
      // bf16 -> fp32 is a 16-bit shift
      f[2 * i] = __uint_as_float(w[i] << 16);
      f[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
    } else {
      __half2 h2 = *reinterpret_cast<const __half2*>(&w[i]);
      float2 f2 = __half22float2(h2);
      f[2 * i] = f2.x;
      f[2 * i + 1] = f2.y;
    }
  }
}

// Unit u of a block: ungated -> output columns (2u, 2u+1) = B rows (2u, 2u+1); gated -> output column u =
// act(B row u) * (B row I + u).
template <typename T, bool GATED, bool GATHER>
__global__ void __launch_bounds__(streamk::THREADS) stream_grouped_kernel(const GemmArgs p) {
  using namespace streamk;
  __shared__ int s_e;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  // blockIdx.y = ordinal of the active (non-empty) expert
  if (warp == 0) {
    if (lane == 0) s_e = -1;
    __syncwarp();
    const unsigned lt = (1u << lane) - 1u;
    int seen = 0;
    const int want = blockIdx.y;
    for (int base = 0; base < p.E; base += 32) {
      const int e = base + lane;
      const bool active = e < p.E && min(p.offsets[e + 1], p.M) > max(p.offsets[e], int64_t(0));
      const unsigned mask = __ballot_sync(kFullMask, active);
      const int cnt = __popc(mask);
      if (want < seen + cnt) {
        if (active && seen + __popc(mask & lt) == want) s_e = e;
        break;  // warp-uniform
      }
      seen += cnt;
    }
  }
  __syncthreads();
  const int e = s_e;
  if (e < 0) return;
  const int64_t lo = max(p.offsets[e], int64_t(0)), hi = min(p.offsets[e + 1], p.M);
  const int64_t K = p.Kred, I = p.N / 2;
  const T* A = reinterpret_cast<const T*>(p.a);
  const T* B = reinterpret_cast<const T*>(p.b) + static_cast<int64_t>(e) * p.b_es;
  T* out = reinterpret_cast<T*>(p.out);

  for (int64_t r0 = lo; r0 < hi; r0 += ROWS) {
    const int nr = static_cast<int>(min(static_cast<int64_t>(ROWS), hi - r0));
    int64_t arow[ROWS];
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
      const int64_t m = r0 + (r < nr ? r : 0);
      int64_t src = m;
      if constexpr (GATHER) src = p.gather[m] / p.gather_div;
      arow[r] = src * p.a_sm;
    }
#pragma unroll 1
    for (int uu = 0; uu < UNITS_PER_WARP; ++uu) {
      const int64_t u = static_cast<int64_t>(blockIdx.x) * UNITS_PER_BLOCK + warp * UNITS_PER_WARP + uu;
      int64_t w0, w1;
      bool v0, v1;
      if constexpr (GATED) {
        v0 = v1 = u < I;
        w0 = u;
        w1 = I + u;
      } else {
        w0 = 2 * u;
        w1 = 2 * u + 1;
        v0 = w0 < p.N;
        v1 = w1 < p.N;
      }
      if (!v0) break;  // warp-uniform; later units of this warp are further out
      const T* b0 = B + w0 * p.b_sn;
      const T* b1 = B + (v1 ? w1 : w0) * p.b_sn;
      float acc0[ROWS], acc1[ROWS];
#pragma unroll
      for (int r = 0; r < ROWS; ++r) acc0[r] = acc1[r] = 0.f;
#pragma unroll 2
      for (int64_t k = static_cast<int64_t>(lane) * 8; k < K; k += 256) {
        float f0[8], f1[8];
        load8<T>(b0 + k, f0, true);
        load8<T>(b1 + k, f1, true);
#pragma unroll
        for (int r = 0; r < ROWS; ++r) {
          if (r < nr) {
            float fa[8];
            load8<T>(A + arow[r] + k, fa, false);
            float s0 = 0.f, s1 = 0.f;
#pragma unroll
            for (int q = 0; q < 8; ++q) {
              s0 = fmaf(f0[q], fa[q], s0);
              s1 = fmaf(f1[q], fa[q], s1);
            }
            acc0[r] += s0;
            acc1[r] += s1;
          }
        }
      }
#pragma unroll
      for (int r = 0; r < ROWS; ++r) {
        if (r < nr) {  // nr is warp-uniform
          acc0[r] = warp_sum(acc0[r]);
          acc1[r] = warp_sum(acc1[r]);
        }
      }
#pragma unroll
      for (int r = 0; r < ROWS; ++r) {
        if (r < nr && lane == r) {
          T* orow = out + (r0 + r) * p.ldo;
          if constexpr (GATED) {
            orow[u] = from_acc<T>(act_apply(p.act, acc0[r]) * acc1[r]);
          } else {
            orow[w0] = from_acc<T>(acc0[r]);
            if (v1) orow[w1] = from_acc<T>(acc1[r]);
          }
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// SIMT kernel: any strides, float/double/half/bf16, accumulation in AccType (fp32 or fp64).
// 32x32 output tile, BK = 16, 256 threads, 2x2 outputs per thread (plus 2x2 "up" accumulators when gated).
// ---------------------------------------------------------------------------------------------------------------
namespace simt {
constexpr int BM = 32, BN = 32, BK = 16, THREADS = 256;
}

template <typename T, bool GROUP_K>
__global__ void __launch_bounds__(simt::THREADS) simt_grouped_kernel(const GemmArgs p, bool gated) {
  using namespace simt;
  using Acc = typename AccType<T>::type;
  __shared__ Acc sA[BK][BM + 1];
  __shared__ Acc sB[BK][BN + 1];
  __shared__ Acc sU[BK][BN + 1];
  TileInfo ti;
  if (!resolve_tile<BM, GROUP_K>(p, ti)) return;
  const int tid = threadIdx.x, tx = tid & 15, ty = tid >> 4;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * BN;
  const int64_t I = p.N / 2;
  const int64_t nout = gated ? I : p.N;
  const T* A = reinterpret_cast<const T*>(p.a);
  const T* B = reinterpret_cast<const T*>(p.b) + static_cast<int64_t>(ti.e) * p.b_es;
  Acc acc[2][2] = {{0, 0}, {0, 0}}, up[2][2] = {{0, 0}, {0, 0}};
  for (int64_t kk0 = ti.k_begin; kk0 < ti.k_end; kk0 += BK) {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int idx = tid + i * THREADS;
      const int ml = idx / BK, kl = idx % BK;  // 32 x 16 elements
      const int64_t kk = kk0 + kl;
      // A tile
      {
        const int64_t m = ti.m0 + ml;
        Acc v = 0;
        if (m < ti.m_end && kk < ti.k_end) {
          int64_t src = m;
          if (p.gather) src = p.gather[m] / p.gather_div;
          v = static_cast<Acc>(to_float(A[src * p.a_sm + kk * p.a_sk]));
        }
        sA[kl][ml] = v;
      }
      // B tile(s)
      {
        const int64_t n = n0 + ml;
        Acc v = 0, vu = 0;
        if (n < nout && kk < ti.k_end) {
          v = static_cast<Acc>(to_float(B[n * p.b_sn + kk * p.b_sk]));
          if (gated) vu = static_cast<Acc>(to_float(B[(I + n) * p.b_sn + kk * p.b_sk]));
        }
        sB[kl][ml] = v;
        sU[kl][ml] = vu;
      }
    }
    __syncthreads();
#pragma unroll
    for (int kl = 0; kl < BK; ++kl) {
      const Acc a0 = sA[kl][ty * 2], a1 = sA[kl][ty * 2 + 1];
      const Acc b0 = sB[kl][tx * 2], b1 = sB[kl][tx * 2 + 1];
      acc[0][0] += a0 * b0;
      acc[0][1] += a0 * b1;
      acc[1][0] += a1 * b0;
      acc[1][1] += a1 * b1;
      if (gated) {
        const Acc u0 = sU[kl][tx * 2], u1 = sU[kl][tx * 2 + 1];
        up[0][0] += a0 * u0;
        up[0][1] += a0 * u1;
        up[1][0] += a1 * u0;
        up[1][1] += a1 * u1;
      }
    }
    __syncthreads();
  }
  T* out = reinterpret_cast<T*>(p.out);
  if constexpr (GROUP_K) out += static_cast<int64_t>(ti.e) * p.out_es;
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int64_t m = ti.m0 + ty * 2 + i;
    if (m >= ti.m_end) continue;
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      const int64_t n = n0 + tx * 2 + j;
      if (n >= nout) continue;
      Acc v = acc[i][j];
      if (gated) v = act_apply(p.act, v) * up[i][j];
      out[m * p.ldo + n] = from_acc<T>(v);
    }
  }
}

// Rows outside [offsets[0], offsets[E]) of out[S, ncols] are set to zero ("rows not covered are zero").
template <typename T>
__global__ void zero_uncovered_rows_kernel(T* __restrict__ out, int64_t S, int64_t ncols, int64_t ldo,
                                           const int64_t* __restrict__ offsets, int E) {
  const int64_t lo = max(offsets[0], int64_t(0)), hi = min(offsets[E], S);
  for (int64_t r = blockIdx.x; r < S; r += gridDim.x) {
    if (r >= lo && r < hi) continue;
    for (int64_t c = threadIdx.x; c < ncols; c += blockDim.x) out[r * ldo + c] = from_acc<T>(static_cast<typename AccType<T>::type>(0));
  }
}

// grad of act(gate) * up w.r.t. the pre-activation [S, 2I] (gate | up), in fp32 (fp64 for double).
template <typename T>
__global__ void gated_backward_kernel(const T* __restrict__ pre, const T* __restrict__ grad, int64_t S, int64_t I,
                                      int act, T* __restrict__ dpre) {
  using Acc = typename AccType<T>::type;
  const int64_t total = S * I;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / I, c = i - r * I;
    const Acc gt = static_cast<Acc>(to_float(pre[r * 2 * I + c]));
    const Acc u = static_cast<Acc>(to_float(pre[r * 2 * I + I + c]));
    const Acc go = static_cast<Acc>(to_float(grad[i]));
    dpre[r * 2 * I + c] = from_acc<T>(go * u * act_grad<Acc>(act, gt));
    dpre[r * 2 * I + I + c] = from_acc<T>(go * act_apply(act, gt));
  }
}

}  // namespace cuda
}  // namespace eureka_fast
