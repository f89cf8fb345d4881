"""The gated activations and activation derivatives the MoE and downsampling backward passes share, and the dtype
they compute in."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["compute_dtype", "gated_forward", "gated_backward", "act_backward"]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def gated_forward(h: torch.Tensor, act: str) -> torch.Tensor:
    half = h.shape[-1] // 2
    gate, up = h[..., :half], h[..., half:]
    return (F.silu(gate) if act in ("silu", "silu_mul") else F.gelu(gate)) * up


def gated_backward(h: torch.Tensor, grad: torch.Tensor, act: str) -> torch.Tensor:
    """dL/dh for out = act(gate) * up, h = [gate | up]."""
    half = h.shape[-1] // 2
    gate, up = h[..., :half], h[..., half:]
    if act in ("silu", "silu_mul"):
        s = torch.sigmoid(gate)
        f, df = gate * s, s * (1 + gate * (1 - s))
    else:
        cdf = 0.5 * (1 + torch.erf(gate * (1 / math.sqrt(2))))
        f, df = gate * cdf, cdf + gate * torch.exp(-0.5 * gate * gate) * (1 / math.sqrt(2 * math.pi))
    return torch.cat([grad * up * df, grad * f], dim=-1)


def act_backward(z: torch.Tensor, grad: torch.Tensor, act: str) -> torch.Tensor:
    if act == "none":
        return grad
    if act == "swiglu":
        return gated_backward(z, grad, "silu")
    if act == "silu":
        s = torch.sigmoid(z)
        return grad * s * (1 + z * (1 - s))
    cdf = 0.5 * (1 + torch.erf(z * (1 / math.sqrt(2))))
    return grad * (cdf + z * torch.exp(-0.5 * z * z) * (1 / math.sqrt(2 * math.pi)))
