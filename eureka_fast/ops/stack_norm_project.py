"""stack_norm_project: the audio downsampler (stack or average k frames, norm, Linear, activation, optional second
Linear) as one op, with its fake implementation and analytic backward. The presets that reproduce published
downsamplers live in eureka_fast.integrations.downsample_presets.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import reference as ref
from . import registry
from .activations import act_backward, compute_dtype, gated_forward
from .checks import check_int, check_same_device, check_tensor, check_values
from .registry import use_kernel

__all__ = ["stack_norm_project"]

_NORMS = {None: "none", "none": "none", "layer": "layer", "rms": "rms"}
_ACTS = {None: "none", "none": "none", "silu": "silu", "gelu": "gelu", "swiglu": "swiglu"}


def stack_norm_project(x, k, *, lengths=None, norm="layer", norm_weight=None, norm_bias=None, w1=None, b1=None,
                       activation="silu", w2=None, b2=None, eps=1e-5, pool="stack", use_reference=False):
    """Downsamples frames x [B, T, D] by k: stack k consecutive frames (time-major: frame t*k+j fills channels
    j*D..(j+1)*D) or average them (pool="mean"), then norm ("layer" | "rms" | None), Linear w1/b1, activation
    ("silu" | "gelu" | "swiglu" (first half gates) | None), optional Linear w2/b2. Ragged batches via ``lengths``
    [B]: frames at or past lengths[b] count as zeros and output rows at or past ceil(lengths[b] / k) are zero.
    Returns [B, ceil(T / k), out_features]."""
    check_tensor(x, "x", dim=3, floating=True)
    check_int(k, "k", 1)
    if pool not in ("stack", "mean"):
        raise ValueError(f"pool must be 'stack' or 'mean', got {pool!r}")
    if norm not in _NORMS:
        raise ValueError(f"norm must be 'layer', 'rms' or None, got {norm!r}")
    if activation not in _ACTS:
        raise ValueError(f"activation must be 'silu', 'gelu', 'swiglu' or None, got {activation!r}")
    if not isinstance(eps, (int, float)) or not eps >= 0:
        raise ValueError(f"eps must be a number >= 0, got {eps!r}")
    B, T, D = x.shape
    width = D if pool == "mean" else k * D
    for name, t in (("norm_weight", norm_weight), ("norm_bias", norm_bias)):
        if t is not None:
            check_tensor(t, name, dim=1, floating=True)
            if t.shape[0] != width:
                raise ValueError(f"{name} must have shape [{width}] (the pooled width), got {tuple(t.shape)}")
    if norm_bias is not None and _NORMS[norm] != "layer":
        raise ValueError(f"norm_bias is only used by norm='layer', got norm={norm!r}")
    features = width
    for wn, bn, w, b in (("w1", "b1", w1, b1), ("w2", "b2", w2, b2)):
        if w is None:
            if b is not None:
                raise ValueError(f"{bn} given without {wn}")
        else:
            check_tensor(w, wn, dim=2, floating=True)
            if w.shape[1] != features:
                raise ValueError(f"{wn} must have shape [out, {features}], got {tuple(w.shape)}")
            features = w.shape[0]
            if b is not None:
                check_tensor(b, bn, dim=1, floating=True)
                if b.shape[0] != features:
                    raise ValueError(f"{bn} must have shape [{features}], got {tuple(b.shape)}")
        if wn == "w1" and _ACTS[activation] == "swiglu":
            if features % 2:
                raise ValueError(f"activation='swiglu' needs an even number of features, got {features}")
            features //= 2
    if lengths is not None:
        check_tensor(lengths, "lengths", dim=1, integer=True)
        if lengths.shape[0] != B:
            raise ValueError(f"lengths must have shape [{B}] (one per batch row), got {tuple(lengths.shape)}")
        if lengths.numel() and check_values():
            lo, hi = int(lengths.min()), int(lengths.max())
            if lo < 0 or hi > T:
                raise ValueError(f"lengths must lie in [0, T={T}], found values in [{lo}, {hi}]")
    check_same_device(x=x, lengths=lengths, norm_weight=norm_weight, norm_bias=norm_bias, w1=w1, b1=b1, w2=w2, b2=b2)
    args = (x, k, lengths, _NORMS[norm], norm_weight, norm_bias, w1, b1, _ACTS[activation], w2, b2, float(eps), pool)
    if use_kernel("stack_norm_project", x.device, use_reference):
        return torch.ops.eureka_fast.stack_norm_project(*args)
    return ref.stack_norm_project(*args)


def _register_stack_norm_project() -> None:
    @torch.library.register_fake("eureka_fast::stack_norm_project")
    def _(x, k, lengths, norm, norm_weight, norm_bias, w1, b1, activation, w2, b2, eps, pool):
        B, T, D = x.shape
        features = D if pool == "mean" else k * D
        if w1 is not None:
            features = w1.shape[0]
        if activation == "swiglu":
            features //= 2
        if w2 is not None:
            features = w2.shape[0]
        return x.new_empty((B, (T + k - 1) // k, features))

    def snp_setup(ctx, inputs, output):
        x, k, lengths, norm, norm_weight, norm_bias, w1, b1, activation, w2, b2, eps, pool = inputs
        ctx.save_for_backward(x, lengths, norm_weight, norm_bias, w1, b1, w2, b2)
        ctx.k, ctx.norm, ctx.activation, ctx.eps, ctx.pool = k, norm, activation, eps, pool

    torch.library.register_autograd("eureka_fast::stack_norm_project", _stack_norm_project_backward,
                                    setup_context=snp_setup)


def _stack_norm_project_backward(ctx, grad):
    """Analytic backward of stack -> norm -> Linear -> activation -> Linear (forward intermediates recomputed)."""
    x, lengths, norm_weight, norm_bias, w1, b1, w2, b2 = ctx.saved_tensors
    k, norm, act, eps, pool = ctx.k, ctx.norm, ctx.activation, ctx.eps, ctx.pool
    cd = compute_dtype(x.dtype)
    B, T, D = x.shape
    T_out = (T + k - 1) // k
    frames = torch.arange(T_out * k, device=x.device)
    limit = lengths.to(x.device).long() if lengths is not None else torch.full((B,), T, device=x.device)
    valid = frames.unsqueeze(0) < limit.unsqueeze(1)  # [B, T_out*k]
    valid_c = valid.unsqueeze(-1).to(cd)
    xf = F.pad(x.to(cd), (0, 0, 0, T_out * k - T)) * valid_c
    if pool == "stack":
        h0 = xf.reshape(B, T_out, k * D)
        n_valid = None
    else:
        n_valid = valid.view(B, T_out, k).sum(-1, keepdim=True).clamp_min(1).to(cd)
        h0 = xf.view(B, T_out, k, D).sum(2) / n_valid
    nw = None if norm_weight is None else norm_weight.to(cd)
    if norm == "layer":
        mu = h0.mean(-1, keepdim=True)
        rstd = torch.rsqrt((h0 - mu).pow(2).mean(-1, keepdim=True) + eps)
        xhat = (h0 - mu) * rstd
        n = xhat * nw if nw is not None else xhat
        if norm_bias is not None:
            n = n + norm_bias.to(cd)
    elif norm == "rms":
        rstd = torch.rsqrt(h0.pow(2).mean(-1, keepdim=True) + eps)
        xhat = h0 * rstd
        n = xhat * nw if nw is not None else xhat
    else:
        n = h0
    z1 = F.linear(n, w1.to(cd), None if b1 is None else b1.to(cd)) if w1 is not None else n
    a = gated_forward(z1, "silu") if act == "swiglu" else (
        F.silu(z1) if act == "silu" else F.gelu(z1) if act == "gelu" else z1)
    out_valid = valid.view(B, T_out, k).any(-1, keepdim=True).to(cd)
    g = grad.to(cd) * out_valid
    grads = dict.fromkeys(("x", "norm_weight", "norm_bias", "w1", "b1", "w2", "b2"))
    if w2 is not None:
        grads["w2"] = g.flatten(0, 1).t().mm(a.flatten(0, 1)).to(w2.dtype)
        grads["b2"] = None if b2 is None else g.sum((0, 1)).to(b2.dtype)
        g = g.matmul(w2.to(cd))
    g = act_backward(z1, g, act)
    if w1 is not None:
        grads["w1"] = g.flatten(0, 1).t().mm(n.flatten(0, 1)).to(w1.dtype)
        grads["b1"] = None if b1 is None else g.sum((0, 1)).to(b1.dtype)
        g = g.matmul(w1.to(cd))
    if norm in ("layer", "rms"):
        # g is dL/dn with n = xhat * weight (+ bias)
        if norm_bias is not None:
            grads["norm_bias"] = g.sum((0, 1)).to(norm_bias.dtype)
        if norm_weight is not None:
            grads["norm_weight"] = (g * xhat).sum((0, 1)).to(norm_weight.dtype)
            g = g * nw
        if norm == "layer":
            g = rstd * (g - g.mean(-1, keepdim=True) - xhat * (g * xhat).mean(-1, keepdim=True))
        else:
            g = rstd * (g - xhat * (g * xhat).mean(-1, keepdim=True))
    if pool == "stack":
        gx = g.reshape(B, T_out * k, D)
    else:
        gx = (g / n_valid).unsqueeze(2).expand(B, T_out, k, D).reshape(B, T_out * k, D)
    grads["x"] = (gx * valid_c)[:, :T].to(x.dtype)
    return (grads["x"], None, None, None, grads["norm_weight"], grads["norm_bias"], grads["w1"], grads["b1"], None,
            grads["w2"], grads["b2"], None, None)


registry.on_load(_register_stack_norm_project, ("stack_norm_project",))
