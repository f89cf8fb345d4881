#!/usr/bin/env bash
# The prepared GPU run for the CUDA kernels (issue 3): one command, ~6-8 minutes on one H100 (hard caps per step add
# up to < 10 minutes, the device tool's per-command limit), no network.
#   1. builds eureka_fast._C in place with the CUDA kernels for sm_90a (MAX_JOBS=16), keeps the ptxas report
#   2. runs the CUDA op tests (python_tests/ops, marker "cuda": every op vs the references, every GEMM path)
#   3. compute-sanitizer memcheck over small calls of every op / kernel path (bench/gpu_sanitize.py)
#   4. bench/gpu_bench.py: measured ceilings, CUDA-graph capture/replay vs eager, routing+plan latency, roofline
#      table (Qwen3-30B-A3B layer and Eureka adapter, T in {1..32768}) vs transformers' grouped_mm path and the
#      eager loop, regime crossover, backward, audio downsampling, index-overflow case (T*k*H > 2^31)
# Everything lands in $OUT (default bench/gpu_out): build.log, ptxas.txt, pytest.log, memcheck.log, bench.log,
# results.json, RESULTS_section.md (paste into bench/RESULTS.md); the markdown section is printed last.
# Usage with the device tool:  bash bench/gpu_check.sh
# Reruns on a warm machine: GPU_CHECK_STEPS=tests,bench (any of build,tests,memcheck,bench; the .so from the last
# build is kept), GPU_BENCH_ONLY=roofline,regimes (sections of bench/gpu_bench.py).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${OUT:-$ROOT/bench/gpu_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PATH="$PATH:/usr/local/cuda/bin:/usr/local/cuda/compute-sanitizer"
export PYTHONUNBUFFERED=1 PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
t0=$(date +%s)
stamp() { echo "[gpu_check $(($(date +%s) - t0))s] $*"; }
declare -A STATUS
STEPS=",${GPU_CHECK_STEPS:-build,tests,memcheck,bench},"
want() { [[ "$STEPS" == *",$1,"* ]]; }

# ---- 0. device ----
stamp "device"
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm,temperature.gpu --format=csv
  $PY -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
  nvcc --version | tail -1; } 2>&1 | tee "$OUT/device.txt"

# ---- 1. build ----
if want build; then
stamp "build (sm_90a, MAX_JOBS=${MAX_JOBS:-16})"
if [ -x /usr/local/cuda/bin/nvcc ]; then export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}; fi
EUREKA_FAST_CUDA_INCLUDE=$($PY -c "import glob,os,site; print(os.pathsep.join(sorted(glob.glob(os.path.join(site.getsitepackages()[0],'nvidia','cu*','include')))))" 2>/dev/null || true)
export EUREKA_FAST_CUDA_INCLUDE
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

# ---- 2. tests ----
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

# ---- 3. compute-sanitizer memcheck ----
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

# ---- 4. benchmarks and the graph / overflow checks ----
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
for k in build tests memcheck bench; do echo "  $k: ${STATUS[$k]:-not run}"; done | tee "$OUT/status.txt"
stamp "total"
echo
grep -E "^\[gpu_bench" "$OUT/bench.log" | tail -20
echo
cat "$OUT/RESULTS_section.md" 2>/dev/null || echo "(no RESULTS_section.md)"
