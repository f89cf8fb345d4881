"""Which CUDA kernels may run on users' tensors: the validation table and the dispatch decision.

A CUDA kernel path (an op's kernel, or one regime of the grouped GEMM the expert ops run on) runs by default only
when it has been validated on GPU hardware: the record names the GPU, the date and the result. Every other path
runs only when the user opts in with ``EUREKA_FAST_CUDA_KERNELS``:

- unset, ``""`` or ``"validated"``: validated paths only (the default);
- ``"all"``: every compiled CUDA kernel;
- ``"none"``: no CUDA kernel (every op on CUDA tensors takes its pure-PyTorch reference);
- a comma-separated list of path names (``"grouped_mm,fused_experts,gemm:simt"``): the validated paths plus those.

An op on CUDA tensors whose kernel may not run takes its pure-PyTorch reference, which runs on the GPU too. CPU
kernels are not gated (the test suite runs them on every build). ``backend_report()`` says, per op and device,
which path runs and why; ``eureka-audio doctor`` prints it.

The decision is a pure function of the table and the setting (``decide``); the active setting is read from the
environment when eureka_fast.ops is imported, or set with ``configure()``. The allowed GEMM regimes are handed to
the compiled library as a mask read on the host at each launch, so a CUDA graph replays what was chosen at capture.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict, FrozenSet, Mapping, NamedTuple, Optional, Tuple

ENV_VAR = "EUREKA_FAST_CUDA_KERNELS"


@dataclass(frozen=True)
class Validation:
    """One hardware validation: the GPU, the date (YYYY-MM-DD) and what was run and passed."""

    gpu: str
    date: str
    result: str


@dataclass(frozen=True)
class KernelPath:
    """A CUDA kernel path. ``needs``: the other paths its kernel (forward or the backward that autograd runs
    through the library's own ops) also runs, so it may only run when they may; ``validated``: None until a GPU
    run passes its tests."""

    name: str
    what: str
    needs: Tuple[str, ...] = ()
    validated: Optional[Validation] = None


# The GEMM regimes of csrc/cuda/grouped_mm.cu, with the bit each has in the mask the library reads
# (csrc/gemm_regimes.h). SIMT is the fallback every problem can take: the GEMM ops need it.
GEMM_REGIME_BITS = {"gemm:stream": 1, "gemm:tiled": 2, "gemm:wgmma": 4, "gemm:simt": 8}

# No CUDA kernel has run on a GPU yet: every record below is None until a GPU run (bench/gpu_check.sh) passes the
# CUDA tests of that path. Record it as Validation("NVIDIA H100 80GB HBM3", "2027-01-15", "python_tests/ops CUDA
# tests passed, compute-sanitizer clean") in the change that marks it.
KERNEL_PATHS: Dict[str, KernelPath] = {p.name: p for p in (
    KernelPath("route_topk", "routing: scoring + top-k (csrc/cuda/route_topk.cu)"),
    KernelPath("moe_aux_loss", "load-balancing loss (csrc/cuda/moe_aux_loss.cu)"),
    KernelPath("moe_plan", "routing plan (csrc/cuda/moe_plan.cu)"),
    KernelPath("permute", "gather into expert order (csrc/cuda/permute_combine.cu); backward runs combine",
               needs=("combine",)),
    KernelPath("combine", "weighted combine and its backward (csrc/cuda/permute_combine.cu)"),
    KernelPath("grouped_mm", "grouped GEMM and its backward (csrc/cuda/grouped_mm.cu)", needs=("gemm:simt",)),
    KernelPath("fused_experts", "the routed-expert layer (csrc/cuda/fused_experts.cu); backward runs the plan, "
               "permute, grouped GEMM and combine kernels",
               needs=("moe_plan", "permute", "combine", "grouped_mm", "gemm:simt")),
    KernelPath("stack_norm_project", "audio downsampling (csrc/cuda/stack_norm_project.cu)"),
    KernelPath("gemm:stream", "grouped GEMM regime: weight streaming, few rows per expert (bf16/fp16)"),
    KernelPath("gemm:tiled", "grouped GEMM regime: mma.sync tensor-core tiles (bf16/fp16, sm_80+)"),
    KernelPath("gemm:wgmma", "grouped GEMM regime: Hopper wgmma tiles (sm_90a; also needs EUREKA_FAST_WGMMA=1 "
               "for the automatic choice)"),
    KernelPath("gemm:simt", "grouped GEMM regime: SIMT tiles, any dtype and strides (the fallback)"),
)}

# Ops that dispatch through this policy (the keys of KERNEL_PATHS that are not GEMM regimes).
POLICY_OPS = tuple(name for name in KERNEL_PATHS if name not in GEMM_REGIME_BITS)


class Setting(NamedTuple):
    """A parsed EUREKA_FAST_CUDA_KERNELS value: ``mode`` is "validated" | "all" | "none" | "list"."""

    mode: str
    listed: FrozenSet[str]
    text: str


class Decision(NamedTuple):
    kernel: bool
    reason: str


def parse_setting(text: Optional[str]) -> Setting:
    """Parses an EUREKA_FAST_CUDA_KERNELS value; raises ValueError naming the bad entry."""
    raw = "" if text is None else str(text)
    value = raw.strip().lower()
    if value in ("", "validated", "default"):
        return Setting("validated", frozenset(), raw)
    if value in ("all", "none"):
        return Setting(value, frozenset(), raw)
    names = [n.strip() for n in value.split(",") if n.strip()]
    unknown = [n for n in names if n not in KERNEL_PATHS]
    if unknown or not names:
        raise ValueError(f"{ENV_VAR}={raw!r}: unknown kernel path(s) {unknown}; use 'validated', 'all', 'none' or a "
                         f"comma-separated list of {sorted(KERNEL_PATHS)}")
    return Setting("list", frozenset(names), raw)


def path_enabled(name: str, setting: Setting, table: Mapping[str, KernelPath] = KERNEL_PATHS) -> Tuple[bool, str]:
    """Whether one path may run under ``setting`` by itself (dependencies not considered), and why."""
    path = table[name]
    if setting.mode == "none":
        return False, f"{ENV_VAR}=none"
    if path.validated is not None:
        v = path.validated
        return True, f"validated on {v.gpu} on {v.date} ({v.result})"
    if setting.mode == "all":
        return True, f"not validated on a GPU; enabled by {ENV_VAR}=all"
    if name in setting.listed:
        return True, f"not validated on a GPU; enabled by {ENV_VAR} listing it"
    return False, f"not validated on a GPU (opt in with {ENV_VAR}=all or ={name})"


def decide(name: str, setting: Setting, table: Mapping[str, KernelPath] = KERNEL_PATHS) -> Decision:
    """Whether the CUDA kernel of path ``name`` may run under ``setting``: it and every path it needs must be
    enabled. The reason names the first path that is not."""
    if name not in table:
        raise KeyError(f"unknown CUDA kernel path {name!r}; known: {sorted(table)}")
    ok, reason = path_enabled(name, setting, table)
    if not ok:
        return Decision(False, reason)
    for dep in table[name].needs:
        dep_ok, dep_reason = decide(dep, setting, table)
        if not dep_ok:
            return Decision(False, f"needs {dep}, which may not run: {dep_reason}")
    return Decision(True, reason)


def regime_mask(setting: Setting, table: Mapping[str, KernelPath] = KERNEL_PATHS) -> int:
    """The GEMM regimes that may run, as the library's bit mask (csrc/gemm_regimes.h)."""
    return sum(bit for name, bit in GEMM_REGIME_BITS.items() if decide(name, setting, table).kernel)


# ---- the active setting ----
_SETTING: Setting = Setting("validated", frozenset(), "")
_SETTING_ERROR: Optional[str] = None
_ALLOWED: Dict[str, bool] = {}


def _resolve(setting: Setting) -> None:
    global _SETTING, _ALLOWED
    _SETTING = setting
    _ALLOWED = {name: decide(name, setting).kernel for name in KERNEL_PATHS}


def configure(setting: Optional[str] = None) -> Setting:
    """Sets the active policy from ``setting`` (an EUREKA_FAST_CUDA_KERNELS value), or re-reads the environment
    when None. Also hands the allowed GEMM regimes to the compiled library when it is loaded. Returns the parsed
    setting; raises ValueError for a bad one (the active policy is left unchanged then)."""
    global _SETTING_ERROR
    parsed = parse_setting(os.environ.get(ENV_VAR) if setting is None else setting)
    _SETTING_ERROR = None
    _resolve(parsed)
    sync_extension()
    return parsed


def sync_extension() -> None:
    """Hands the active GEMM regime mask to eureka_fast._C (a no-op when it is not built)."""
    try:
        from .. import _C
    except ImportError:
        return
    setter = getattr(_C, "set_cuda_gemm_regimes", None)
    if setter is not None:
        setter(regime_mask(_SETTING))


def active_setting() -> Setting:
    """The policy in force. A bad EUREKA_FAST_CUDA_KERNELS raises here (and on every CUDA op) with what is wrong."""
    if _SETTING_ERROR is not None:
        raise ValueError(_SETTING_ERROR)
    return _SETTING


def kernel_allowed(op_name: str) -> bool:
    """Whether ``op_name``'s CUDA kernel may run (the dispatch hook of the op wrappers; a dict lookup)."""
    if _SETTING_ERROR is not None:
        raise ValueError(_SETTING_ERROR)
    return _ALLOWED.get(op_name, False)


def backend_report(device: str = "cpu") -> Dict[str, Tuple[str, str]]:
    """For each op, the path it takes on ``device`` ("cpu" | "cuda") and why: {op: ("kernel" | "reference",
    reason)}. Reports what the build holds; it does not need the device to be present."""
    from . import registry

    device = str(device).split(":")[0]
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    report: Dict[str, Tuple[str, str]] = {}
    loaded = registry.load_extension()
    import torch

    for op in POLICY_OPS:
        if not loaded:
            report[op] = ("reference", "eureka_fast._C is not built")
        elif not registry.has_kernel(op, torch.device(device)):
            report[op] = ("reference", f"this build has no {device.upper()} kernel for it")
        elif device == "cpu":
            report[op] = ("kernel", "CPU kernels always run when built")
        else:
            decision = decide(op, active_setting())
            report[op] = ("kernel" if decision.kernel else "reference", decision.reason)
    return report


try:
    _resolve(parse_setting(os.environ.get(ENV_VAR)))
except ValueError as exc:  # reported on first use, not at import
    _SETTING_ERROR = str(exc)
