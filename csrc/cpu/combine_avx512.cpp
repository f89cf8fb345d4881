// AVX-512 copy of the weighted combine of each token's k expert rows (combine and fused_experts' last step).
// Compiled with a target attribute and called only when cpu_isa() == CpuIsa::Avx512 (permute_combine.cpp dispatches).
// (Streaming stores for large permute outputs were tried: no faster, the fresh output's pages are just zeroed.)
#include <cstdint>

#include "cpu/moe_cpu.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define EF_AVX512 __attribute__((target("avx512f,avx512dq,avx512bw,avx512vl,avx2,fma")))

namespace eureka_fast {
namespace cpu {

// out[t] = sum_j w[t,j] * y[inverse_rows[t*k+j]] for t in [t0, t1), in slot order, 64 columns at a time in four
// registers (the generic loop kept a [H] accumulator in memory and re-read it for every slot). While one token is
// summed, the same columns of the next token's rows are prefetched into L2: the rows are scattered, so the hardware
// prefetcher only starts on each of them after a few misses.
EF_AVX512 void combine_rows_avx512(const float* y, int64_t y_stride, const int64_t* inverse_rows, const float* w,
                                   int64_t t0, int64_t t1, int64_t k, int64_t H, float* out) {
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t* rows = inverse_rows + t * k;
    const int64_t* next = t + 1 < t1 ? rows + k : nullptr;
    float* dst = out + t * H;
    for (int64_t h = 0; h < H; h += 64) {
      const int64_t width = H - h < 64 ? H - h : 64;
      __mmask16 mask[4];
      for (int v = 0; v < 4; ++v) {
        const int64_t lanes = width - 16 * v;
        mask[v] = lanes >= 16 ? static_cast<__mmask16>(0xFFFF)
                              : lanes <= 0 ? static_cast<__mmask16>(0) : static_cast<__mmask16>((1u << lanes) - 1u);
      }
      __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
      for (int64_t j = 0; j < k; ++j) {
        const __m512 wj = _mm512_set1_ps(w[t * k + j]);
        const float* src = y + rows[j] * y_stride + h;
        if (next != nullptr) {
          const char* pf = reinterpret_cast<const char*>(y + next[j] * y_stride + h);
          for (int64_t line = 0; line < width * 4; line += 64) _mm_prefetch(pf + line, _MM_HINT_T1);
        }
        if (width == 64) {
#pragma GCC unroll 4
          for (int v = 0; v < 4; ++v) acc[v] = _mm512_fmadd_ps(wj, _mm512_loadu_ps(src + 16 * v), acc[v]);
        } else {
          for (int v = 0; v < 4; ++v) acc[v] = _mm512_fmadd_ps(wj, _mm512_maskz_loadu_ps(mask[v], src + 16 * v), acc[v]);
        }
      }
      if (width == 64) {
#pragma GCC unroll 4
        for (int v = 0; v < 4; ++v) _mm512_storeu_ps(dst + h + 16 * v, acc[v]);
      } else {
        for (int v = 0; v < 4; ++v) _mm512_mask_storeu_ps(dst + h + 16 * v, mask[v], acc[v]);
      }
    }
  }
}

}  // namespace cpu
}  // namespace eureka_fast
#else
namespace eureka_fast {
namespace cpu {
// Not x86-64 / GCC: never called (cpu_isa() is never Avx512 there), defined so the library links.
void combine_rows_avx512(const float*, int64_t, const int64_t*, const float*, int64_t, int64_t, int64_t, int64_t,
                         float*) {}
}  // namespace cpu
}  // namespace eureka_fast
#endif
