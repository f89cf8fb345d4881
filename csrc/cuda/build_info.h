// What the CUDA part of this build was compiled with (reported by eureka_fast._C.build_info()).
#pragma once

#include <string>

namespace eureka_fast {
namespace cuda {

// The CUDA runtime version the kernels were compiled against, e.g. "13.0".
std::string compiled_cuda_version();
// The nvcc version that compiled them, e.g. "13.0".
std::string compiled_nvcc_version();

}  // namespace cuda
}  // namespace eureka_fast
