"""The Whisper encoder's GEMMs on weights packed once (csrc/cpu/linear_avx512.cpp): ``linear_pack`` packs a float32
[N, K] weight, ``packed_linear_`` computes out (+)= x W^T with bias, GELU or a residual add in its epilogue, and
``packed_linear_norm_`` adds the next LayerNorm to that epilogue. Forward only, CPU only: where ``linear_pack``
returns an empty tensor (no extension, no AVX-512, another dtype, K over its limit) the caller keeps BLAS."""
from __future__ import annotations

from typing import Optional

import torch

from . import registry

__all__ = ["linear_pack", "packed_linear_", "packed_linear_norm_"]


def linear_pack(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` [N, K] packed for ``packed_linear_``, or an empty tensor where that kernel does not run."""
    if not registry.use_kernel("linear_pack", weight.device):
        return weight.new_empty((0,))
    return torch.ops.eureka_fast.linear_pack(weight)


def _require(op_name: str, x: torch.Tensor) -> None:
    if not registry.use_kernel(op_name, x.device):
        raise RuntimeError(f"{op_name} needs the compiled extension's CPU kernel (x is on {x.device}); pack weights "
                           f"with linear_pack and keep the BLAS path where it returns an empty tensor")


def packed_linear_(out: torch.Tensor, x: torch.Tensor, packed: torch.Tensor, bias: Optional[torch.Tensor] = None,
                   accumulate: bool = False, gelu: bool = False) -> torch.Tensor:
    """out [M, N] = gelu?((out if accumulate else 0) + x [M, K] W^T + bias) in place, W packed by ``linear_pack``;
    returns out."""
    _require("packed_linear_", x)
    return torch.ops.eureka_fast.packed_linear_(out, x, packed, bias, accumulate, gelu)


def packed_linear_norm_(out: torch.Tensor, x: torch.Tensor, packed: torch.Tensor, bias: Optional[torch.Tensor],
                        ln_weight: torch.Tensor, ln_bias: torch.Tensor, eps: float,
                        normed: torch.Tensor) -> torch.Tensor:
    """out [M, N] += x W^T + bias (a residual add), then normed = LayerNorm(out) * ln_weight + ln_bias; returns
    normed."""
    _require("packed_linear_norm_", x)
    return torch.ops.eureka_fast.packed_linear_norm_(out, x, packed, bias, ln_weight, ln_bias, eps, normed)


def _register_fakes() -> None:
    if hasattr(torch.ops.eureka_fast, "linear_pack"):
        @torch.library.register_fake("eureka_fast::linear_pack")
        def _(weight):
            return weight.new_empty((weight.shape[1] * ((weight.shape[0] + 15) // 16 * 16),))

        @torch.library.register_fake("eureka_fast::packed_linear_")
        def _(out, x, packed, bias, accumulate, gelu):
            return out

    if hasattr(torch.ops.eureka_fast, "packed_linear_norm_"):
        @torch.library.register_fake("eureka_fast::packed_linear_norm_")
        def _(out, x, packed, bias, ln_weight, ln_bias, eps, normed):
            return normed


registry.on_load(_register_fakes, ("linear_pack", "packed_linear_", "packed_linear_norm_"))
