"""The compiled extension's registry: loading ``eureka_fast._C`` (which registers ``torch.ops.eureka_fast.*``), which
kernels it has for which device, and the one decision every op makes: compiled kernel or pure-PyTorch reference.

Op modules hand their Python-side registrations (fake implementations, autograd formulas) to ``on_load``; they run
once, right after the extension loads. Without the extension every op runs its reference (a one-time warning says so).
"""
from __future__ import annotations

import warnings
from typing import Callable, Optional

import torch

from . import cuda_policy

__all__ = ["load_extension", "backend", "has_kernel", "use_kernel", "cpu_kernel_runs", "cpu_isa", "on_load"]

_EXT: Optional[bool] = None
_WARNED = False
_KERNEL_CACHE: dict = {}
_CPU_ISA: Optional[str] = None
_ON_LOAD: list = []  # (register, kernel_ops) in the order the op modules asked
_DISPATCH_KEYS = {"cpu": "CPU", "cuda": "CUDA", "meta": "Meta"}


def load_extension() -> bool:
    """Imports eureka_fast._C once; True when it loaded. The first failure warns once, naming the import error."""
    global _EXT, _WARNED
    if _EXT is None:
        try:
            from .. import _C  # noqa: F401  (registers torch.ops.eureka_fast.*)
        except ImportError as exc:  # depends on the build
            _EXT = False
            if not _WARNED:
                _WARNED = True
                warnings.warn(
                    f"eureka_fast: compiled kernels not available ({exc}); every op runs its pure-PyTorch reference",
                    RuntimeWarning,
                    stacklevel=3,
                )
        else:
            _EXT = True
            for register, kernel_ops in _ON_LOAD:
                _loaded(register, kernel_ops)
            cuda_policy.sync_extension()  # the CUDA GEMM regimes the validation policy allows
    return _EXT


def backend() -> str:
    """'compiled' when eureka_fast._C is loaded, else 'reference'. Per op and device (CUDA kernels run only where
    the validation policy allows them): ``ops.backend_report(device)``."""
    return "compiled" if load_extension() else "reference"


def has_kernel(op_name: str, device: torch.device) -> bool:
    """Whether ``eureka_fast::<op_name>`` has a kernel for ``device``'s type (meta tensors always do: fake
    implementations); False for an op this build does not define. Cached per (op, device type); call it after
    ``load_extension``, which it does not do itself."""
    key = (op_name, device.type)
    if key not in _KERNEL_CACHE:
        dispatch_key = _DISPATCH_KEYS.get(device.type)
        try:
            found = dispatch_key is not None and (
                dispatch_key == "Meta"
                or torch._C._dispatch_has_kernel_for_dispatch_key(f"eureka_fast::{op_name}", dispatch_key))
        except RuntimeError:  # "operator eureka_fast::... does not exist"
            found = False
        _KERNEL_CACHE[key] = found
    return _KERNEL_CACHE[key]


def use_kernel(op_name: str, device: torch.device, use_reference: bool = False) -> bool:
    """The decision each op makes for tensors on ``device``: True runs the compiled kernel, False the reference.
    CUDA kernels run only where the validation policy (``cuda_policy``) allows them."""
    if use_reference or not load_extension() or not has_kernel(op_name, device):
        return False
    return device.type != "cuda" or cuda_policy.kernel_allowed(op_name)


def cpu_kernel_runs(op_name: str, x: torch.Tensor) -> bool:
    """For the CPU-only inference kernels (the Whisper encoder's): whether ``op_name``'s kernel takes ``x``, a
    float32 / float64 CPU tensor."""
    return x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64) and use_kernel(op_name, x.device)


def cpu_isa() -> Optional[str]:
    """The CPU instruction set the compiled kernels picked at run time ("avx512", "avx2", ...), or None without the
    extension. Ops whose fast path needs one ISA ask this to choose another path on other CPUs."""
    global _CPU_ISA
    if _CPU_ISA is None and load_extension():
        from .. import _C
        _CPU_ISA = str(_C.build_info().get("cpu_isa", "")) if hasattr(_C, "build_info") else ""
    return _CPU_ISA or None


def on_load(register: Optional[Callable[[], None]] = None, kernel_ops: tuple = ()) -> None:
    """Runs ``register`` (an op module's fake and autograd registrations) once the extension has loaded, now if it
    already has, and resolves ``kernel_ops``' kernels for every device type then: a dispatcher query inside a
    torch.compile trace returns a plain bool and would break the graph the first time an op runs."""
    _ON_LOAD.append((register, tuple(kernel_ops)))
    if _EXT:
        _loaded(register, kernel_ops)


def _loaded(register: Optional[Callable[[], None]], kernel_ops: tuple) -> None:
    if register is not None:
        register()
    for op_name in kernel_ops:
        for device_type in _DISPATCH_KEYS:
            has_kernel(op_name, torch.device(device_type))
