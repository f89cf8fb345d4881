// compiled_cuda_version / compiled_nvcc_version (build_info.h): no kernels here.
#include <cuda_runtime_api.h>

#include <string>

#include "build_info.h"

namespace eureka_fast {
namespace cuda {

std::string compiled_cuda_version() {
  return std::to_string(CUDART_VERSION / 1000) + "." + std::to_string((CUDART_VERSION % 1000) / 10);
}

std::string compiled_nvcc_version() {
  return std::to_string(__CUDACC_VER_MAJOR__) + "." + std::to_string(__CUDACC_VER_MINOR__);
}

}  // namespace cuda
}  // namespace eureka_fast
