"""Public op API: argument validation, dispatch to the compiled kernels (``torch.ops.eureka_fast.*``) or to the
pure-PyTorch references, autograd formulas and fake (meta) implementations.

The compiled kernels are used when ``eureka_fast._C`` is importable and registers a kernel for the inputs' device;
otherwise the op runs its reference in ``eureka_fast.ops.reference`` (a one-time warning says so when the extension
is missing). ``use_reference=True`` forces the reference path.

Autograd formulas and fake implementations are registered here, once, for every backend: backward passes are
written with the library's own ops (``combine_backward``, ``grouped_mm_backward``, ...) plus plain torch ops, so a
backend only has to provide the forward and backward kernels named in csrc/registration.cpp.
"""
from __future__ import annotations

import math
import warnings
from typing import NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F

from . import cuda_policy
from . import reference as ref

_EXT: Optional[bool] = None
_WARNED = False
_KERNEL_CACHE: dict = {}


def _load_extension() -> bool:
    global _EXT, _WARNED
    if _EXT is None:
        try:
            from .. import _C  # noqa: F401  (registers torch.ops.eureka_fast.*)

            _EXT = True
            _register_python_parts()
            _fill_kernel_cache()
            cuda_policy.sync_extension()  # the CUDA GEMM regimes the policy allows
        except ImportError as exc:  # depends on the build
            _EXT = False
            if not _WARNED:
                _WARNED = True
                warnings.warn(
                    f"eureka_fast: compiled kernels not available ({exc}); every op runs its pure-PyTorch reference",
                    RuntimeWarning,
                    stacklevel=3,
                )
    return _EXT


def backend() -> str:
    """'compiled' when eureka_fast._C is loaded, else 'reference'. Per op and device (CUDA kernels run only where
    the validation policy allows them): ``backend_report(device)``."""
    return "compiled" if _load_extension() else "reference"


def _has_kernel(op_name: str, device: torch.device) -> bool:
    key = (op_name, device.type)
    if key not in _KERNEL_CACHE:
        dispatch_key = {"cpu": "CPU", "cuda": "CUDA", "meta": "Meta"}.get(device.type)
        _KERNEL_CACHE[key] = dispatch_key is not None and (
            dispatch_key == "Meta"
            or torch._C._dispatch_has_kernel_for_dispatch_key(f"eureka_fast::{op_name}", dispatch_key)
        )
    return _KERNEL_CACHE[key]


_KERNEL_OPS = ("route_topk", "moe_aux_loss", "moe_plan", "permute", "combine", "grouped_mm", "fused_experts",
               "stack_norm_project")


def _fill_kernel_cache() -> None:
    # Resolved once at load time: a dispatcher query inside a torch.compile trace returns a plain bool and would
    # break the graph the first time an op runs in a process.
    for op_name in _KERNEL_OPS:
        for device_type in ("cpu", "cuda", "meta"):
            _has_kernel(op_name, torch.device(device_type))


def _use_kernel(op_name: str, device: torch.device, use_reference: bool) -> bool:
    if use_reference or not _load_extension() or not _has_kernel(op_name, device):
        return False
    # CUDA kernels run only where the validation policy allows them (eureka_fast/ops/cuda_policy.py)
    return device.type != "cuda" or cuda_policy.kernel_allowed(op_name)


class MoEPlan(NamedTuple):
    """Expert-major order of the T*k routed rows (row = token * top_k + slot); all tensors int64."""

    counts: torch.Tensor  # [E] rows per expert
    offsets: torch.Tensor  # [E+1] start of each expert's rows in sorted order
    padded_offsets: torch.Tensor  # [E+1] the same with each count rounded up to a multiple of `block`
    sorted_rows: torch.Tensor  # [T*k] rows in expert order, token order within an expert
    inverse_rows: torch.Tensor  # [T*k] position of each row in sorted order
    top_k: int
    num_experts: int


# --------------------------------------------------------------------------------------------------------------
# Validation: every message names the argument and the problem.
# --------------------------------------------------------------------------------------------------------------
def _tensor(t, name: str, *, dim: Optional[int] = None, floating: bool = False, integer: bool = False):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dim is not None and t.dim() != dim:
        raise ValueError(f"{name} must have {dim} dimensions, got shape {tuple(t.shape)}")
    if floating and not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if integer and (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool):
        raise TypeError(f"{name} must be an integer tensor, got {t.dtype}")
    return t


def _same_device(**tensors) -> torch.device:
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


