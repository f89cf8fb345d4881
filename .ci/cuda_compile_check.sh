#!/usr/bin/env bash
# CUDA compile check (no GPU needed): build eureka_fast._C with the CUDA kernels (csrc/cuda/) for sm_90a against the
# CUDA 13 build of torch 2.14.1, in a virtual environment OUTSIDE the repository, from a copy of the tree, then load
# the library and check that every op has a CUDA kernel registered. A compile error fails the check.
#
# Idempotent and incremental: the venv, the build tree and ninja's objects live in $EUREKA_FAST_CUDA_CACHE
# (default ~/.cache/eureka_fast_cuda). The copy of the tree only rewrites files whose content changed, so ninja
# recompiles only those; an unchanged tree skips the build altogether. First run: ~3 min venv + ~10-15 min build on
# 2 cores; unchanged rerun: seconds.
#
# Environment: EUREKA_FAST_CUDA_CACHE, EUREKA_FAST_CUDA_VENV, EUREKA_FAST_CUDA_TORCH (pip spec, default
# torch==2.14.1), EUREKA_FAST_CUDA_ARCH (TORCH_CUDA_ARCH_LIST, default 9.0a), MAX_JOBS (default 2),
# EUREKA_FAST_CUDA_CHECK_STRICT=1 (fail instead of skip when no nvcc is installed).
set -euo pipefail
start=$(date +%s)
log() { echo "[cuda-check $(($(date +%s) - start))s] $*"; }

ROOT=$(cd "$(dirname "$0")/.." && pwd)
CACHE=${EUREKA_FAST_CUDA_CACHE:-$HOME/.cache/eureka_fast_cuda}
VENV=${EUREKA_FAST_CUDA_VENV:-$CACHE/venv-torch2.14.1}
TORCH_SPEC=${EUREKA_FAST_CUDA_TORCH:-torch==2.14.1}
ARCH=${EUREKA_FAST_CUDA_ARCH:-9.0a}
TREE=$CACHE/tree
mkdir -p "$CACHE"

# ---- toolkit ----
if [ -x /usr/local/cuda/bin/nvcc ]; then
  export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
elif command -v nvcc >/dev/null; then
  export CUDA_HOME=${CUDA_HOME:-$(dirname "$(dirname "$(command -v nvcc)")")}
else
  if [ "${EUREKA_FAST_CUDA_CHECK_STRICT:-0}" = 1 ]; then
    echo "cuda-check: FAILED: no nvcc found"; exit 1
  fi
  echo "cuda-check: SKIPPED: no CUDA toolkit (nvcc) on this machine"; exit 0
fi
export PATH="$CUDA_HOME/bin:$PATH"
log "nvcc: $("$CUDA_HOME/bin/nvcc" --version | tail -1)"

# ---- venv with the CUDA build of torch (reused when it already has the right torch) ----
want_ver=${TORCH_SPEC#torch==}
if ! "$VENV/bin/python" -c "import torch,sys; sys.exit(0 if torch.__version__.split('+')[0]=='$want_ver' and torch.version.cuda else 1)" 2>/dev/null; then
  log "creating $VENV with $TORCH_SPEC (CUDA build)"
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q "$TORCH_SPEC" ninja setuptools wheel numpy
fi
PY="$VENV/bin/python"
log "torch $("$PY" -c 'import torch; print(torch.__version__, "cuda", torch.version.cuda)')"
# extra CUDA headers (cuBLAS, cuSPARSE, ...) that ship inside the nvidia-* wheels next to torch
EUREKA_FAST_CUDA_INCLUDE=$("$PY" -c "import glob,os,site; print(os.pathsep.join(sorted(glob.glob(os.path.join(site.getsitepackages()[0],'nvidia','cu*','include')))))")
export EUREKA_FAST_CUDA_INCLUDE

# ---- copy of the tree: rewrite only changed files so ninja's timestamps stay meaningful ----
"$PY" - "$ROOT" "$TREE" <<'EOF'
import filecmp, os, shutil, sys
src, dst = sys.argv[1], sys.argv[2]
skip_dirs = {".git", "build", "__pycache__", ".whl", ".gl", ".pytest_cache", "node_modules"}
keep = set()
for d, dirs, files in os.walk(src):
    dirs[:] = [x for x in dirs if x not in skip_dirs and not x.endswith(".egg-info")]
    rel = os.path.relpath(d, src)
    os.makedirs(os.path.join(dst, rel), exist_ok=True)
    for f in files:
        if f.endswith((".so", ".o", ".pyc")):
            continue
        s, t = os.path.join(d, f), os.path.join(dst, rel, f)
        keep.add(os.path.normpath(t))
        if os.path.islink(s):
            continue
        if not os.path.exists(t) or not filecmp.cmp(s, t, shallow=False):
            shutil.copyfile(s, t)
for d, dirs, files in os.walk(dst):
    dirs[:] = [x for x in dirs if x not in skip_dirs]
    for f in files:
        t = os.path.normpath(os.path.join(d, f))
        if t not in keep and not f.endswith((".so", ".o", ".pyc")):
            os.remove(t)
EOF

# ---- build (skipped when sources, torch and arch are unchanged since the last good build) ----
stamp=$(cd "$TREE" && { find csrc setup.py -type f | sort | xargs sha256sum; echo "$ARCH $TORCH_SPEC"; } | sha256sum | cut -c1-16)
so=$(ls "$TREE"/eureka_fast/_C*.so 2>/dev/null | head -1 || true)
if [ -n "$so" ] && [ "$(cat "$CACHE/stamp" 2>/dev/null)" = "$stamp" ]; then
  log "sources unchanged since the last successful build ($stamp): build skipped"
else
  log "building for TORCH_CUDA_ARCH_LIST=$ARCH with MAX_JOBS=${MAX_JOBS:-2} (log: $CACHE/build.log)"
  rm -f "$CACHE/stamp"
  if ! (cd "$TREE" && EUREKA_FAST_CUDA=1 TORCH_CUDA_ARCH_LIST="$ARCH" MAX_JOBS=${MAX_JOBS:-2} \
        EUREKA_FAST_PTXAS_VERBOSE=1 "$PY" setup.py build_ext --inplace) >"$CACHE/build.log" 2>&1; then
    grep -n -B2 -A6 -E "error|Error" "$CACHE/build.log" | head -120 || true
    tail -30 "$CACHE/build.log"
    log "FAILED: CUDA build"
    exit 1
  fi
  echo "$stamp" >"$CACHE/stamp"
  log "build ok"
  # spills in any kernel are worth knowing about (not an error)
  grep -E "bytes spill (stores|loads)" "$CACHE/build.log" | grep -v " 0 bytes spill stores, 0 bytes spill loads" | head -5 || true
fi

# ---- load the library (no GPU needed) and check the CUDA registrations ----
so=$(ls "$TREE"/eureka_fast/_C*.so | head -1)
"$PY" - "$so" <<'EOF'
import sys, torch
torch.ops.load_library(sys.argv[1])
ops = ["route_topk", "moe_aux_loss", "moe_plan", "permute", "combine", "combine_backward", "grouped_mm",
       "grouped_mm_backward", "fused_experts", "stack_norm_project"]
missing = [o for o in ops if not torch._C._dispatch_has_kernel_for_dispatch_key(f"eureka_fast::{o}", "CUDA")]
if missing:
    sys.exit(f"cuda-check: ops without a CUDA kernel: {missing}")
print(f"cuda-check: loaded {sys.argv[1].rsplit('/', 1)[-1]}; CUDA kernels registered for all {len(ops)} ops")
EOF
log "OK"
