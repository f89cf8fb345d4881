"""Public op API (placeholder dispatch; the op-library work fills in validation, autograd and fake impls)."""
from __future__ import annotations

import warnings
from typing import NamedTuple, Optional, Tuple

import torch

from . import reference as ref

_EXT = None
_WARNED = False


def _load_extension():
    global _EXT, _WARNED
    if _EXT is None:
        try:
            from .. import _C  # noqa: F401  (registers torch.ops.eureka_fast.*)

            _EXT = True
        except ImportError as exc:  # pragma: no cover - depends on the build
            _EXT = False
            if not _WARNED:
                _WARNED = True
                warnings.warn(f"eureka_fast: compiled kernels not available ({exc}); using PyTorch references")
    return _EXT


def backend() -> str:
    """'compiled' when eureka_fast._C is loaded, else 'reference'."""
    return "compiled" if _load_extension() else "reference"


class MoEPlan(NamedTuple):
    counts: torch.Tensor
    offsets: torch.Tensor
    padded_offsets: torch.Tensor
    sorted_rows: torch.Tensor
    inverse_rows: torch.Tensor
    top_k: int
    num_experts: int


def route_topk(logits, k, *, scoring="softmax", renormalize=False, correction_bias=None, n_group=1, topk_group=1,
               routed_scaling=1.0, use_reference=False) -> Tuple[torch.Tensor, torch.Tensor]:
    return ref.route_topk(logits, k, scoring, renormalize, correction_bias, n_group, topk_group, routed_scaling)


def moe_plan(ids, num_experts, *, block=0, use_reference=False) -> MoEPlan:
    return MoEPlan(*ref.moe_plan(ids, num_experts, block), ids.shape[1], num_experts)


def permute(x, plan: MoEPlan, *, use_reference=False):
    return ref.permute(x, plan.sorted_rows, plan.top_k)


def combine(y_sorted, plan: MoEPlan, weights, *, use_reference=False):
    return ref.combine(y_sorted, plan.inverse_rows, weights)


def grouped_mm(a, w, offsets, *, activation=None, use_reference=False):
    return ref.grouped_mm(a, w, offsets, activation or "none")


def fused_experts(x, w_gate_up, w_down, weights, ids, *, activation="silu", use_reference=False):
    return ref.fused_experts(x, w_gate_up, w_down, weights, ids, activation)


def moe_aux_loss(router_probs, ids, *, use_reference=False):
    return ref.moe_aux_loss(router_probs, ids)


def stack_norm_project(x, k, *, lengths=None, norm="layer", norm_weight=None, norm_bias=None, w1=None, b1=None,
                       activation="silu", w2=None, b2=None, eps=1e-5, pool="stack", use_reference=False):
    return ref.stack_norm_project(x, k, lengths, norm, norm_weight, norm_bias, w1, b1, activation, w2, b2, eps, pool)
