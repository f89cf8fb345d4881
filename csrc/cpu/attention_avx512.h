// The AVX-512 attention path for head_dim 64, float32 (attention_avx512.cpp); see attention.cpp for the op.
#pragma once

#include <cstdint>

#include "cpu/common.h"

namespace eureka_fast {
namespace cpu {

// q [B, H, Tq, 64], k and v [B, H, Tk, 64] given by base pointers and strides (elements, 4 each, unit last stride),
// key_len [B] in [1, Tk] or nullptr, q_bias / v_bias [H * 64] or nullptr (added to q and v), out [B, Tq, H, 64]
// contiguous. Call only when cpu_isa() == CpuIsa::Avx512;
// returns false (nothing written) when this build has no AVX-512 path or the strides do not suit it.
bool attention_dh64_avx512(const float* q, const int64_t* q_strides, const float* k, const int64_t* k_strides,
                           const float* v, const int64_t* v_strides, int64_t B, int64_t H, int64_t Tq,
                           const int64_t* key_len, int64_t Tk, float scale, const float* q_bias,
                           const float* v_bias, float* out);

}  // namespace cpu
}  // namespace eureka_fast
