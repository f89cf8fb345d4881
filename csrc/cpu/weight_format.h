// Storage formats of expert weights that the float kernels read directly (no ATen, so the stand-alone AVX-512 file
// can include it).
#pragma once

namespace eureka_fast {
namespace cpu {

// 2-byte weights: bf16 (the top half of an fp32) or IEEE fp16.
enum class WeightFormat { BFloat16, Half };

}  // namespace cpu
}  // namespace eureka_fast