def _int(value, name: str, lo: Optional[int] = None, hi: Optional[int] = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if lo is not None and value < lo:
        raise ValueError(f"{name} must be >= {lo}, got {value}")
    if hi is not None and value > hi:
        raise ValueError(f"{name} must be <= {hi}, got {value}")
    return value


def _check_values() -> bool:
    """Data-dependent checks (value ranges, finiteness of tensors and of float arguments) run in eager mode; a
    torch.compile trace skips them, since they need a tensor's values on the host (or a bool from a symbolic
    float) and would break the graph. The compiled kernels repeat every one of them (index ranges, k, finite logits,
    correction_bias and routed_scaling), so a compiled graph still raises on bad values, from the kernel."""
    return not torch.compiler.is_compiling()


def _check_top_k(k, num_experts, name: str, what: str) -> None:
    """k (the columns of ``name``) must lie in [1, num_experts]; T = 0 rows is fine."""
    if k < 1 or k > num_experts:
        raise ValueError(f"{name} must have between 1 and {num_experts} columns (top-k k in [1, {what}]), "
                         f"got k = {k}")


def _check_ids(ids: torch.Tensor, num_experts: int, name: str = "ids") -> None:
    if _check_values() and ids.numel():
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
    _tensor(logits, "logits", dim=2, floating=True)
    T, E = logits.shape
    if E < 1:
        raise ValueError(f"logits must have at least one expert column, got shape {tuple(logits.shape)}")
    _int(k, "k", 1, E)
    if scoring not in ("softmax", "sigmoid"):
        raise ValueError(f"scoring must be 'softmax' or 'sigmoid', got {scoring!r}")
    _int(n_group, "n_group", 1)
    if E % n_group:
        raise ValueError(f"n_group={n_group} must divide the number of experts {E}")
    _int(topk_group, "topk_group", 1, n_group)
    if n_group > 1 and k > topk_group * (E // n_group):
        raise ValueError(f"k={k} exceeds the {topk_group * (E // n_group)} experts in the topk_group={topk_group} kept groups")
    if not isinstance(renormalize, bool):
        raise TypeError(f"renormalize must be a bool, got {type(renormalize).__name__} {renormalize!r}")
    if isinstance(routed_scaling, bool) or not isinstance(routed_scaling, (int, float)):
        raise ValueError(f"routed_scaling must be a finite number, got {type(routed_scaling).__name__} "
                         f"{routed_scaling!r}")
    # math.isfinite on a float that torch.compile traces symbolically (dynamic=True) breaks the graph: eager only
    # (the kernel checks it too).
    if _check_values() and not math.isfinite(routed_scaling):
        raise ValueError(f"routed_scaling must be a finite number, got {routed_scaling!r}")
    if correction_bias is not None:
        _tensor(correction_bias, "correction_bias", dim=1, floating=True)
        if correction_bias.shape[0] != E:
            raise ValueError(f"correction_bias must have shape [{E}], got {tuple(correction_bias.shape)}")
    _same_device(logits=logits, correction_bias=correction_bias)
    if _check_values():
        if logits.numel() and not bool(torch.isfinite(logits).all()):
            raise ValueError("logits contain NaN or infinite values")
        if correction_bias is not None and not bool(torch.isfinite(correction_bias).all()):
            raise ValueError("correction_bias contains NaN or infinite values")
    if _use_kernel("route_topk", logits.device, use_reference):
        return torch.ops.eureka_fast.route_topk(logits, k, scoring, renormalize, correction_bias, n_group,
                                                topk_group, float(routed_scaling))
    return ref.route_topk(logits, k, scoring, renormalize, correction_bias, n_group, topk_group, routed_scaling)


def moe_aux_loss(router_probs, ids, *, use_reference=False) -> torch.Tensor:
    """Load-balancing loss E * sum_e P_e * f_e: P_e the mean router probability of expert e, f_e the fraction of
    routed rows sent to e. Differentiable through ``router_probs``."""
    _tensor(router_probs, "router_probs", dim=2, floating=True)
    _tensor(ids, "ids", dim=2, integer=True)
    if ids.shape[0] != router_probs.shape[0]:
        raise ValueError(f"ids must have {router_probs.shape[0]} rows (one per token), got shape {tuple(ids.shape)}")
    _check_top_k(ids.shape[1], router_probs.shape[1], "ids", "E = router_probs.shape[1]")
    _same_device(router_probs=router_probs, ids=ids)
    _check_ids(ids, router_probs.shape[1])
    if _use_kernel("moe_aux_loss", router_probs.device, use_reference):
        return torch.ops.eureka_fast.moe_aux_loss(router_probs, ids)
    return ref.moe_aux_loss(router_probs, ids)


# --------------------------------------------------------------------------------------------------------------
# Plan, permute, combine
# --------------------------------------------------------------------------------------------------------------
def moe_plan(ids, num_experts, *, block=0, use_reference=False) -> MoEPlan:
    """Expert-major ordering of the routed rows of ``ids`` [T, k] (stable in token order)."""
    _tensor(ids, "ids", dim=2, integer=True)
    _int(num_experts, "num_experts", 1)
    _int(block, "block", 0)
    _check_top_k(ids.shape[1], num_experts, "ids", "num_experts")
    _check_ids(ids, num_experts)
    if _use_kernel("moe_plan", ids.device, use_reference):
        parts = torch.ops.eureka_fast.moe_plan(ids, num_experts, block)
    else:
        parts = ref.moe_plan(ids, num_experts, block)
    return MoEPlan(*parts, ids.shape[1], num_experts)


def permute(x, plan: MoEPlan, *, use_reference=False) -> torch.Tensor:
    """x_sorted[i] = x[plan.sorted_rows[i] // k]: token rows in expert-contiguous order, [T*k, H]."""
    _tensor(x, "x", dim=2)
    _check_plan(plan)
    if plan.sorted_rows.numel() != x.shape[0] * plan.top_k:
        raise ValueError(f"x has {x.shape[0]} tokens but the plan routes {plan.sorted_rows.numel()} rows "
                         f"(expected tokens * top_k = {x.shape[0] * plan.top_k})")
    _same_device(x=x, sorted_rows=plan.sorted_rows)
    if _use_kernel("permute", x.device, use_reference):
        return torch.ops.eureka_fast.permute(x, plan.sorted_rows, plan.top_k)
    return ref.permute(x, plan.sorted_rows, plan.top_k)


def combine(y_sorted, plan: MoEPlan, weights, *, use_reference=False) -> torch.Tensor:
    """out[t] = sum_j weights[t, j] * y_sorted[row of (t, j)], summed in slot order (deterministic), [T, H]."""
    _tensor(y_sorted, "y_sorted", dim=2, floating=True)
    _tensor(weights, "weights", dim=2, floating=True)
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
    _same_device(y_sorted=y_sorted, weights=weights, inverse_rows=plan.inverse_rows)
    if _use_kernel("combine", y_sorted.device, use_reference):
        return torch.ops.eureka_fast.combine(y_sorted, plan.inverse_rows, weights)
    return ref.combine(y_sorted, plan.inverse_rows, weights)


# --------------------------------------------------------------------------------------------------------------
# Grouped GEMM and the expert layer
# --------------------------------------------------------------------------------------------------------------
_GATED = {None: "none", "none": "none", "silu_mul": "silu_mul", "gelu_mul": "gelu_mul"}


def _check_offsets(offsets, num_experts: int, rows: int) -> None:
    _tensor(offsets, "offsets", dim=1, integer=True)
    if offsets.shape[0] != num_experts + 1:
        raise ValueError(f"offsets must have shape [{num_experts + 1}] (num_experts + 1), got {tuple(offsets.shape)}")
    if _check_values():
        o = offsets.long()
        if int(o[0]) < 0 or bool((o[1:] < o[:-1]).any()) or int(o[-1]) > rows:
            raise ValueError(f"offsets must be non-decreasing from >= 0 to <= {rows} (the rows of a), got {o.tolist()}")


def grouped_mm(a, w, offsets, *, activation=None, use_reference=False) -> torch.Tensor:
    """Row block e of ``a`` [S, K] (rows offsets[e]:offsets[e+1]) times w[e]^T (w [E, N, K], any strides), with the
    gated activation fused ("silu_mul" | "gelu_mul": first half of N is the gate). Returns [S, N or N/2];
    rows outside the offsets are zero."""
    _tensor(a, "a", dim=2, floating=True)
    _tensor(w, "w", dim=3, floating=True)
    if activation not in _GATED:
        raise ValueError(f"activation must be None, 'silu_mul' or 'gelu_mul', got {activation!r}")
    act = _GATED[activation]
    if w.shape[2] != a.shape[1]:
        raise ValueError(f"w must have shape [E, N, K={a.shape[1]}] (K = a.shape[1]), got {tuple(w.shape)}")
    if act != "none" and w.shape[1] % 2:
        raise ValueError(f"activation={activation!r} needs an even N (gate and up halves), got w {tuple(w.shape)}")
    _check_offsets(offsets, w.shape[0], a.shape[0])
    _same_device(a=a, w=w, offsets=offsets)
    if _use_kernel("grouped_mm", a.device, use_reference):
        return torch.ops.eureka_fast.grouped_mm(a, w, offsets, act)
    return ref.grouped_mm(a, w, offsets, act)


def _check_expert_layer(x, w_gate_up, w_down, weights, ids) -> None:
    _tensor(x, "x", dim=2, floating=True)
    _tensor(w_gate_up, "w_gate_up", dim=3, floating=True)
    _tensor(w_down, "w_down", dim=3, floating=True)
    _tensor(weights, "weights", dim=2, floating=True)
    _tensor(ids, "ids", dim=2, integer=True)
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
    _same_device(x=x, w_gate_up=w_gate_up, w_down=w_down, weights=weights, ids=ids)
    _check_ids(ids, E)


def fused_experts(x, w_gate_up, w_down, weights, ids, *, activation="silu", use_reference=False) -> torch.Tensor:
    """The routed-expert layer in one call: out[t] = sum_j weights[t,j] * down[e](act(gate[e] x_t) * up[e] x_t),
    e = ids[t,j], with transformers 5 layouts w_gate_up [E, 2I, H] (gate rows first) and w_down [E, H, I].
    Differentiable in x, weights, w_gate_up and w_down."""
    _check_expert_layer(x, w_gate_up, w_down, weights, ids)
    if activation not in ("silu", "gelu"):
        raise ValueError(f"activation must be 'silu' or 'gelu', got {activation!r}")
    if _use_kernel("fused_experts", x.device, use_reference):
        return torch.ops.eureka_fast.fused_experts(x, w_gate_up, w_down, weights, ids, activation)
    return ref.fused_experts(x, w_gate_up, w_down, weights, ids, activation)


# --------------------------------------------------------------------------------------------------------------
# Audio downsampling
# --------------------------------------------------------------------------------------------------------------
_NORMS = {None: "none", "none": "none", "layer": "layer", "rms": "rms"}
_ACTS = {None: "none", "none": "none", "silu": "silu", "gelu": "gelu", "swiglu": "swiglu"}


def stack_norm_project(x, k, *, lengths=None, norm="layer", norm_weight=None, norm_bias=None, w1=None, b1=None,
                       activation="silu", w2=None, b2=None, eps=1e-5, pool="stack", use_reference=False):
    """Downsamples frames x [B, T, D] by k: stack k consecutive frames (time-major: frame t*k+j fills channels
    j*D..(j+1)*D) or average them (pool="mean"), then norm ("layer" | "rms" | None), Linear w1/b1, activation
    ("silu" | "gelu" | "swiglu" (first half gates) | None), optional Linear w2/b2. Ragged batches via ``lengths``
    [B]: frames at or past lengths[b] count as zeros and output rows at or past ceil(lengths[b] / k) are zero.
    Returns [B, ceil(T / k), out_features]."""
    _tensor(x, "x", dim=3, floating=True)
    _int(k, "k", 1)
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
            _tensor(t, name, dim=1, floating=True)
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
            _tensor(w, wn, dim=2, floating=True)
            if w.shape[1] != features:
                raise ValueError(f"{wn} must have shape [out, {features}], got {tuple(w.shape)}")
            features = w.shape[0]
            if b is not None:
                _tensor(b, bn, dim=1, floating=True)
                if b.shape[0] != features:
                    raise ValueError(f"{bn} must have shape [{features}], got {tuple(b.shape)}")
        if wn == "w1" and _ACTS[activation] == "swiglu":
            if features % 2:
                raise ValueError(f"activation='swiglu' needs an even number of features, got {features}")
            features //= 2
    if lengths is not None:
        _tensor(lengths, "lengths", dim=1, integer=True)
        if lengths.shape[0] != B:
            raise ValueError(f"lengths must have shape [{B}] (one per batch row), got {tuple(lengths.shape)}")
        if lengths.numel() and _check_values():
            lo, hi = int(lengths.min()), int(lengths.max())
            if lo < 0 or hi > T:
                raise ValueError(f"lengths must lie in [0, T={T}], found values in [{lo}, {hi}]")
    _same_device(x=x, lengths=lengths, norm_weight=norm_weight, norm_bias=norm_bias, w1=w1, b1=b1, w2=w2, b2=b2)
    args = (x, k, lengths, _NORMS[norm], norm_weight, norm_bias, w1, b1, _ACTS[activation], w2, b2, float(eps), pool)
    if _use_kernel("stack_norm_project", x.device, use_reference):
        return torch.ops.eureka_fast.stack_norm_project(*args)
    return ref.stack_norm_project(*args)


# Presets of the downsamplers used by published audio LLMs: name -> keyword arguments of stack_norm_project
# (weights excluded) plus "mlp" (a second Linear) and "bias" (whether the Linears have biases). Checked against:
# - eureka: our adapter (models/adapter.py MoEAdapter.fuse; SPEC.md: stack 4, conv1d-equivalent): nn.LayerNorm +
#   nn.Linear with bias, SiLU.
# - voxtral: transformers VoxtralMultiModalProjector: frames reshaped [B, T, D] -> [-1, 4 D] (time-major), linear_1
#   and linear_2 without bias, ACT2FN["gelu"] (exact erf GELU) between them.
# - ultravox: fixie-ai UltravoxProjector: StackAudioFrames(8) (zero-pad, time-major view), ln_pre RMSNorm (eps 1e-6),
#   linear_1 / linear_2 without bias, SwiGLU. Its SwiGLU gates with the SECOND half of linear_1's output, ours with
#   the first, and it has a trailing RMSNorm (ln_mid before linear_2 from v0.5, ln_post after it up to v0.4.1):
#   use ultravox_projector_args() for real weights.
# - qwen2-audio: Qwen2AudioEncoder's nn.AvgPool1d(2, stride=2) only (its encoder LayerNorm and projector Linear
#   follow the pool and are not part of the preset). AvgPool1d drops an odd last frame; stack_norm_project keeps it
#   as a row of its own (the mean of the frames it has): take out[:, :T // 2] for Qwen2-Audio's token count.
DOWNSAMPLE_PRESETS = {
    "eureka": dict(k=4, pool="stack", norm="layer", activation="silu", mlp=False, bias=True),
    "voxtral": dict(k=4, pool="stack", norm=None, activation="gelu", mlp=True, bias=False),
    "ultravox": dict(k=8, pool="stack", norm="rms", eps=1e-6, activation="swiglu", mlp=True, bias=False),
    "qwen2-audio": dict(k=2, pool="mean", norm=None, activation=None, mlp=False, bias=False),
}


def downsample_preset(name: str, in_dim: int, out_dim: Optional[int] = None, *, hidden_dim: Optional[int] = None,
                      dtype=torch.float32, device=None, generator: Optional[torch.Generator] = None) -> dict:
    """Keyword arguments for ``stack_norm_project`` reproducing a published downsampler, with freshly initialised
    weights (Linear-style uniform init; LayerNorm/RMSNorm weight 1, bias 0): ``stack_norm_project(x, **preset)``.
    Biases only where the published module has them (see DOWNSAMPLE_PRESETS); "ultravox" omits Ultravox's trailing
    RMSNorm, and its w1 follows our first-half-gate SwiGLU (ultravox_projector_args() converts real weights).

    in_dim: the encoder width D; out_dim: the projected width (the LLM hidden size; unused by "qwen2-audio");
    hidden_dim: the MLP's inner width for the two-layer presets (default out_dim).
    """
    if name not in DOWNSAMPLE_PRESETS:
        raise ValueError(f"unknown downsample preset {name!r}; choose one of {sorted(DOWNSAMPLE_PRESETS)}")
    spec = dict(DOWNSAMPLE_PRESETS[name])
    k, mlp, bias = spec["k"], spec.pop("mlp"), spec.pop("bias")
    width = in_dim if spec["pool"] == "mean" else k * in_dim
    opts = dict(dtype=dtype, device=device)

    def linear(n_out, n_in):
        bound = 1.0 / math.sqrt(n_in)
        w = (torch.rand(n_out, n_in, generator=generator, **opts) * 2 - 1) * bound
        b = (torch.rand(n_out, generator=generator, **opts) * 2 - 1) * bound if bias else None
        return w, b

    if spec["norm"] == "layer":
        spec["norm_weight"], spec["norm_bias"] = torch.ones(width, **opts), torch.zeros(width, **opts)
    elif spec["norm"] == "rms":
        spec["norm_weight"] = torch.ones(width, **opts)
    if name == "qwen2-audio":
        return spec
    if out_dim is None:
        raise ValueError(f"preset {name!r} needs out_dim (the projected width)")
    if mlp:
        inner = hidden_dim or out_dim
        spec["w1"], spec["b1"] = linear(2 * inner if spec["activation"] == "swiglu" else inner, width)
        spec["w2"], spec["b2"] = linear(out_dim, inner)
    else:
        spec["w1"], spec["b1"] = linear(out_dim, width)
    return spec


def _llama_rms_norm(h: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Ultravox's RMSNorm (transformers' LlamaRMSNorm): statistics in fp32, then weight * normalised rows."""
    hf = h.float()
    hf = hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * hf.to(h.dtype)


def ultravox_projector_args(projector, *, stack_factor: int = 8, projector_act: str = "swiglu",
                            eps: float = 1e-6):
    """Runs a real Ultravox projector (fixie-ai ``UltravoxProjector``) on ``stack_norm_project``.

    Ultravox: StackAudioFrames(stack_factor) -> ln_pre RMSNorm -> linear_1 (no bias) -> act -> ln_mid RMSNorm
    (v0.5 and later) -> linear_2 (no bias) -> ln_post RMSNorm (v0.4.1 and earlier). Its SwiGLU is
    ``x, gate = h.chunk(2, -1); silu(gate) * x`` (the SECOND half gates) while ours gates with the first half, so
    linear_1's two row halves are swapped here. Our op runs up to the activation (v0.5+) or up to linear_2 (older);
    the trailing RMSNorm (and, with ln_mid, linear_2) is left to ``finish``::

        kwargs, finish = ultravox_projector_args(model.multi_modal_projector)
        tokens = finish(stack_norm_project(frames, lengths=lengths, **kwargs))

    Output rows past a clip's length stay zero through ``finish`` (RMSNorm and bias-free Linears map 0 to 0).

    projector: the module or its state dict (``ln_pre.weight``, ``linear_1.weight``, ``linear_2.weight`` and
    ``ln_mid.weight`` or ``ln_post.weight``, under any common prefix such as ``multi_modal_projector.``).
    stack_factor: the config's ``stack_factor`` (8 for the released models); projector_act: its ``projector_act``
    ("swiglu", "silu" or "gelu"); eps: Ultravox's RMSNorm epsilon (1e-6).
    Returns (keyword arguments for stack_norm_project, finish: a function of its output).
    """
    _int(stack_factor, "stack_factor", 1)
    if projector_act not in ("swiglu", "silu", "gelu"):
        raise ValueError(f"projector_act must be 'swiglu', 'silu' or 'gelu', got {projector_act!r}")
    state = projector.state_dict() if isinstance(projector, torch.nn.Module) else projector
    if not hasattr(state, "items"):
        raise TypeError(f"projector must be an nn.Module or a state dict, got {type(projector).__name__}")

    def find(name: str, required: bool = True) -> Optional[torch.Tensor]:
        hits = [v for key, v in state.items() if key == name or key.endswith("." + name)]
        if len(hits) > 1:
            raise ValueError(f"projector has {len(hits)} entries ending in {name!r}; pass one projector's weights")
        if not hits:
            if required:
                raise ValueError(f"projector has no {name!r} (keys: {sorted(state)[:8]}...)")
            return None
        return _tensor(hits[0], name, floating=True).detach()

    ln_pre, w1, w2 = find("ln_pre.weight"), find("linear_1.weight"), find("linear_2.weight")
    ln_mid, ln_post = find("ln_mid.weight", False), find("ln_post.weight", False)
    for name in ("linear_1.bias", "linear_2.bias"):
        if find(name, False) is not None:
            raise ValueError(f"projector has {name!r}, but Ultravox's linears have no bias")
    if (ln_mid is None) == (ln_post is None):
        raise ValueError("projector must have exactly one of 'ln_mid.weight' (v0.5+) and 'ln_post.weight' (v0.4.1-)")
    _tensor(ln_pre, "ln_pre.weight", dim=1)
    _tensor(w1, "linear_1.weight", dim=2)
    _tensor(w2, "linear_2.weight", dim=2)
    if ln_pre.shape[0] % stack_factor:
        raise ValueError(f"ln_pre.weight has {ln_pre.shape[0]} features, not a multiple of stack_factor="
                         f"{stack_factor}")
    if w1.shape[1] != ln_pre.shape[0]:
        raise ValueError(f"linear_1.weight must have shape [hidden, {ln_pre.shape[0]}], got {tuple(w1.shape)}")
    mid = w1.shape[0] // 2 if projector_act == "swiglu" else w1.shape[0]
    if (projector_act == "swiglu" and w1.shape[0] % 2) or w2.shape[1] != mid:
        raise ValueError(f"linear_2.weight must have shape [out, {mid}] after linear_1 {tuple(w1.shape)} and "
                         f"projector_act={projector_act!r}, got {tuple(w2.shape)}")
    if projector_act == "swiglu":
        w1 = torch.cat([w1[mid:], w1[:mid]])  # Ultravox's gate rows first, for our first-half-gate SwiGLU
    kwargs = dict(k=stack_factor, pool="stack", norm="rms", norm_weight=ln_pre, eps=eps, w1=w1, b1=None,
                  activation=projector_act)
    if ln_mid is not None:
        if ln_mid.shape != (mid,):
            raise ValueError(f"ln_mid.weight must have shape [{mid}], got {tuple(ln_mid.shape)}")

        def finish(h: torch.Tensor) -> torch.Tensor:
            return F.linear(_llama_rms_norm(h, ln_mid.to(h), eps), w2.to(h))
    else:
        if ln_post.shape != (w2.shape[0],):
            raise ValueError(f"ln_post.weight must have shape [{w2.shape[0]}], got {tuple(ln_post.shape)}")
        kwargs.update(w2=w2, b2=None)

        def finish(h: torch.Tensor) -> torch.Tensor:
            return _llama_rms_norm(h, ln_post.to(h), eps)
    return kwargs, finish


# --------------------------------------------------------------------------------------------------------------
# Fake (meta) implementations and autograd formulas, registered once when the extension loads
# --------------------------------------------------------------------------------------------------------------
def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _gated_forward(h: torch.Tensor, act: str) -> torch.Tensor:
    half = h.shape[-1] // 2
    gate, up = h[..., :half], h[..., half:]
    return (F.silu(gate) if act in ("silu", "silu_mul") else F.gelu(gate)) * up


def _gated_backward(h: torch.Tensor, grad: torch.Tensor, act: str) -> torch.Tensor:
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


def _act_backward(z: torch.Tensor, grad: torch.Tensor, act: str) -> torch.Tensor:
    if act == "none":
        return grad
    if act == "swiglu":
        return _gated_backward(z, grad, "silu")
    if act == "silu":
        s = torch.sigmoid(z)
        return grad * s * (1 + z * (1 - s))
    cdf = 0.5 * (1 + torch.erf(z * (1 / math.sqrt(2))))
    return grad * (cdf + z * torch.exp(-0.5 * z * z) * (1 / math.sqrt(2 * math.pi)))


_REGISTERED = False


def _register_python_parts() -> None:
    global _REGISTERED
    if _REGISTERED:
        return
    _REGISTERED = True
    lib = "eureka_fast::"
    ops = torch.ops.eureka_fast

    # ---- fake implementations: shapes and dtypes only ----
    @torch.library.register_fake(lib + "route_topk")
    def _(logits, k, scoring, renormalize, correction_bias, n_group, topk_group, routed_scaling):
        T = logits.shape[0]
        return (logits.new_empty((T, k), dtype=_compute_dtype(logits.dtype)),
                logits.new_empty((T, k), dtype=torch.int32))

    @torch.library.register_fake(lib + "moe_aux_loss")
    def _(router_probs, ids):
        return router_probs.new_empty((), dtype=_compute_dtype(router_probs.dtype))

    @torch.library.register_fake(lib + "moe_plan")
    def _(ids, num_experts, block):
        rows = ids.shape[0] * ids.shape[1]
        new = lambda n: ids.new_empty((n,), dtype=torch.int64)  # noqa: E731
        return new(num_experts), new(num_experts + 1), new(num_experts + 1), new(rows), new(rows)

    @torch.library.register_fake(lib + "permute")
    def _(x, sorted_rows, top_k):
        return x.new_empty((sorted_rows.shape[0], x.shape[1]))

    @torch.library.register_fake(lib + "combine")
    def _(y_sorted, inverse_rows, weights):
        return y_sorted.new_empty((weights.shape[0], y_sorted.shape[1]))

    @torch.library.register_fake(lib + "combine_backward")
    def _(grad_out, y_sorted, inverse_rows, weights):
        return torch.empty_like(y_sorted, memory_format=torch.contiguous_format), torch.empty_like(weights, memory_format=torch.contiguous_format)

    @torch.library.register_fake(lib + "grouped_mm")
    def _(a, w, offsets, activation):
        n = w.shape[1] if activation == "none" else w.shape[1] // 2
        return a.new_empty((a.shape[0], n))

    @torch.library.register_fake(lib + "grouped_mm_backward")
    def _(grad_out, a, w, offsets, activation):
        return a.new_empty(a.shape), w.new_empty(w.shape)

    @torch.library.register_fake(lib + "fused_experts")
    def _(x, w_gate_up, w_down, weights, ids, activation):
        return x.new_empty(x.shape)

    @torch.library.register_fake(lib + "stack_norm_project")
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

    # ---- autograd ----
    def route_setup(ctx, inputs, output):
        logits, k, scoring, renormalize, correction_bias, n_group, topk_group, routed_scaling = inputs
        weights, ids = output
        ctx.save_for_backward(logits, ids)
        ctx.scoring, ctx.renormalize, ctx.routed_scaling = scoring, renormalize, routed_scaling

    def route_backward(ctx, grad_weights, grad_ids):
        logits, ids = ctx.saved_tensors
        cd = _compute_dtype(logits.dtype)
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

    torch.library.register_autograd(lib + "route_topk", route_backward, setup_context=route_setup)

    def aux_setup(ctx, inputs, output):
        router_probs, ids = inputs
        ctx.save_for_backward(ids)
        ctx.shape, ctx.dtype = router_probs.shape, router_probs.dtype

    def aux_backward(ctx, grad):
        (ids,) = ctx.saved_tensors
        T, E = ctx.shape
        cd = _compute_dtype(ctx.dtype)
        if T == 0 or ids.numel() == 0:
            return grad.new_zeros(ctx.shape, dtype=ctx.dtype), None
        flat = ids.reshape(-1).long()
        counts = torch.zeros(E, dtype=cd, device=ids.device).index_add_(0, flat, torch.ones_like(flat, dtype=cd))
        per_expert = grad.to(cd) * E * counts / (flat.numel() * T)
        return per_expert.expand(T, E).to(ctx.dtype).contiguous(), None

    torch.library.register_autograd(lib + "moe_aux_loss", aux_backward, setup_context=aux_setup)

    def permute_setup(ctx, inputs, output):
        x, sorted_rows, top_k = inputs
        ctx.save_for_backward(sorted_rows)
        ctx.top_k, ctx.tokens = top_k, x.shape[0]

    def permute_backward(ctx, grad):
        (sorted_rows,) = ctx.saved_tensors
        inverse = torch.empty_like(sorted_rows).scatter_(
            0, sorted_rows, torch.arange(sorted_rows.numel(), device=sorted_rows.device))
        ones = torch.ones(ctx.tokens, ctx.top_k, dtype=_compute_dtype(grad.dtype), device=grad.device)
        return ops.combine(grad, inverse, ones), None, None

    torch.library.register_autograd(lib + "permute", permute_backward, setup_context=permute_setup)

    def combine_setup(ctx, inputs, output):
        y_sorted, inverse_rows, weights = inputs
        ctx.save_for_backward(y_sorted, inverse_rows, weights)

    def combine_backward(ctx, grad):
        y_sorted, inverse_rows, weights = ctx.saved_tensors
        grad_y, grad_w = ops.combine_backward(grad, y_sorted, inverse_rows, weights)
        return grad_y, None, grad_w

    torch.library.register_autograd(lib + "combine", combine_backward, setup_context=combine_setup)

    def gmm_setup(ctx, inputs, output):
        a, w, offsets, activation = inputs
        ctx.save_for_backward(a, w, offsets)
        ctx.activation = activation

    def gmm_backward(ctx, grad):
        a, w, offsets = ctx.saved_tensors
        grad_a, grad_w = ops.grouped_mm_backward(grad, a, w, offsets, ctx.activation)
        return grad_a, grad_w, None, None

    torch.library.register_autograd(lib + "grouped_mm", gmm_backward, setup_context=gmm_setup)

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
        hidden = _gated_forward(h, ctx.activation)
        y_sorted = ops.grouped_mm(hidden, w_down, offsets, "none")
        grad_y, grad_weights = ops.combine_backward(grad, y_sorted, inverse_rows, weights)
        grad_hidden, grad_w_down = ops.grouped_mm_backward(grad_y, hidden, w_down, offsets, "none")
        grad_h = _gated_backward(h.to(_compute_dtype(h.dtype)), grad_hidden.to(_compute_dtype(h.dtype)),
                                 ctx.activation).to(h.dtype)
        grad_x_sorted, grad_w_gate_up = ops.grouped_mm_backward(grad_h, x_sorted, w_gate_up, offsets, "none")
        ones = torch.ones(x.shape[0], k, dtype=_compute_dtype(x.dtype), device=x.device)
        grad_x = ops.combine(grad_x_sorted, inverse_rows, ones)
        return grad_x, grad_w_gate_up, grad_w_down, grad_weights, None, None

    torch.library.register_autograd(lib + "fused_experts", experts_backward, setup_context=experts_setup)

    def snp_setup(ctx, inputs, output):
        x, k, lengths, norm, norm_weight, norm_bias, w1, b1, activation, w2, b2, eps, pool = inputs
        ctx.save_for_backward(x, lengths, norm_weight, norm_bias, w1, b1, w2, b2)
        ctx.k, ctx.norm, ctx.activation, ctx.eps, ctx.pool = k, norm, activation, eps, pool

    torch.library.register_autograd(lib + "stack_norm_project", _stack_norm_project_backward, setup_context=snp_setup)


def _stack_norm_project_backward(ctx, grad):
    """Analytic backward of stack -> norm -> Linear -> activation -> Linear (forward intermediates recomputed)."""
    x, lengths, norm_weight, norm_bias, w1, b1, w2, b2 = ctx.saved_tensors
    k, norm, act, eps, pool = ctx.k, ctx.norm, ctx.activation, ctx.eps, ctx.pool
    cd = _compute_dtype(x.dtype)
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
    a = _gated_forward(z1, "silu") if act == "swiglu" else (
        F.silu(z1) if act == "silu" else F.gelu(z1) if act == "gelu" else z1)
    out_valid = valid.view(B, T_out, k).any(-1, keepdim=True).to(cd)
    g = grad.to(cd) * out_valid
    grads = dict.fromkeys(("x", "norm_weight", "norm_bias", "w1", "b1", "w2", "b2"))
    if w2 is not None:
        grads["w2"] = g.flatten(0, 1).t().mm(a.flatten(0, 1)).to(w2.dtype)
        grads["b2"] = None if b2 is None else g.sum((0, 1)).to(b2.dtype)
        g = g.matmul(w2.to(cd))
    g = _act_backward(z1, g, act)
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


# Load the kernels at import, outside any trace (see _fill_kernel_cache).
_load_extension()
