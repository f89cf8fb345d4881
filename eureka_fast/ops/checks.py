"""Argument checks shared by the ops' Python wrappers (and the downsampler presets): every message names the argument
and the problem."""
from __future__ import annotations

from typing import Optional

import torch

__all__ = ["check_tensor", "check_same_device", "check_int", "check_values"]


def check_tensor(t, name: str, *, dim: Optional[int] = None, floating: bool = False, integer: bool = False):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dim is not None and t.dim() != dim:
        raise ValueError(f"{name} must have {dim} dimensions, got shape {tuple(t.shape)}")
    if floating and not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if integer and (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool):
        raise TypeError(f"{name} must be an integer tensor, got {t.dtype}")
    return t


def check_same_device(**tensors) -> torch.device:
    device = None
    first = None
    for name, t in tensors.items():
        if t is None:
            continue
        if device is None:
            device, first = t.device, name
        elif t.device != device:
            raise ValueError(f"{name} is on {t.device} but {first} is on {device}; all tensors must share a device")
    return device


def check_int(value, name: str, lo: Optional[int] = None, hi: Optional[int] = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if lo is not None and value < lo:
        raise ValueError(f"{name} must be >= {lo}, got {value}")
    if hi is not None and value > hi:
        raise ValueError(f"{name} must be <= {hi}, got {value}")
    return value


def check_values() -> bool:
    """Data-dependent checks (value ranges, finiteness of tensors and of float arguments) run in eager mode; a
    torch.compile trace skips them, since they need a tensor's values on the host (or a bool from a symbolic
    float) and would break the graph. The compiled kernels repeat every one of them (index ranges, k, finite logits,
    correction_bias and routed_scaling), so a compiled graph still raises on bad values, from the kernel."""
    return not torch.compiler.is_compiling()
