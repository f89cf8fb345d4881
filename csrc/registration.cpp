// The one registration file: op schemas for the eureka_fast namespace and the Python module entry point.
// Kernels register their implementations per dispatch key (CPU, CUDA) next to their code.
#include <torch/extension.h>

TORCH_LIBRARY(eureka_fast, m) {}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.doc() = "eureka_fast compiled kernels"; }
