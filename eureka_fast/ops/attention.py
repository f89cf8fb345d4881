"""Non-causal multi-head attention for the Whisper encoder (inference): the compiled CPU kernel
``torch.ops.eureka_fast.attention`` (forward only), with ``scaled_dot_product_attention`` as the reference and as the
path whenever autograd records the call or the CPU has no AVX-512.

``attention(q, k, v, key_lengths=None, scale=None, *, q_bias=None, v_bias=None)`` takes q [B, H, Tq, dh], k and v
[B, H, Tk, dh] (and optional [H * dh] biases to add to q and v) and returns
[B, H, Tq, dh] (a transposed view of a contiguous [B, Tq, H, dh] buffer, like SDPA's CPU kernels, so merging the
heads is free). ``key_lengths`` [B] masks keys at or past key_lengths[b]; ``scale`` defaults to 1 / sqrt(dh).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from . import registry


def _register_fakes() -> None:
    if hasattr(torch.ops.eureka_fast, "attention"):
        @torch.library.register_fake("eureka_fast::attention")
        def _(q, k, v, key_lengths, scale, q_bias=None, v_bias=None):
            return q.new_empty((q.shape[0], q.shape[2], q.shape[1], q.shape[3]))

    if hasattr(torch.ops.eureka_fast, "attention_out"):
        @torch.library.register_fake("eureka_fast::attention_out")
        def _(q, k, v, key_lengths, scale, q_bias, v_bias, out):
            return out


registry.on_load(_register_fakes, ("attention", "attention_out"))


def _kernel_available(device: torch.device) -> bool:
    return registry.use_kernel("attention", device)


# The kernel's fast path is AVX-512 code; its portable path computes exp one value at a time. On CPUs without
# AVX-512, ATen's SDPA (vectorised for the host) ran 1.4-3x faster at the Whisper encoder's shapes, masked or not
# (docs/kernels.md), so `attention` takes SDPA there. True makes it take the portable kernel anyway (its tests).
KERNEL_WITHOUT_AVX512 = False


def _kernel_chosen(device: torch.device) -> bool:
    return _kernel_available(device) and (KERNEL_WITHOUT_AVX512 or registry.cpu_isa() == "avx512")


def _add_head_bias(t: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    return t if bias is None else t + bias.reshape(1, t.shape[1], 1, t.shape[3]).to(t.dtype)


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_lengths: Optional[torch.Tensor] = None,
                        scale: Optional[float] = None, *, q_bias: Optional[torch.Tensor] = None,
                        v_bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The same function with PyTorch's SDPA (differentiable): [B, H, Tq, dh]."""
    mask = None
    if key_lengths is not None:
        mask = (torch.arange(k.shape[2], device=k.device)[None, :] < key_lengths.to(k.device)[:, None])[:, None, None]
    return F.scaled_dot_product_attention(_add_head_bias(q, q_bias), k, _add_head_bias(v, v_bias), attn_mask=mask,
                                          scale=scale)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_lengths: Optional[torch.Tensor] = None,
              scale: Optional[float] = None, *, q_bias: Optional[torch.Tensor] = None,
              v_bias: Optional[torch.Tensor] = None, use_reference: bool = False,
              out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """softmax(scale * (q + q_bias) k^T) (v + v_bias) over the first key_lengths[b] keys; q [B, H, Tq, dh], k/v
    [B, H, Tk, dh], biases [H * dh] or None -> [B, H, Tq, dh]. Taking the biases here lets a fused QKV projection
    skip its bias pass (the kernel folds q's into its packing of q and v's into the output: softmax weights sum to
    1). The compiled kernel runs when autograd does not record the call; otherwise SDPA does. `out`: a contiguous
    [B, Tq, H, dh] buffer of q's dtype the compiled kernel may write the result into (the returned view is then
    out.transpose(1, 2)); other paths ignore it."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be [batch, heads, time, head_dim], got shape {tuple(t.shape)}")
    for name, b in (("q_bias", q_bias), ("v_bias", v_bias)):
        if b is not None and b.numel() != q.shape[1] * q.shape[3]:
            raise ValueError(f"{name} must have heads * head_dim = {q.shape[1] * q.shape[3]} elements, got shape "
                             f"{tuple(b.shape)}")
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1]) if q.shape[-1] else 1.0
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, v, q_bias, v_bias))
    if (use_reference or needs_grad or q.device.type != "cpu" or torch.is_autocast_enabled("cpu")
            or not _kernel_chosen(q.device)):
        return reference_attention(q, k, v, key_lengths, scale, q_bias=q_bias, v_bias=v_bias)
    if (out is not None and q.dtype in (torch.float32, torch.float64) and out.dtype == q.dtype
            and out.shape == (q.shape[0], q.shape[2], q.shape[1], q.shape[3]) and out.is_contiguous()
            and registry.has_kernel("attention_out", q.device)):
        return torch.ops.eureka_fast.attention_out(q, k, v, key_lengths, float(scale), q_bias, v_bias,
                                                   out).transpose(1, 2)
    return torch.ops.eureka_fast.attention(q, k, v, key_lengths, float(scale), q_bias, v_bias).transpose(1, 2)
