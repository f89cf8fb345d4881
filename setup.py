"""Builds eureka_fast._C, the compiled kernel library.

CPU kernels always build. CUDA kernels build when EUREKA_FAST_CUDA=1, or when EUREKA_FAST_CUDA=auto (the
default) and the installed torch has CUDA and nvcc is found. Extra CUDA include dirs (for example the
nvidia/cu13 headers that ship inside the CUDA torch wheel) can be given in EUREKA_FAST_CUDA_INCLUDE.
"""
import glob
import os
import shutil
import sys

from setuptools import setup

import torch
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension, CUDA_HOME

ROOT = os.path.dirname(os.path.abspath(__file__))


def _want_cuda() -> bool:
    mode = os.environ.get("EUREKA_FAST_CUDA", "auto").lower()
    if mode in ("0", "off", "false", "no"):
        return False
    have = torch.version.cuda is not None and (CUDA_HOME is not None or shutil.which("nvcc") is not None)
    if mode in ("1", "on", "true", "yes"):
        if not have:
            raise RuntimeError("EUREKA_FAST_CUDA=1 but torch has no CUDA or nvcc was not found")
        return True
    return have


def _sources(pattern: str):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern), recursive=True))


def _extension():
    cxx_flags = ["-O3", "-std=c++17", "-fopenmp", "-DEUREKA_FAST_BUILD"]
    sources = _sources("csrc/*.cpp") + _sources("csrc/cpu/*.cpp")
    include_dirs = [os.path.join(ROOT, "csrc")]
    if os.environ.get("EUREKA_FAST_ASAN") == "1":
        cxx_flags += ["-fsanitize=address", "-fno-omit-frame-pointer", "-O1", "-g"]
    if _want_cuda():
        # --- CUDA branch (csrc/cuda/) ---
        # torch >= 2.14 headers need C++20 (nvcc 12.x/13.x and g++ >= 10 accept it; older torch builds fine too).
        cxx_flags = [f for f in cxx_flags if not f.startswith("-std=")] + ["-std=c++20"]
        nvcc_flags = ["-O3", "-std=c++20", "--expt-relaxed-constexpr", "-lineinfo"]
        if os.environ.get("EUREKA_FAST_PTXAS_VERBOSE") == "1":
            nvcc_flags += ["-Xptxas", "-v"]  # registers / spills / shared memory per kernel in the build log
        if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
            # Ampere + Hopper; explicit -gencode flags stop torch from guessing the arch list
            nvcc_flags += ["-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90a,code=sm_90a"]
        for extra in filter(None, os.environ.get("EUREKA_FAST_CUDA_INCLUDE", "").split(os.pathsep)):
            # nvcc has no -idirafter of its own: hand it to the host compiler (searched after the toolkit's headers)
            nvcc_flags += [f"-Xcompiler=-idirafter,{extra}"]
            cxx_flags += ["-idirafter", extra]
        return CUDAExtension(
            "eureka_fast._C",
            sources + _sources("csrc/cuda/*.cu") + _sources("csrc/cuda/*.cpp"),
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags + ["-DEUREKA_FAST_WITH_CUDA"], "nvcc": nvcc_flags + ["-DEUREKA_FAST_WITH_CUDA"]},
            extra_link_args=["-fopenmp"],
        )
    return CppExtension(
        "eureka_fast._C",
        sources,
        include_dirs=include_dirs,
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=["-fopenmp"] + (["-fsanitize=address"] if os.environ.get("EUREKA_FAST_ASAN") == "1" else []),
    )


class PersistentBuildExtension(BuildExtension):
    """Compiles into build/ext-<python>-<torch> in the source tree instead of the temporary directory pip gives an
    editable or wheel build, so a second install (e.g. the README's second command, with other extras) finds
    ninja's objects and .ninja_log there and recompiles only what changed. EUREKA_FAST_BUILD_DIR moves it."""

    def finalize_options(self):
        super().finalize_options()
        default = os.path.join(ROOT, "build", f"ext-py{sys.version_info[0]}{sys.version_info[1]}-torch"
                                             f"{torch.__version__.replace('+', '-')}")
        self.build_temp = os.path.abspath(os.environ.get("EUREKA_FAST_BUILD_DIR") or default)
        os.makedirs(self.build_temp, exist_ok=True)


setup(
    ext_modules=[_extension()],
    cmdclass={"build_ext": PersistentBuildExtension.with_options(use_ninja=True)},
)
