"""The Mixture-of-Experts ops: routing (route_topk, moe_aux_loss), the expert-major plan (moe_plan, permute,
combine), the grouped GEMM and the whole routed-expert layer (fused_experts).

Each op validates its arguments, then runs its compiled kernel (``torch.ops.eureka_fast.*``) where
``registry.use_kernel`` says so and its reference in ``eureka_fast.ops.reference`` otherwise. Each op's fake
implementation and autograd formula follow it, registered once the extension loads: backward passes are written with
the library's own ops (``combine_backward``, ``grouped_mm_backward``, ...) plus plain torch ops, so a backend only has
to provide the forward and backward kernels named in csrc/registration.cpp.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Tuple

import torch

from . import reference as ref
from . import registry
from .activations import compute_dtype, gated_backward, gated_forward
from .checks import check_int, check_same_device, check_tensor, check_values
from .registry import use_kernel

__all__ = ["MoEPlan", "route_topk", "moe_aux_loss", "moe_plan", "permute", "combine", "grouped_mm", "fused_experts"]


class MoEPlan(NamedTuple):
    """Expert-major order of the T*k routed rows (row = token * top_k + slot); all tensors int64."""

    counts: torch.Tensor  # [E] rows per expert
    offsets: torch.Tensor  # [E+1] start of each expert's rows in sorted order
    padded_offsets: torch.Tensor  # [E+1] the same with each count rounded up to a multiple of `block`
    sorted_rows: torch.Tensor  # [T*k] rows in expert order, token order within an expert
    inverse_rows: torch.Tensor  # [T*k] position of each row in sorted order
    top_k: int
    num_experts: int


def _check_top_k(k, num_experts, name: str, what: str) -> None:
    """k (the columns of ``name``) must lie in [1, num_experts]; T = 0 rows is fine."""
    if k < 1 or k > num_experts:
        raise ValueError(f"{name} must have between 1 and {num_experts} columns (top-k k in [1, {what}]), "
                         f"got k = {k}")


def _check_ids(ids: torch.Tensor, num_experts: int, name: str = "ids") -> None:
    if check_values() and ids.numel():
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= num_experts:
            raise ValueError(f"{name} must lie in [0, {num_experts}), found values in [{lo}, {hi}]")


def _check_plan(plan) -> None:
    if not isinstance(plan, MoEPlan):
        raise TypeError(f"plan must be the MoEPlan returned by moe_plan, got {type(plan).__name__}")


# --------------------------------------------------------------------------------------------------------------
# Routing
# --------------------------------------------------------------------------------------------------------------
def route_topk(logits, k, *, scoring="softmax", renormalize=False, correction_bias=None, n_group=1, topk_group=1,
               routed_scaling=1.0, use_reference=False) -> Tuple[torch.Tensor, torch.Tensor]:
    """Scores experts (softmax over all experts, or sigmoid with a selection-only ``correction_bias`` and DeepSeek
    grouped top-k) and keeps the k best per token, ties to the lower expert id.

    Returns (weights float32 [T, k] (float64 for float64 logits), ids int32 [T, k]); differentiable in weights.
    """
    check_tensor(logits, "logits", dim=2, floating=True)
    T, E = logits.shape
    if E < 1:
        raise ValueError(f"logits must have at least one expert column, got shape {tuple(logits.shape)}")
    check_int(k, "k", 1, E)
    if scoring not in ("softmax", "sigmoid"):
        raise ValueError(f"scoring must be 'softmax' or 'sigmoid', got {scoring!r}")
    check_int(n_group, "n_group", 1)
    if E % n_group:
        raise ValueError(f"n_group={n_group} must divide the number of experts {E}")
    check_int(topk_group, "topk_group", 1, n_group)
    if n_group > 1 and k > topk_group * (E // n_group):
        raise ValueError(f"k={k} exceeds the {topk_group * (E // n_group)} experts in the topk_group={topk_group} kept groups")
    if not isinstance(renormalize, bool):
        raise TypeError(f"renormalize must be a bool, got {type(renormalize).__name__} {renormalize!r}")
    if isinstance(routed_scaling, bool) or not isinstance(routed_scaling, (int, float)):
        raise ValueError(f"routed_scaling must be a finite number, got {type(routed_scaling).__name__} "
                         f"{routed_scaling!r}")
    # math.isfinite on a float that torch.compile traces symbolically (dynamic=True) breaks the graph: eager only
    # (the kernel checks it too).
    if check_values() and not math.isfinite(routed_scaling):
        raise ValueError(f"routed_scaling must be a finite number, got {routed_scaling!r}")
    if correction_bias is not None:
        check_tensor(correction_bias, "correction_bias", dim=1, floating=True)
        if correction_bias.shape[0] != E:
            raise ValueError(f"correction_bias must have shape [{E}], got {tuple(correction_bias.shape)}")
    check_same_device(logits=logits, correction_bias=correction_bias)
    if check_values():
        if logits.numel() and not bool(torch.isfinite(logits).all()):
            raise ValueError("logits contain NaN or infinite values")
        if correction_bias is not None and not bool(torch.isfinite(correction_bias).all()):
            raise ValueError("correction_bias contains NaN or infinite values")
    if use_kernel("route_topk", logits.device, use_reference):
        return torch.ops.eureka_fast.route_topk(logits, k, scoring, renormalize, correction_bias, n_group,
                                                topk_group, float(routed_scaling))
    return ref.route_topk(logits, k, scoring, renormalize, correction_bias, n_group, topk_group, routed_scaling)


def _register_route_topk() -> None:
    @torch.library.register_fake("eureka_fast::route_topk")
    def _(logits, k, scoring, renormalize, correction_bias, n_group, topk_group, routed_scaling):
        T = logits.shape[0]
        return (logits.new_empty((T, k), dtype=compute_dtype(logits.dtype)),
                logits.new_empty((T, k), dtype=torch.int32))

    def route_setup(ctx, inputs, output):
        logits, k, scoring, renormalize, correction_bias, n_group, topk_group, routed_scaling = inputs
        weights, ids = output
        ctx.save_for_backward(logits, ids)
        ctx.scoring, ctx.renormalize, ctx.routed_scaling = scoring, renormalize, routed_scaling

    def route_backward(ctx, grad_weights, grad_ids):
        logits, ids = ctx.saved_tensors
        cd = compute_dtype(logits.dtype)
        x = logits.to(cd)
        scores = torch.softmax(x, -1) if ctx.scoring == "softmax" else torch.sigmoid(x)
        idx = ids.long()
        g = grad_weights.to(cd) * ctx.routed_scaling
        if ctx.renormalize:
            picked = scores.gather(1, idx)
            total = picked.sum(-1, keepdim=True) + 1e-20
            g = g / total - (g * picked).sum(-1, keepdim=True) / (total * total)
        grad_scores = torch.zeros_like(scores).scatter_add_(1, idx, g)
        if ctx.scoring == "softmax":
            grad_logits = scores * (grad_scores - (grad_scores * scores).sum(-1, keepdim=True))
        else:
            grad_logits = grad_scores * scores * (1 - scores)
        return grad_logits.to(logits.dtype), None, None, None, None, None, None, None

    torch.library.register_autograd("eureka_fast::route_topk", route_backward, setup_context=route_setup)


registry.on_load(_register_route_topk, ("route_topk",))


def moe_aux_loss(router_probs, ids, *, use_reference=False) -> torch.Tensor:
    """Load-balancing loss E * sum_e P_e * f_e: P_e the mean router probability of expert e, f_e the fraction of
    routed rows sent to e. Differentiable through ``router_probs``."""
    check_tensor(router_probs, "router_probs", dim=2, floating=True)
    check_tensor(ids, "ids", dim=2, integer=True)
    if ids.shape[0] != router_probs.shape[0]:
        raise ValueError(f"ids must have {router_probs.shape[0]} rows (one per token), got shape {tuple(ids.shape)}")
    _check_top_k(ids.shape[1], router_probs.shape[1], "ids", "E = router_probs.shape[1]")
    check_same_device(router_probs=router_probs, ids=ids)
    _check_ids(ids, router_probs.shape[1])
    if use_kernel("moe_aux_loss", router_probs.device, use_reference):
        return torch.ops.eureka_fast.moe_aux_loss(router_probs, ids)
    return ref.moe_aux_loss(router_probs, ids)


def _register_moe_aux_loss() -> None:
    @torch.library.register_fake("eureka_fast::moe_aux_loss")
    def _(router_probs, ids):
        return router_probs.new_empty((), dtype=compute_dtype(router_probs.dtype))

    def aux_setup(ctx, inputs, output):
        router_probs, ids = inputs
        ctx.save_for_backward(ids)
        ctx.shape, ctx.dtype = router_probs.shape, router_probs.dtype

    def aux_backward(ctx, grad):
        (ids,) = ctx.saved_tensors
        T, E = ctx.shape
        cd = compute_dtype(ctx.dtype)
        if T == 0 or ids.numel() == 0:
            return grad.new_zeros(ctx.shape, dtype=ctx.dtype), None
        flat = ids.reshape(-1).long()
        counts = torch.zeros(E, dtype=cd, device=ids.device).index_add_(0, flat, torch.ones_like(flat, dtype=cd))
        per_expert = grad.to(cd) * E * counts / (flat.numel() * T)
        return per_expert.expand(T, E).to(ctx.dtype).contiguous(), None

    torch.library.register_autograd("eureka_fast::moe_aux_loss", aux_backward, setup_context=aux_setup)


registry.on_load(_register_moe_aux_loss, ("moe_aux_loss",))


# --------------------------------------------------------------------------------------------------------------
# Plan, permute, combine
# --------------------------------------------------------------------------------------------------------------
def moe_plan(ids, num_experts, *, block=0, use_reference=False) -> MoEPlan:
    """Expert-major ordering of the routed rows of ``ids`` [T, k] (stable in token order)."""
    check_tensor(ids, "ids", dim=2, integer=True)
    check_int(num_experts, "num_experts", 1)
    check_int(block, "block", 0)
    _check_top_k(ids.shape[1], num_experts, "ids", "num_experts")
    _check_ids(ids, num_experts)
    if use_kernel("moe_plan", ids.device, use_reference):
        parts = torch.ops.eureka_fast.moe_plan(ids, num_experts, block)
    else:
        parts = ref.moe_plan(ids, num_experts, block)
    return MoEPlan(*parts, ids.shape[1], num_experts)


def _register_moe_plan() -> None:
    @torch.library.register_fake("eureka_fast::moe_plan")
    def _(ids, num_experts, block):
        rows = ids.shape[0] * ids.shape[1]
        new = lambda n: ids.new_empty((n,), dtype=torch.int64)  # noqa: E731
        return new(num_experts), new(num_experts + 1), new(num_experts + 1), new(rows), new(rows)


registry.on_load(_register_moe_plan, ("moe_plan",))


def permute(x, plan: MoEPlan, *, use_reference=False) -> torch.Tensor:
    """x_sorted[i] = x[plan.sorted_rows[i] // k]: token rows in expert-contiguous order, [T*k, H]."""
    check_tensor(x, "x", dim=2)
    _check_plan(plan)
    if plan.sorted_rows.numel() != x.shape[0] * plan.top_k:
        raise ValueError(f"x has {x.shape[0]} tokens but the plan routes {plan.sorted_rows.numel()} rows "
                         f"(expected tokens * top_k = {x.shape[0] * plan.top_k})")
    check_same_device(x=x, sorted_rows=plan.sorted_rows)
    if use_kernel("permute", x.device, use_reference):
        return torch.ops.eureka_fast.permute(x, plan.sorted_rows, plan.top_k)
    return ref.permute(x, plan.sorted_rows, plan.top_k)


def _register_permute() -> None:
    ops = torch.ops.eureka_fast

    @torch.library.register_fake("eureka_fast::permute")
    def _(x, sorted_rows, top_k):
        return x.new_empty((sorted_rows.shape[0], x.shape[1]))

    def permute_setup(ctx, inputs, output):
        x, sorted_rows, top_k = inputs
        ctx.save_for_backward(sorted_rows)
        ctx.top_k, ctx.tokens = top_k, x.shape[0]

    def permute_backward(ctx, grad):
        (sorted_rows,) = ctx.saved_tensors
        inverse = torch.empty_like(sorted_rows).scatter_(
            0, sorted_rows, torch.arange(sorted_rows.numel(), device=sorted_rows.device))
        ones = torch.ones(ctx.tokens, ctx.top_k, dtype=compute_dtype(grad.dtype), device=grad.device)
        return ops.combine(grad, inverse, ones), None, None

    torch.library.register_autograd("eureka_fast::permute", permute_backward, setup_context=permute_setup)


registry.on_load(_register_permute, ("permute",))


def combine(y_sorted, plan: MoEPlan, weights, *, use_reference=False) -> torch.Tensor:
    """out[t] = sum_j weights[t, j] * y_sorted[row of (t, j)], summed in slot order (deterministic), [T, H]."""
    check_tensor(y_sorted, "y_sorted", dim=2, floating=True)
    check_tensor(weights, "weights", dim=2, floating=True)
    _check_plan(plan)
    T, k = weights.shape
    if k < 1:
        raise ValueError(f"weights must have shape [T, k] with k >= 1 (one column per routed slot), "
                         f"got {tuple(weights.shape)}")
    if k != plan.top_k or plan.inverse_rows.numel() != T * k:
        raise ValueError(f"weights must have shape [T, {plan.top_k}] matching the plan's {plan.inverse_rows.numel()} "
                         f"rows, got {tuple(weights.shape)}")
    if y_sorted.shape[0] < T * k:
        raise ValueError(f"y_sorted must have at least T*k = {T * k} rows, got {y_sorted.shape[0]}")
    check_same_device(y_sorted=y_sorted, weights=weights, inverse_rows=plan.inverse_rows)
    if use_kernel("combine", y_sorted.device, use_reference):
        return torch.ops.eureka_fast.combine(y_sorted, plan.inverse_rows, weights)
    return ref.combine(y_sorted, plan.inverse_rows, weights)


def _register_combine() -> None:
    ops = torch.ops.eureka_fast

    @torch.library.register_fake("eureka_fast::combine")
    def _(y_sorted, inverse_rows, weights):
        return y_sorted.new_empty((weights.shape[0], y_sorted.shape[1]))

    @torch.library.register_fake("eureka_fast::combine_backward")
    def _(grad_out, y_sorted, inverse_rows, weights):
        return (torch.empty_like(y_sorted, memory_format=torch.contiguous_format),
                torch.empty_like(weights, memory_format=torch.contiguous_format))

    def combine_setup(ctx, inputs, output):
        y_sorted, inverse_rows, weights = inputs
        ctx.save_for_backward(y_sorted, inverse_rows, weights)

    def combine_backward(ctx, grad):
        y_sorted, inverse_rows, weights = ctx.saved_tensors
        grad_y, grad_w = ops.combine_backward(grad, y_sorted, inverse_rows, weights)
        return grad_y, None, grad_w

    torch.library.register_autograd("eureka_fast::combine", combine_backward, setup_context=combine_setup)


registry.on_load(_register_combine, ("combine", "combine_backward"))


# --------------------------------------------------------------------------------------------------------------
# Grouped GEMM and the expert layer
# --------------------------------------------------------------------------------------------------------------
_GATED = {None: "none", "none": "none", "silu_mul": "silu_mul", "gelu_mul": "gelu_mul"}


def _check_offsets(offsets, num_experts: int, rows: int) -> None:
    check_tensor(offsets, "offsets", dim=1, integer=True)
    if offsets.shape[0] != num_experts + 1:
        raise ValueError(f"offsets must have shape [{num_experts + 1}] (num_experts + 1), got {tuple(offsets.shape)}")
    if check_values():
        o = offsets.long()
        if int(o[0]) < 0 or bool((o[1:] < o[:-1]).any()) or int(o[-1]) > rows:
            raise ValueError(f"offsets must be non-decreasing from >= 0 to <= {rows} (the rows of a), got {o.tolist()}")


def grouped_mm(a, w, offsets, *, activation=None, use_reference=False) -> torch.Tensor:
    """Row block e of ``a`` [S, K] (rows offsets[e]:offsets[e+1]) times w[e]^T (w [E, N, K], any strides), with the
    gated activation fused ("silu_mul" | "gelu_mul": first half of N is the gate). Returns [S, N or N/2];
    rows outside the offsets are zero."""
    check_tensor(a, "a", dim=2, floating=True)
    check_tensor(w, "w", dim=3, floating=True)
    if activation not in _GATED:
        raise ValueError(f"activation must be None, 'silu_mul' or 'gelu_mul', got {activation!r}")
    act = _GATED[activation]
    if w.shape[2] != a.shape[1]:
        raise ValueError(f"w must have shape [E, N, K={a.shape[1]}] (K = a.shape[1]), got {tuple(w.shape)}")
    if act != "none" and w.shape[1] % 2:
        raise ValueError(f"activation={activation!r} needs an even N (gate and up halves), got w {tuple(w.shape)}")
    _check_offsets(offsets, w.shape[0], a.shape[0])
    check_same_device(a=a, w=w, offsets=offsets)
    if use_kernel("grouped_mm", a.device, use_reference):
        return torch.ops.eureka_fast.grouped_mm(a, w, offsets, act)
    return ref.grouped_mm(a, w, offsets, act)


def _register_grouped_mm() -> None:
    ops = torch.ops.eureka_fast

    @torch.library.register_fake("eureka_fast::grouped_mm")
    def _(a, w, offsets, activation):
        n = w.shape[1] if activation == "none" else w.shape[1] // 2
        return a.new_empty((a.shape[0], n))

    @torch.library.register_fake("eureka_fast::grouped_mm_backward")
    def _(grad_out, a, w, offsets, activation):
        return a.new_empty(a.shape), w.new_empty(w.shape)

    def gmm_setup(ctx, inputs, output):
        a, w, offsets, activation = inputs
        ctx.save_for_backward(a, w, offsets)
        ctx.activation = activation

    def gmm_backward(ctx, grad):
        a, w, offsets = ctx.saved_tensors
        grad_a, grad_w = ops.grouped_mm_backward(grad, a, w, offsets, ctx.activation)
        return grad_a, grad_w, None, None

    torch.library.register_autograd("eureka_fast::grouped_mm", gmm_backward, setup_context=gmm_setup)


registry.on_load(_register_grouped_mm, ("grouped_mm", "grouped_mm_backward"))


def _check_expert_layer(x, w_gate_up, w_down, weights, ids) -> None:
    check_tensor(x, "x", dim=2, floating=True)
    check_tensor(w_gate_up, "w_gate_up", dim=3, floating=True)
    check_tensor(w_down, "w_down", dim=3, floating=True)
    check_tensor(weights, "weights", dim=2, floating=True)
    check_tensor(ids, "ids", dim=2, integer=True)
    T, H = x.shape
    E, two_i, h_in = w_gate_up.shape
    if h_in != H or two_i % 2:
        raise ValueError(f"w_gate_up must have shape [E, 2I, H={H}], got {tuple(w_gate_up.shape)}")
    if tuple(w_down.shape) != (E, H, two_i // 2):
        raise ValueError(f"w_down must have shape [{E}, {H}, {two_i // 2}] (E, H, I), got {tuple(w_down.shape)}")
    if weights.shape[0] != T:
        raise ValueError(f"weights must have {T} rows (one per token of x), got shape {tuple(weights.shape)}")
    if tuple(ids.shape) != tuple(weights.shape):
        raise ValueError(f"ids must have the shape of weights {tuple(weights.shape)}, got {tuple(ids.shape)}")
    _check_top_k(weights.shape[1], E, "weights and ids", "E = w_gate_up.shape[0]")
    check_same_device(x=x, w_gate_up=w_gate_up, w_down=w_down, weights=weights, ids=ids)
    _check_ids(ids, E)


def fused_experts(x, w_gate_up, w_down, weights, ids, *, activation="silu", use_reference=False) -> torch.Tensor:
    """The routed-expert layer in one call: out[t] = sum_j weights[t,j] * down[e](act(gate[e] x_t) * up[e] x_t),
    e = ids[t,j], with transformers 5 layouts w_gate_up [E, 2I, H] (gate rows first) and w_down [E, H, I].
    Differentiable in x, weights, w_gate_up and w_down."""
    _check_expert_layer(x, w_gate_up, w_down, weights, ids)
    if activation not in ("silu", "gelu"):
        raise ValueError(f"activation must be 'silu' or 'gelu', got {activation!r}")
    if use_kernel("fused_experts", x.device, use_reference):
        return torch.ops.eureka_fast.fused_experts(x, w_gate_up, w_down, weights, ids, activation)
    return ref.fused_experts(x, w_gate_up, w_down, weights, ids, activation)


def _register_fused_experts() -> None:
    ops = torch.ops.eureka_fast

    @torch.library.register_fake("eureka_fast::fused_experts")
    def _(x, w_gate_up, w_down, weights, ids, activation):
        return x.new_empty(x.shape)

    def experts_setup(ctx, inputs, output):
        x, w_gate_up, w_down, weights, ids, activation = inputs
        ctx.save_for_backward(x, w_gate_up, w_down, weights, ids)
        ctx.activation = activation

    def experts_backward(ctx, grad):
        # Recompute the intermediates with the library's own ops instead of keeping [T*k, 2I] alive from forward.
        x, w_gate_up, w_down, weights, ids = ctx.saved_tensors
        E, k = w_gate_up.shape[0], ids.shape[1]
        _, offsets, _, sorted_rows, inverse_rows = ops.moe_plan(ids, E, 0)
        x_sorted = ops.permute(x, sorted_rows, k)
        h = ops.grouped_mm(x_sorted, w_gate_up, offsets, "none")
        hidden = gated_forward(h, ctx.activation)
        y_sorted = ops.grouped_mm(hidden, w_down, offsets, "none")
        grad_y, grad_weights = ops.combine_backward(grad, y_sorted, inverse_rows, weights)
        grad_hidden, grad_w_down = ops.grouped_mm_backward(grad_y, hidden, w_down, offsets, "none")
        grad_h = gated_backward(h.to(compute_dtype(h.dtype)), grad_hidden.to(compute_dtype(h.dtype)),
                                ctx.activation).to(h.dtype)
        grad_x_sorted, grad_w_gate_up = ops.grouped_mm_backward(grad_h, x_sorted, w_gate_up, offsets, "none")
        ones = torch.ones(x.shape[0], k, dtype=compute_dtype(x.dtype), device=x.device)
        grad_x = ops.combine(grad_x_sorted, inverse_rows, ones)
        return grad_x, grad_w_gate_up, grad_w_down, grad_weights, None, None

    torch.library.register_autograd("eureka_fast::fused_experts", experts_backward, setup_context=experts_setup)


registry.on_load(_register_fused_experts, ("fused_experts",))
