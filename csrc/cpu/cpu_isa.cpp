// The instruction set the CPU kernels run with, chosen once per process at run time (cpu_isa(), cpu_has_bf16_matmul()).
#include <algorithm>
#include <cstdlib>
#include <string>

#include "cpu/moe_cpu.h"

namespace eureka_fast {
namespace cpu {
namespace {

#if defined(__x86_64__) && defined(__GNUC__)
// The widest instruction set this CPU supports, capped by EUREKA_FAST_CPU_ISA=baseline|avx2|avx512 (read once;
// lets tests and benchmarks run the narrower copies on a wide machine).
CpuIsa detect_cpu_isa() {
  CpuIsa isa = CpuIsa::Baseline;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) isa = CpuIsa::Avx2;
  if (isa == CpuIsa::Avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl"))
    isa = CpuIsa::Avx512;
  if (const char* cap = std::getenv("EUREKA_FAST_CPU_ISA")) {
    const std::string v(cap);
    const CpuIsa limit = v == "baseline" ? CpuIsa::Baseline : v == "avx2" ? CpuIsa::Avx2 : CpuIsa::Avx512;
    isa = std::min(isa, limit);
  }
  return isa;
}
#else
CpuIsa detect_cpu_isa() { return CpuIsa::Baseline; }
#endif

}  // namespace

CpuIsa cpu_isa() {
  static const CpuIsa isa = detect_cpu_isa();
  return isa;
}

bool cpu_has_bf16_matmul() {
#if defined(__x86_64__) && defined(__GNUC__)
  static const bool has = cpu_isa() == CpuIsa::Avx512 && __builtin_cpu_supports("avx512bf16");
  return has;
#else
  return false;
#endif
}

const char* cpu_isa_name() {
  switch (cpu_isa()) {
    case CpuIsa::Avx512:
      return "avx512";
    case CpuIsa::Avx2:
      return "avx2";
    default:
      return "baseline";
  }
}

}  // namespace cpu
}  // namespace eureka_fast
