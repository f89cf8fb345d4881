// Which CUDA grouped-GEMM regimes may run (csrc/cuda/grouped_mm.cu picks one from shapes, among the allowed ones).
// Python's dispatch policy (eureka_fast/ops/cuda_policy.py) sets the mask when the library loads and whenever the
// policy changes. It is read on the host at each launch, so a CUDA graph replays the kernels chosen at capture.
#pragma once

#include <atomic>

namespace eureka_fast {

enum GemmRegime : int {
  kGemmStream = 1,  // weight streaming, few rows per expert (bf16 / fp16)
  kGemmTiled = 2,   // mma.sync tensor-core tiles (bf16 / fp16, sm_80+)
  kGemmWgmma = 4,   // Hopper wgmma tiles (sm_90a)
  kGemmSimt = 8,    // plain SIMT tiles: any dtype, any strides (the fallback every problem can take)
  kGemmAllRegimes = 15,
};

inline std::atomic<int>& allowed_gemm_regimes() {
  static std::atomic<int> mask{kGemmAllRegimes};
  return mask;
}

inline bool gemm_regime_allowed(GemmRegime regime) {
  return (allowed_gemm_regimes().load(std::memory_order_relaxed) & regime) != 0;
}

}  // namespace eureka_fast
