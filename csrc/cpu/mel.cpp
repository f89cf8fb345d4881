// The log-mel front end's power spectrum -> mel filter bank -> floor, in one pass (eureka_fast/audio/features.py):
//   mel_power(spectrum [F, n_bins, 2] float32 (re, im of an rfft), filters [n_mels, n_bins] float32, floor)
//     -> out [n_mels, F], out[m, f] = max(floor, sum_k filters[m, k] (re[f, k]^2 + im[f, k]^2))
// Why: the torch path squares the spectrum in place (a pass over [F, 2 n_bins]) and then runs one GEMM per band of
// filters over the squared (re, im) pairs: ~1.4 ms of a ~3 ms 30 s log-mel on one core, for ~0.4 M multiply-adds
// of real work (Slaney filters are narrow: each bin feeds at most two filters).
// Here frames go 16 at a time: each bin's power for the 16 frames is gathered into one zmm of an L1 block
// [n_bins][16] (the (re, im) pairs as 64-bit elements, 8 frames per gather: 0.63 -> 0.33-0.42 ms on 30 s against
// one gather per float; a register transpose of 8-bin loads instead was no faster), then each filter sums only its
// non-zero bins [first, last), vectorised over the 16 frames, and its 16 results are stored contiguously in out's
// [n_mels, F] layout. Both paths compute power = fma(im, im, re * re) and sum the bins in ascending order with fma,
// so the AVX-512 and portable paths agree bit for bit. A NaN bin
// makes NaN the filters that use it (max(floor, NaN) = NaN, like torch.clamp); a dense GEMM would spread it to every
// filter of its frame through 0 * NaN.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "cpu/common.h"
#include "cpu/moe_cpu.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define EF_MEL_X86 1
#define EF_AVX512 __attribute__((target("avx512f,avx512dq,avx512bw,avx512vl,avx2,fma")))
#endif

