// Run-time instruction-set dispatch shared by the hand-vectorised CPU kernels: each float kernel body is compiled
// for baseline x86-64 and again with target("avx2,fma") (and some with AVX-512 intrinsics); the copy to run is
// picked from cpu_isa() (moe_cpu.h, cpu_isa.cpp), so the library runs on any x86-64 CPU without -march=native.
#pragma once

#include "cpu/moe_cpu.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define EF_HAVE_AVX2_COPY 1
#define EF_AVX2 __attribute__((target("avx2,fma")))
#else
#define EF_HAVE_AVX2_COPY 0
#define EF_AVX2
#endif
#define EF_INLINE inline __attribute__((always_inline))

#if EF_HAVE_AVX2_COPY
// avx2_call where the CPU (capped by EUREKA_FAST_CPU_ISA) has AVX2 + FMA, else base_call.
#define EF_DISPATCH(avx2_call, base_call)                         \
  do {                                                            \
    if (::eureka_fast::cpu::cpu_isa() >= ::eureka_fast::cpu::CpuIsa::Avx2) { \
      avx2_call;                                                  \
    } else {                                                      \
      base_call;                                                  \
    }                                                             \
  } while (0)
#define EF_DISPATCH3(avx512_call, avx2_call, base_call)                        \
  do {                                                                         \
    if (::eureka_fast::cpu::cpu_isa() == ::eureka_fast::cpu::CpuIsa::Avx512) { \
      avx512_call;                                                             \
    } else {                                                                   \
      EF_DISPATCH(avx2_call, base_call);                                       \
    }                                                                          \
  } while (0)
#else
#define EF_DISPATCH(avx2_call, base_call) base_call
#define EF_DISPATCH3(avx512_call, avx2_call, base_call) base_call
#endif
