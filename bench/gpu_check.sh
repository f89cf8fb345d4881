#!/usr/bin/env bash
# The prepared GPU run for the CUDA kernels: one command, ~6-8 minutes on one H100 (hard caps per step add up to
# < 10 minutes), no network.
# Expects the lent machines' environment: Python with torch 2.11 (CUDA 13.0 build), transformers 5.17, pytest and
# pytest-xdist, nvcc for the build step; nothing is installed. A different torch or CUDA is reported, not refused.
# Every CUDA kernel path runs here whatever the validation policy says (EUREKA_FAST_CUDA_KERNELS=all): this run is
# how a path gets validated (record it in eureka_fast/ops/cuda_policy.py's KERNEL_PATHS, docs/kernels.md).
#   1. builds eureka_fast._C in place with the CUDA kernels for sm_90a (MAX_JOBS=16), keeps the ptxas report; an
#      eureka_fast/_C*.so already there that has CUDA kernels and loads with this torch is kept (build it ahead
#      against torch 2.11 with .ci/cuda_compile_check.sh and carry it: saves the build's device time)
#   2. eureka-audio doctor on the CPU and cuda:0 (every compiled kernel vs its reference, each GEMM regime)
#   3. runs the CUDA op tests (python_tests/ops, marker "cuda": every op vs the references, every GEMM path)
#   4. compute-sanitizer memcheck over small calls of every op / kernel path (bench/gpu_sanitize.py)
#   5. bench/gpu_bench.py: measured ceilings, CUDA-graph capture/replay vs eager, routing+plan latency, roofline
#      table (Qwen3-30B-A3B layer and Eureka adapter, T in {1..32768}) vs transformers' grouped_mm path and the
#      eager loop, regime crossover, backward, audio downsampling, index-overflow case (T*k*H > 2^31)
# Everything lands in $OUT (default bench/gpu_out): build.log, ptxas.txt, doctor.log, pytest.log, memcheck.log, bench.log,
# results.json, RESULTS_section.md (paste into bench/RESULTS.md); the markdown section is printed last.
# Usage with the device tool:  bash bench/gpu_check.sh
# Reruns on a warm machine: GPU_CHECK_STEPS=tests,bench (any of build,doctor,tests,memcheck,bench; the .so from the last
# build is kept), GPU_BENCH_ONLY=roofline,regimes (sections of bench/gpu_bench.py).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${OUT:-$ROOT/bench/gpu_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PATH="$PATH:/usr/local/cuda/bin:/usr/local/cuda/compute-sanitizer"
export PYTHONUNBUFFERED=1 PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export EUREKA_FAST_CUDA_KERNELS=all  # every compiled CUDA kernel path may run (see above)
t0=$(date +%s)
stamp() { echo "[gpu_check $(($(date +%s) - t0))s] $*"; }
declare -A STATUS
STEPS=",${GPU_CHECK_STEPS:-build,doctor,tests,memcheck,bench},"
want() { [[ "$STEPS" == *",$1,"* ]]; }

# ---- 0. device ----
stamp "device"
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm,temperature.gpu --format=csv
  $PY -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
  $PY -c "import transformers; print('transformers', transformers.__version__)"
  $PY -c "import torch; v = torch.__version__.split('+')[0]; ok = v.startswith('2.11.') and torch.version.cuda == '13.0'; print('expected torch 2.11 + CUDA 13.0:', 'yes' if ok else 'NO (got %s + CUDA %s)' % (v, torch.version.cuda))"
  nvcc --version | tail -1; } 2>&1 | tee "$OUT/device.txt"

# ---- 1. build ----
if want build; then
stamp "build (sm_90a, MAX_JOBS=${MAX_JOBS:-16})"
if [ -x /usr/local/cuda/bin/nvcc ]; then export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}; fi
EUREKA_FAST_CUDA_INCLUDE=$($PY -c "import glob,os,site; print(os.pathsep.join(sorted(glob.glob(os.path.join(site.getsitepackages()[0],'nvidia','cu*','include')))))" 2>/dev/null || true)
export EUREKA_FAST_CUDA_INCLUDE
if ls eureka_fast/_C*.so >/dev/null 2>&1 && $PY -c "
import sys, torch
from eureka_fast import _C
sys.exit(0 if _C.build_info().get('with_cuda') and torch._C._dispatch_has_kernel_for_dispatch_key('eureka_fast::fused_experts', 'CUDA') else 1)" 2>/dev/null; then
  STATUS[build]="ok (kept the prebuilt $(ls eureka_fast/_C*.so))"
  stamp "build skipped: ${STATUS[build]}"