namespace eureka_fast {
namespace cpu {
namespace {

constexpr int64_t kFrames = 16;  // frames per block: one zmm

struct Band {
  int64_t first = 0, last = 0;  // the filter's non-zero bins [first, last)
};

std::vector<Band> filter_bands(const float* filters, int64_t n_mels, int64_t n_bins) {
  std::vector<Band> bands(n_mels);
  for (int64_t m = 0; m < n_mels; ++m) {
    const float* row = filters + m * n_bins;
    int64_t first = 0, last = n_bins;
    while (first < n_bins && row[first] == 0.f) ++first;
    while (last > first && row[last - 1] == 0.f) --last;
    bands[m] = {first, last};
  }
  return bands;
}

inline float floor_max(float floor, float v) { return v < floor ? floor : v; }  // NaN v stays NaN

void mel_frames_portable(const float* spec, int64_t n_bins, const float* filters, const std::vector<Band>& bands,
                         float floor, float* out, int64_t F, int64_t f0, int64_t f1) {
  std::vector<float> power(n_bins);
  for (int64_t f = f0; f < f1; ++f) {
    const float* z = spec + f * 2 * n_bins;
    for (int64_t k = 0; k < n_bins; ++k) power[k] = std::fma(z[2 * k + 1], z[2 * k + 1], z[2 * k] * z[2 * k]);
    for (size_t m = 0; m < bands.size(); ++m) {
      const float* w = filters + m * n_bins;
      float acc = 0.f;
      for (int64_t k = bands[m].first; k < bands[m].last; ++k) acc = std::fma(w[k], power[k], acc);
      out[m * F + f] = floor_max(floor, acc);
    }
  }
}

#ifdef EF_MEL_X86
// nf <= 16 frames from f0; power: [n_bins][16] scratch.
EF_AVX512 void mel_block_avx512(const float* spec, int64_t n_bins, const float* filters, const Band* bands,
                                int64_t n_mels, float floor, float* out, int64_t F, int64_t f0, int nf,
                                float* power) {
  const __mmask16 mask = nf == kFrames ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << nf) - 1u);
  // each (re, im) pair gathered as one 64-bit element: 8 frames per gather, half the gathers of one per float
  const __m256i frame_offsets = _mm256_mullo_epi32(_mm256_set_epi32(7, 6, 5, 4, 3, 2, 1, 0),
                                                   _mm256_set1_epi32(static_cast<int>(2 * n_bins)));
  const __mmask8 low = static_cast<__mmask8>(mask & 0xFF), high = static_cast<__mmask8>(mask >> 8);
  const __m512i even = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
  const __m512i odd = _mm512_set_epi32(31, 29, 27, 25, 23, 21, 19, 17, 15, 13, 11, 9, 7, 5, 3, 1);
  const double* lo = reinterpret_cast<const double*>(spec + f0 * 2 * n_bins);
  const double* hi = high ? reinterpret_cast<const double*>(spec + (f0 + 8) * 2 * n_bins) : lo;
  for (int64_t k = 0; k < n_bins; ++k) {
    const __m512 a = _mm512_castpd_ps(_mm512_mask_i32gather_pd(_mm512_setzero_pd(), low, frame_offsets, lo + k, 4));
    const __m512 b = high ? _mm512_castpd_ps(_mm512_mask_i32gather_pd(_mm512_setzero_pd(), high, frame_offsets,
                                                                       hi + k, 4))
                          : _mm512_setzero_ps();
    const __m512 re = _mm512_permutex2var_ps(a, even, b), im = _mm512_permutex2var_ps(a, odd, b);
    _mm512_store_ps(power + kFrames * k, _mm512_fmadd_ps(im, im, _mm512_mul_ps(re, re)));
  }
  const __m512 floor_v = _mm512_set1_ps(floor);
  for (int64_t m = 0; m < n_mels; ++m) {
    const float* w = filters + m * n_bins;
    __m512 acc = _mm512_setzero_ps();
    for (int64_t k = bands[m].first; k < bands[m].last; ++k)
      acc = _mm512_fmadd_ps(_mm512_set1_ps(w[k]), _mm512_load_ps(power + kFrames * k), acc);
    // max_ps returns its second operand when either is NaN: a NaN sum stays NaN
    _mm512_mask_storeu_ps(out + m * F + f0, mask, _mm512_maskz_max_ps(mask, floor_v, acc));
  }
}
#endif

at::Tensor mel_power_cpu(const at::Tensor& spectrum, const at::Tensor& filters, double floor) {
  TORCH_CHECK(spectrum.dim() == 3 && spectrum.size(2) == 2,
              "mel_power: spectrum must be [frames, bins, 2] (torch.view_as_real of a complex spectrum), got ",
              spectrum.sizes());
  TORCH_CHECK(filters.dim() == 2, "mel_power: filters must be [n_mels, bins], got ", filters.sizes());
  TORCH_CHECK(spectrum.scalar_type() == at::kFloat && filters.scalar_type() == at::kFloat,
              "mel_power: spectrum and filters must be float32, got ", spectrum.scalar_type(), " and ",
              filters.scalar_type());
  TORCH_CHECK(filters.size(1) == spectrum.size(1), "mel_power: filters have ", filters.size(1),
              " bins, the spectrum ", spectrum.size(1));
  TORCH_CHECK(spectrum.device().is_cpu() && filters.device().is_cpu(), "mel_power: CPU tensors only");
  TORCH_CHECK(std::isfinite(floor), "mel_power: floor must be finite, got ", floor);
  const at::Tensor z = spectrum.contiguous(), w = filters.contiguous();
  const int64_t F = z.size(0), n_bins = z.size(1), n_mels = w.size(0);
  at::Tensor out = at::empty({n_mels, F}, z.options());
  if (F == 0 || n_mels == 0) return out;
  TORCH_CHECK(2 * n_bins * kFrames <= std::numeric_limits<int>::max(), "mel_power: ", n_bins, " bins is too many");
  const float* zp = z.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const std::vector<Band> bands = filter_bands(wp, n_mels, n_bins);
  const float fl = static_cast<float>(floor);
#ifdef EF_MEL_X86
  if (cpu_isa() == CpuIsa::Avx512) {
    const int64_t blocks = (F + kFrames - 1) / kFrames;
    at::parallel_for(0, blocks, 16, [&](int64_t b0, int64_t b1) {
      std::vector<float> buffer(kFrames * n_bins + 16);
      float* power = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(buffer.data()) + 63) &
                                              ~static_cast<uintptr_t>(63));
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t f0 = b * kFrames;
        mel_block_avx512(zp, n_bins, wp, bands.data(), n_mels, fl, op, F, f0,
                         static_cast<int>(std::min(kFrames, F - f0)), power);
      }
    });
    return out;
  }
#endif
  at::parallel_for(0, F, 256, [&](int64_t f0, int64_t f1) {
    mel_frames_portable(zp, n_bins, wp, bands, fl, op, F, f0, f1);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(eureka_fast, CPU, m) { m.impl("mel_power", &mel_power_cpu); }

}  // namespace cpu
}  // namespace eureka_fast
