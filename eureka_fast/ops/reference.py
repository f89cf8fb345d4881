"""Pure-PyTorch reference implementations of every eureka_fast op.

These are written for clarity, independently of the compiled kernels: the kernels are tested against them and
every op falls back to them when the extension is not built. They compute in float32 (float64 stays float64)
and return outputs in the activation dtype, as the kernels do. They take already-validated arguments; the public
API in ``eureka_fast.ops`` checks inputs before it calls either path.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------------------------------------------------
# Routing
# --------------------------------------------------------------------------------------------------------------
def _stable_topk(values: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest values per row; ties go to the lower index (a stable descending sort)."""
    return torch.sort(values, dim=-1, descending=True, stable=True).indices[..., :k]


def route_topk(
    logits: torch.Tensor,
    k: int,
    scoring: str = "softmax",
    renormalize: bool = False,
    correction_bias: Optional[torch.Tensor] = None,
    n_group: int = 1,
    topk_group: int = 1,
    routed_scaling: float = 1.0,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Scores experts and keeps the top k per token.

    softmax: probabilities over all experts, then top-k (Mixtral / Qwen3-MoE).
    sigmoid: independent sigmoid scores; ``correction_bias`` shifts only the selection, never the weights
    (DeepSeek-V3). With ``n_group > 1`` experts are split into groups, each group is scored by the sum of its top-2
    selection scores, and only the best ``topk_group`` groups may be chosen from.
    Returns (weights float32 [T, k] (float64 for float64 input), ids int32 [T, k]).
    """
    cd = _compute_dtype(logits)
    x = logits.to(cd)
    T, E = x.shape
    if scoring == "softmax":
        scores = torch.softmax(x, dim=-1)
    elif scoring == "sigmoid":
        scores = torch.sigmoid(x)
    else:
        raise ValueError(f"scoring must be 'softmax' or 'sigmoid', got {scoring!r}")
    choice = scores.detach()
    if correction_bias is not None:
        choice = choice + correction_bias.to(cd)
    if n_group > 1:
        group_size = E // n_group
        grouped = choice.view(T, n_group, group_size)
        per_group = min(2, group_size)
        group_scores = torch.sort(grouped, dim=-1, descending=True).values[..., :per_group].sum(-1)
        keep_groups = _stable_topk(group_scores, topk_group)
        group_mask = torch.zeros(T, n_group, dtype=torch.bool, device=x.device)
        group_mask.scatter_(1, keep_groups, True)
        expert_mask = group_mask.unsqueeze(-1).expand(T, n_group, group_size).reshape(T, E)
        choice = choice.masked_fill(~expert_mask, float("-inf"))
    ids = _stable_topk(choice, k)
    weights = scores.gather(1, ids)
    if renormalize:
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    weights = weights * routed_scaling
    return weights, ids.to(torch.int32)


def moe_aux_loss(router_probs: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Load-balancing loss E * sum_e P_e * f_e (Eureka-Audio Eq. 3, Switch-Transformer style).

    P_e: mean router probability of expert e over tokens; f_e: fraction of routed token-slots sent to e.
    Differentiable through ``router_probs`` only (f is a count). Zero tokens give 0.
    """
    T, E = router_probs.shape
    cd = _compute_dtype(router_probs)
    if T == 0 or ids.numel() == 0:
        return router_probs.to(cd).sum() * 0.0
    p_mean = router_probs.to(cd).mean(0)
    f = torch.bincount(ids.reshape(-1).long(), minlength=E).to(cd) / ids.numel()
    return E * (p_mean * f).sum()


# --------------------------------------------------------------------------------------------------------------
# Plan, permute, combine
# --------------------------------------------------------------------------------------------------------------
def moe_plan(ids: torch.Tensor, num_experts: int, block: int = 0):
    """Expert-major ordering of the T*k routed rows (row = token * k + slot).

    Returns int64 tensors (counts[E], offsets[E+1], padded_offsets[E+1], sorted_rows[T*k], inverse_rows[T*k]).
    sorted_rows lists rows expert by expert, in token order within an expert; inverse_rows[row] is the row's
    position in that order. padded_offsets rounds each expert's count up to a multiple of ``block`` (equal to
    offsets when block == 0).
    """
    flat = ids.reshape(-1).long()
    counts = torch.bincount(flat, minlength=num_experts)
    zero = torch.zeros(1, dtype=torch.int64, device=ids.device)
    offsets = torch.cat([zero, torch.cumsum(counts, 0)])
    if block > 0:
        padded = (counts + block - 1) // block * block
    else:
        padded = counts
    padded_offsets = torch.cat([zero, torch.cumsum(padded, 0)])
    sorted_rows = torch.sort(flat, stable=True).indices
    inverse_rows = torch.empty_like(sorted_rows)
    inverse_rows[sorted_rows] = torch.arange(flat.numel(), device=ids.device)
    return counts, offsets, padded_offsets, sorted_rows, inverse_rows


def permute(x: torch.Tensor, sorted_rows: torch.Tensor, k: int) -> torch.Tensor:
    """x_sorted[i] = x[sorted_rows[i] // k]: token rows gathered into expert-contiguous order."""
    return x.index_select(0, torch.div(sorted_rows, k, rounding_mode="floor"))


def combine(y_sorted: torch.Tensor, inverse_rows: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """out[t] = sum_j weights[t, j] * y_sorted[inverse_rows[t*k + j]], summed in slot order in float32."""
    T, k = weights.shape
    cd = _compute_dtype(y_sorted)
    rows = y_sorted.index_select(0, inverse_rows).to(cd).view(T, k, y_sorted.shape[1])
    w = weights.to(cd)
    out = torch.zeros(T, y_sorted.shape[1], dtype=cd, device=y_sorted.device)
    for j in range(k):
        out = out + w[:, j : j + 1] * rows[:, j]
    return out.to(y_sorted.dtype)


# --------------------------------------------------------------------------------------------------------------
# Grouped GEMM and the whole expert layer
# --------------------------------------------------------------------------------------------------------------
def _gated(h: torch.Tensor, activation: str) -> torch.Tensor:
    if activation in ("none", None):
        return h
    half = h.shape[-1] // 2
    gate, up = h[..., :half], h[..., half:]
    if activation == "silu_mul":
        return F.silu(gate) * up
    if activation == "gelu_mul":
        return F.gelu(gate) * up
    raise ValueError(f"unknown activation {activation!r}")


def grouped_mm(a: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, activation: str = "none") -> torch.Tensor:
    """Rows offsets[e]:offsets[e+1] of ``a`` [S, K] times w[e]^T ([N, K] -> [rows, N]), optional gated activation
    (first half of N is the gate). Rows past offsets[-1] are zero."""
    cd = _compute_dtype(a)
    S = a.shape[0]
    E, N, _ = w.shape
    n_out = N if activation in ("none", None) else N // 2
    out = torch.zeros(S, n_out, dtype=cd, device=a.device)
    bounds = offsets.tolist()
    for e in range(E):
        lo, hi = bounds[e], bounds[e + 1]
        if hi > lo:
            out[lo:hi] = _gated(a[lo:hi].to(cd) @ w[e].to(cd).t(), activation)
    return out.to(a.dtype)


def fused_experts(
    x: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    weights: torch.Tensor,
    ids: torch.Tensor,
    activation: str = "silu",
) -> torch.Tensor:
    """The whole routed-expert layer, as a per-expert loop over the tokens that chose it (the "eager loop").

    out[t] = sum_j weights[t, j] * down[e](act(gate[e] x_t) * up[e] x_t), e = ids[t, j];
    w_gate_up [E, 2I, H] (gate rows first), w_down [E, H, I] (transformers 5 layout).
    """
    cd = _compute_dtype(x)
    gated = {"silu": "silu_mul", "gelu": "gelu_mul"}[activation]
    xf = x.to(cd)
    out = torch.zeros(x.shape[0], x.shape[1], dtype=cd, device=x.device)
    ids_l = ids.long()
    for e in range(w_gate_up.shape[0]):
        tok, slot = torch.nonzero(ids_l == e, as_tuple=True)
        if tok.numel() == 0:
            continue
        h = _gated(xf[tok] @ w_gate_up[e].to(cd).t(), gated)
        y = h @ w_down[e].to(cd).t()
        out.index_add_(0, tok, y * weights[tok, slot].to(cd).unsqueeze(-1))
    return out.to(x.dtype)


def fused_experts_dense(
    x: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    weights: torch.Tensor,
    ids: torch.Tensor,
    activation: str = "silu",
) -> torch.Tensor:
    """A second, structurally different reference: every expert on every token, then a routing mask."""
    cd = _compute_dtype(x)
    gated = {"silu": "silu_mul", "gelu": "gelu_mul"}[activation]
    E = w_gate_up.shape[0]
    xf = x.to(cd)
    h = _gated(torch.einsum("th,enh->etn", xf, w_gate_up.to(cd)), gated)  # [E, T, I]
    y = torch.einsum("eti,ehi->eth", h, w_down.to(cd))  # [E, T, H]
    dense_w = torch.zeros(x.shape[0], E, dtype=cd, device=x.device)
    dense_w.scatter_add_(1, ids.long(), weights.to(cd))
    return torch.einsum("te,eth->th", dense_w, y).to(x.dtype)


# --------------------------------------------------------------------------------------------------------------
# Audio downsampling: stack k frames -> norm -> project -> activate -> project
# --------------------------------------------------------------------------------------------------------------
def stack_norm_project(
    x: torch.Tensor,
    k: int,
    lengths: Optional[torch.Tensor] = None,
    norm: Optional[str] = "layer",
    norm_weight: Optional[torch.Tensor] = None,
    norm_bias: Optional[torch.Tensor] = None,
    w1: Optional[torch.Tensor] = None,
    b1: Optional[torch.Tensor] = None,
    activation: Optional[str] = "silu",
    w2: Optional[torch.Tensor] = None,
    b2: Optional[torch.Tensor] = None,
    eps: float = 1e-5,
    pool: str = "stack",
) -> torch.Tensor:
    """Downsamples [B, T, D] frames by k.

    pool="stack": frame t*k+j goes to channels j*D..(j+1)*D (time-major), giving [B, ceil(T/k), k*D];
    pool="mean": the mean of the k frames (of the valid ones, for a ragged last group), giving [B, ceil(T/k), D].
    Frames at or past ``lengths[b]`` count as zeros, and output rows at or past ceil(lengths[b] / k) are zero.
    Then optional norm ("layer" | "rms"), Linear w1/b1, activation ("silu" | "gelu" | "swiglu" (first half gates)
    | None), optional Linear w2/b2.
    """
    cd = _compute_dtype(x)
    B, T, D = x.shape
    T_out = (T + k - 1) // k
    xf = x.to(cd)
    if T_out * k != T:
        xf = F.pad(xf, (0, 0, 0, T_out * k - T))
    valid = torch.ones(B, T_out * k, dtype=torch.bool, device=x.device)
    if lengths is not None:
        valid = torch.arange(T_out * k, device=x.device).unsqueeze(0) < lengths.to(x.device).long().unsqueeze(1)
    else:
        valid[:, T:] = False
    xf = xf * valid.unsqueeze(-1).to(cd)
    if pool == "stack":
        h = xf.reshape(B, T_out, k * D)
    elif pool == "mean":
        n_valid = valid.view(B, T_out, k).sum(-1, keepdim=True).clamp_min(1).to(cd)
        h = xf.view(B, T_out, k, D).sum(2) / n_valid
    else:
        raise ValueError(f"pool must be 'stack' or 'mean', got {pool!r}")
    if norm == "layer":
        h = F.layer_norm(h, (h.shape[-1],), None if norm_weight is None else norm_weight.to(cd),
                         None if norm_bias is None else norm_bias.to(cd), eps)
    elif norm == "rms":
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
        if norm_weight is not None:
            h = h * norm_weight.to(cd)
    elif norm not in (None, "none"):
        raise ValueError(f"norm must be 'layer', 'rms' or None, got {norm!r}")
    if w1 is not None:
        h = F.linear(h, w1.to(cd), None if b1 is None else b1.to(cd))
    if activation == "silu":
        h = F.silu(h)
    elif activation == "gelu":
        h = F.gelu(h)
    elif activation == "swiglu":
        half = h.shape[-1] // 2
        h = F.silu(h[..., :half]) * h[..., half:]
    elif activation not in (None, "none"):
        raise ValueError(f"unknown activation {activation!r}")
    if w2 is not None:
        h = F.linear(h, w2.to(cd), None if b2 is None else b2.to(cd))
    out_valid = valid.view(B, T_out, k).any(-1)
    h = h * out_valid.unsqueeze(-1).to(cd)
    return h.to(x.dtype)


def conv1d_downsample(x: torch.Tensor, k: int, w1: torch.Tensor, b1: Optional[torch.Tensor]) -> torch.Tensor:
    """"stack k + Linear" written as a conv1d with kernel = stride = k (an independent check of the stacking order).

    w1 is [out, k*D] in stack layout; conv weight [out, D, k] has w_conv[o, d, j] = w1[o, j*D + d].
    """
    B, T, D = x.shape
    T_out = math.ceil(T / k)
    xp = F.pad(x, (0, 0, 0, T_out * k - T)).transpose(1, 2)  # [B, D, T]
    w_conv = w1.view(w1.shape[0], k, D).permute(0, 2, 1)
    return F.conv1d(xp, w_conv, b1, stride=k).transpose(1, 2)
