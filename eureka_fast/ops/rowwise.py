"""Row-wise in-place passes of the Whisper encoder's inference path: bias + GELU (``eureka_fast::bias_gelu_``,
csrc/cpu/bias_gelu.cpp) and residual bias + LayerNorm (``eureka_fast::add_layer_norm_`` / ``add_layer_norm_out``,
csrc/cpu/add_layer_norm.cpp). Forward only, no autograd: each falls back to the same ATen ops where its kernel does
not run (no extension, not a float32 / float64 CPU tensor)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from . import registry

__all__ = ["gelu_", "bias_gelu_", "add_layer_norm_"]


def gelu_(x: torch.Tensor) -> torch.Tensor:
    """x = gelu(x) in place (exact erf GELU; ATen's in-place op, which Tensor has no method for); returns x."""
    return torch.ops.aten.gelu_(x)


def bias_gelu_(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """x [rows, cols] = gelu(x + bias[cols]) in place (exact erf GELU), one pass; returns x."""
    if registry.cpu_kernel_runs("bias_gelu_", x):
        return torch.ops.eureka_fast.bias_gelu_(x, bias)
    return gelu_(x.add_(bias))


def add_layer_norm_(x: torch.Tensor, bias: Optional[torch.Tensor], weight: torch.Tensor, ln_bias: torch.Tensor,
                    eps: float, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x [..., d] += bias (in place, when given), then returns layer_norm(x) * weight + ln_bias, in one pass where the
    kernel runs. ``out`` (x's shape and dtype, contiguous, not x): a buffer the kernel writes the result into."""
    if registry.cpu_kernel_runs("add_layer_norm_", x) and x.is_contiguous():
        if out is not None and registry.has_kernel("add_layer_norm_out", x.device):
            return torch.ops.eureka_fast.add_layer_norm_out(x, bias, weight, ln_bias, eps, out)
        return torch.ops.eureka_fast.add_layer_norm_(x, bias, weight, ln_bias, eps)
    if bias is not None:
        x.add_(bias)
    return F.layer_norm(x, (x.shape[-1],), weight, ln_bias, eps)


def _register_fakes() -> None:
    if hasattr(torch.ops.eureka_fast, "bias_gelu_"):
        @torch.library.register_fake("eureka_fast::bias_gelu_")
        def _(x, bias):
            return x

    if hasattr(torch.ops.eureka_fast, "add_layer_norm_"):
        @torch.library.register_fake("eureka_fast::add_layer_norm_")
        def _(x, bias, weight, ln_bias, eps):
            return torch.empty_like(x)

    if hasattr(torch.ops.eureka_fast, "add_layer_norm_out"):
        @torch.library.register_fake("eureka_fast::add_layer_norm_out")
        def _(x, bias, weight, ln_bias, eps, out):
            return out


registry.on_load(_register_fakes, ("bias_gelu_", "add_layer_norm_", "add_layer_norm_out"))
