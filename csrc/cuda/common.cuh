// Shared helpers for the eureka_fast CUDA kernels.
//
// Rules every kernel here follows:
//   * 64-bit arithmetic for every row * stride product (int64_t offsets, never int * int);
//   * every launch is followed by C10_CUDA_KERNEL_LAUNCH_CHECK();
//   * no host synchronisation: buffer sizes come from shapes alone, data-dependent sizes stay on the device,
//     so every op can be captured in a CUDA graph;
//   * launches go to the current stream of the input's device (at::cuda::getCurrentCUDAStream()).
#pragma once

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>

namespace eureka_fast {
namespace cuda {

constexpr unsigned kFullMask = 0xffffffffu;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline cudaStream_t stream() { return at::cuda::getCurrentCUDAStream().stream(); }

inline int num_sms() {
  static int sms = -1;
  if (sms < 0) sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  return sms;
}

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// ---------------------------------------------------------------------------------------------------------------
// Element conversions (accumulation type is float, or double for double inputs)
// ---------------------------------------------------------------------------------------------------------------
template <typename T>
struct AccType {
  using type = float;
};
template <>
struct AccType<double> {
  using type = double;
};

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ double to_float(double v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_float(c10::Half v) { return __half2float(static_cast<__half>(v)); }
__device__ __forceinline__ float to_float(c10::BFloat16 v) { return static_cast<float>(v); }

template <typename T>
__device__ __forceinline__ T from_acc(float v) {
  return static_cast<T>(v);
}
template <>
__device__ __forceinline__ __half from_acc<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <typename T>
__device__ __forceinline__ T from_acc(double v) { return static_cast<T>(v); }

// Maps ATen scalar types onto the CUDA element types the kernels are written in.
template <typename T>
struct CudaType {
  using type = T;
};
template <>
struct CudaType<c10::Half> {
  using type = __half;
};
template <>
struct CudaType<c10::BFloat16> {
  using type = __nv_bfloat16;
};

// Dispatch over float / double / half / bfloat16 with `scalar_t` = the CUDA element type.
#define EF_DISPATCH_FLOATING(TYPE, NAME, ...)                                                      \
  [&] {                                                                                            \
    switch (TYPE) {                                                                                \
      case at::kFloat: {                                                                           \
        using scalar_t = float;                                                                    \
        return __VA_ARGS__();                                                                      \
      }                                                                                            \
      case at::kDouble: {                                                                          \
        using scalar_t = double;                                                                   \
        return __VA_ARGS__();                                                                      \
      }                                                                                            \
      case at::kHalf: {                                                                            \
        using scalar_t = __half;                                                                   \
        return __VA_ARGS__();                                                                      \
      }                                                                                            \
      case at::kBFloat16: {                                                                        \
        using scalar_t = __nv_bfloat16;                                                            \
        return __VA_ARGS__();                                                                      \
      }                                                                                            \
      default:                                                                                     \
        TORCH_CHECK(false, NAME, ": unsupported dtype ", TYPE, " (float32/float64/float16/bfloat16)"); \
    }                                                                                              \
  }()

// ---------------------------------------------------------------------------------------------------------------
// Activations (fp32)
// ---------------------------------------------------------------------------------------------------------------
enum Act : int { kActNone = 0, kActSilu = 1, kActGelu = 2 };

template <typename A>
__device__ __forceinline__ A act_apply(int act, A g) {
  if (act == kActSilu) return g / (A(1) + exp(-g));
  if (act == kActGelu) return A(0.5) * g * (A(1) + erf(g * A(0.70710678118654752440)));
  return g;
}
__device__ __forceinline__ float act_apply(int act, float g) {
  if (act == kActSilu) return g / (1.f + expf(-g));
  if (act == kActGelu) return 0.5f * g * (1.f + erff(g * 0.70710678118654752440f));
  return g;
}

// d act(g) / d g
template <typename A>
__device__ __forceinline__ A act_grad(int act, A g) {
  if (act == kActSilu) {
    A s = A(1) / (A(1) + exp(-g));
    return s * (A(1) + g * (A(1) - s));
  }
  if (act == kActGelu) {
    A cdf = A(0.5) * (A(1) + erf(g * A(0.70710678118654752440)));
    A pdf = exp(A(-0.5) * g * g) * A(0.39894228040143267794);
    return cdf + g * pdf;
  }
  return A(1);
}

inline int parse_gated_activation(const std::string& a, const char* op) {
  if (a == "none" || a.empty()) return kActNone;
  if (a == "silu_mul" || a == "silu") return kActSilu;
  if (a == "gelu_mul" || a == "gelu") return kActGelu;
  TORCH_CHECK(false, op, ": unknown activation '", a, "'");
}

// ---------------------------------------------------------------------------------------------------------------
// Warp helpers
// ---------------------------------------------------------------------------------------------------------------
template <typename A>
__device__ __forceinline__ A warp_sum(A v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFullMask, v, o);
  return v;
}
template <typename A>
__device__ __forceinline__ A warp_max(A v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = max(v, __shfl_xor_sync(kFullMask, v, o));
  return v;
}

// Block-wide sum for blockDim.x a multiple of 32 (<= 1024). `scratch` holds >= 32 values. All threads get the sum.
template <typename A>
__device__ __forceinline__ A block_sum(A v, A* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  v = warp_sum(v);
  __syncthreads();  // scratch may still be read by a previous call
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  A r = lane < nwarps ? scratch[lane] : A(0);
  return warp_sum(r);
}

// Environment override of a kernel choice, read on every call (tests and benchmarks flip it at run time).
inline std::string env_choice(const char* name) {
  const char* v = std::getenv(name);
  return v ? std::string(v) : std::string();
}

}  // namespace cuda
}  // namespace eureka_fast