else
rm -f eureka_fast/_C*.so
if EUREKA_FAST_CUDA=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a} MAX_JOBS=${MAX_JOBS:-16} \
   EUREKA_FAST_PTXAS_VERBOSE=1 timeout 240 $PY setup.py build_ext --inplace >"$OUT/build.log" 2>&1; then
  STATUS[build]=ok
else
  STATUS[build]=FAILED
  grep -n -B2 -A8 -E "error" "$OUT/build.log" | head -80
  tail -20 "$OUT/build.log"
  stamp "build FAILED: nothing else can run"
  exit 1
fi
# registers / spills / shared memory per kernel
grep -E "Compiling entry function|registers|spill" "$OUT/build.log" | sed 's/ptxas info *: //' >"$OUT/ptxas.txt" || true
grep -E "bytes spill (stores|loads)" "$OUT/build.log" | grep -v " 0 bytes spill stores, 0 bytes spill loads" | head -5 || true
stamp "build ok: $(ls eureka_fast/_C*.so)"
fi
fi

# ---- 2. doctor: every compiled kernel against its reference on the CPU and cuda:0, each GEMM regime ----
if want doctor; then
  stamp "eureka-audio doctor"
  if timeout 90 $PY -c "import sys; from eureka_fast.cli import main; sys.exit(main(sys.argv[1:]))" doctor \
     >"$OUT/doctor.log" 2>&1; then
    STATUS[doctor]=ok
  else
    STATUS[doctor]="FAILED (rc=$?)"
    grep -E "^  FAIL|error" "$OUT/doctor.log" | head -30
  fi
  tail -1 "$OUT/doctor.log"
fi

# ---- 3. tests ----
if want tests; then
stamp "CUDA op tests"
XDIST=""
$PY -c "import xdist" 2>/dev/null && XDIST="-n 8"
if timeout 110 $PY -m pytest -q -p no:cacheprovider -o addopts="-ra" -m cuda $XDIST python_tests/ops >"$OUT/pytest.log" 2>&1; then
  STATUS[tests]=ok
else
  STATUS[tests]=FAILED
  grep -E "^(FAILED|ERROR)" "$OUT/pytest.log" | head -30
fi
tail -3 "$OUT/pytest.log"
fi

# ---- 4. compute-sanitizer memcheck ----
if ! want memcheck; then
  :
elif command -v compute-sanitizer >/dev/null; then
  stamp "compute-sanitizer memcheck (small cases)"
  if PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout 90 compute-sanitizer --tool memcheck --error-exitcode 7 \
     --print-limit 20 $PY bench/gpu_sanitize.py >"$OUT/memcheck.log" 2>&1; then
    STATUS[memcheck]=ok
  else
    STATUS[memcheck]="FAILED (rc=$?)"
    grep -E "Invalid|ERROR|Error|at 0x" "$OUT/memcheck.log" | head -20
  fi
  tail -2 "$OUT/memcheck.log"
else
  STATUS[memcheck]="skipped (no compute-sanitizer)"
fi

# ---- 5. benchmarks and the graph / overflow checks ----
if want bench; then
  stamp "gpu_bench"
  if timeout 150 $PY bench/gpu_bench.py --out "$OUT" --only "${GPU_BENCH_ONLY:-}" >"$OUT/bench.log" 2>&1; then
    STATUS[bench]=ok
  else
    STATUS[bench]="FAILED (rc=$?)"
    grep -B3 -A12 "Traceback" "$OUT/bench.log" | head -60
  fi
fi

# ---- summary: the markdown section last ----
echo
for k in build doctor tests memcheck bench; do echo "  $k: ${STATUS[$k]:-not run}"; done | tee "$OUT/status.txt"
stamp "total"
echo
grep -E "^\[gpu_bench" "$OUT/bench.log" | tail -20
echo
cat "$OUT/RESULTS_section.md" 2>/dev/null || echo "(no RESULTS_section.md)"
