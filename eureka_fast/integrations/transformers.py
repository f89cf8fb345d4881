"""Drop-in fast MoE for transformers 5 models: eureka_fast routing and expert kernels behind transformers' own modules.

Two ways in:

* ``"eureka_fast"`` is registered as an experts implementation in transformers' ``ExpertsInterface`` when this
  module is imported, so ``model.set_experts_implementation("eureka_fast")`` and
  ``from_pretrained(..., experts_implementation="eureka_fast")`` route every ``@use_experts_implementation`` experts
  module through ``eureka_fast.ops.fused_experts``. The routers stay transformers'.
* ``apply_fast_moe(model)`` patches a loaded model in place: routers of the families it knows go through
  ``eureka_fast.ops.route_topk`` and supported experts modules through ``fused_experts``. It returns a
  ``FastMoEReport`` listing every patched module and every MoE module it left untouched, with the reason.

Patching swaps the module's class for a subclass that only overrides ``forward``: parameters, buffers, names and
``state_dict`` are unchanged, ``isinstance`` still holds (transformers' output recorders find the routers, so
``output_router_logits`` and the auxiliary loss keep working), and ``remove_fast_moe`` swaps the classes back.
A module is patched whole or not at all; a MoE block whose experts we cannot run is left whole, router included.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops

EXPERTS_IMPLEMENTATION = "eureka_fast"

try:  # transformers >= 5.0 (verified on 5.17 and 5.24: same registry, decorator attributes and default gate)
    from transformers.integrations.moe import ExpertsInterface, _default_apply_gate
except ImportError as exc:  # pragma: no cover - depends on the installed transformers
    raise ImportError(
        "eureka_fast.integrations.transformers needs transformers >= 5.0 (the `@use_experts_implementation` experts "
        f"modules and `ExpertsInterface` registry): {exc}"
    ) from exc


# --------------------------------------------------------------------------------------------------------------
# Experts
# --------------------------------------------------------------------------------------------------------------
def _activation_name(act_fn: nn.Module) -> Optional[str]:
    """The fused_experts activation equal to ``act_fn``, or None when fused_experts has no such activation."""
    from transformers.activations import GELUActivation, SiLUActivation

    if isinstance(act_fn, (SiLUActivation, nn.SiLU)):
        return "silu"
    # transformers' "gelu" is exact (erf) GELU, either through F.gelu or its Python formula; tanh variants differ.
    if isinstance(act_fn, GELUActivation):
        return "gelu"
    if isinstance(act_fn, nn.GELU) and act_fn.approximate == "none":
        return "gelu"
    return None


def experts_unsupported_reasons(module: nn.Module) -> List[str]:
    """Why ``fused_experts`` cannot run this experts module exactly (empty list: it can).

    fused_experts computes sum_j w_j * down[e](act(gate[e] x) * up[e] x) with ``gate_up_proj [E, 2I, H]`` (gate rows
    first), ``down_proj [E, H, I]``, no biases and act in {silu, exact gelu}: the transformers 5 default layout.
    """
    reasons = []
    gate_up, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    if not (isinstance(gate_up, torch.Tensor) and isinstance(down, torch.Tensor)):
        if isinstance(module, nn.ModuleList) or isinstance(getattr(module, "experts", None), nn.ModuleList):
            return ["per-expert nn.Linear ModuleList layout (transformers 4 style), not the 3-D gate_up_proj/down_proj"]
        return ["no 3-D gate_up_proj / down_proj expert weights"]
    float_dtypes = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
    if gate_up.dtype not in float_dtypes or down.dtype not in float_dtypes or any(
            "scale" in name for name, _ in module.named_parameters(recurse=False)):
        # FP8 / quantized experts carry scales next to the weights; fused_experts would read raw codes as values.
        reasons.append(f"quantized expert weights ({gate_up.dtype}, {down.dtype})")
    if not getattr(module, "has_gate", True):
        reasons.append("ungated experts (up_proj only)")
    if getattr(module, "has_bias", False) or getattr(module, "gate_up_proj_bias", None) is not None:
        reasons.append("per-expert biases")
    if getattr(module, "is_transposed", False):
        reasons.append("transposed weight layout ([E, H, 2I])")
    if not getattr(module, "is_concatenated", True):
        reasons.append("interleaved gate/up rows")
    if getattr(module, "has_post_expert_norm", False):
        reasons.append("post-expert norm")
    if getattr(module, "_is_expert_parallel", False):
        reasons.append("expert parallelism (sentinel expert ids)")
    apply_gate = getattr(type(module), "_apply_gate", _default_apply_gate)
    if apply_gate is not _default_apply_gate:
        detail = ""
        if hasattr(module, "alpha") and hasattr(module, "limit"):  # GPT-OSS
            detail = (f": clamped SwiGLU (up + 1) * g * sigmoid(alpha * g), alpha={module.alpha}, "
                      f"limit={module.limit}")
        reasons.append(f"custom gate activation {type(module).__name__}._apply_gate{detail}")
    else:
        act = getattr(module, "act_fn", None)
        if act is None or _activation_name(act) is None:
            reasons.append(f"activation {type(act).__name__} (fused_experts runs silu or exact gelu)")
    if not reasons:
        if gate_up.dim() != 3 or down.dim() != 3:
            reasons.append(f"expert weights are not 3-D (gate_up_proj {tuple(gate_up.shape)}, "
                           f"down_proj {tuple(down.shape)})")
        elif not (gate_up.shape[0] == down.shape[0] and gate_up.shape[2] == down.shape[1]
                  and gate_up.shape[1] == 2 * down.shape[2]):
            reasons.append(f"unexpected expert shapes gate_up_proj {tuple(gate_up.shape)}, "
                           f"down_proj {tuple(down.shape)} (want [E, 2I, H] and [E, H, I])")
    return reasons


def _run_fused_experts(module, hidden_states, top_k_index, top_k_weights, activation):
    # fp32 routing weights and int32 ids are the op's native types; the casts are free next to the expert GEMMs and
    # keep the op independent of which router produced them (Mixtral gives fp32 weights, Qwen the model dtype).
    return ops.fused_experts(
        hidden_states,
        module.gate_up_proj,
        module.down_proj,
        top_k_weights.to(torch.float32),
        top_k_index.to(torch.int32),
        activation=activation,
    )


def eureka_fast_experts_forward(self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                                top_k_weights: torch.Tensor) -> torch.Tensor:
    """transformers experts-implementation entry: (experts module, x [T, H], ids [T, k], weights [T, k]) -> [T, H]."""
    reasons = experts_unsupported_reasons(self)
    if reasons:
        raise NotImplementedError(
            f'experts_implementation="{EXPERTS_IMPLEMENTATION}" cannot run {type(self).__name__}: '
            + "; ".join(reasons)
            + '. Use experts_implementation="grouped_mm" (or "eager") for this model; '
            "eureka_fast.apply_fast_moe(model) patches only the blocks it supports and reports the rest."
        )
    return _run_fused_experts(self, hidden_states, top_k_index, top_k_weights, _activation_name(self.act_fn))


def _patched_experts_forward(self, hidden_states, top_k_index, top_k_weights):
    return _run_fused_experts(self, hidden_states, top_k_index, top_k_weights, self._eureka_fast_activation)


def register_experts_implementation() -> None:
    """Registers "eureka_fast" in transformers' global experts registry (idempotent).

    ``ExpertsInterface.register`` updates the class-wide mapping that both ``ALL_EXPERTS_FUNCTIONS`` (the forward
    dispatch of ``@use_experts_implementation``) and ``PreTrainedModel.get_correct_experts_implementation`` (the name
    check of ``set_experts_implementation`` / ``from_pretrained``) read, in transformers 5.17 and 5.24 alike.
    """
    ExpertsInterface.register(EXPERTS_IMPLEMENTATION, eureka_fast_experts_forward)


register_experts_implementation()
# Load the compiled kernels (and their fake / autograd registrations) now, outside any torch.compile trace: the ops
# load lazily on first call, and loading inside a dynamo trace (register_fake) breaks the graph there.
ops.backend()


# --------------------------------------------------------------------------------------------------------------
# Routers
# --------------------------------------------------------------------------------------------------------------
def _softmax_router_forward(self, hidden_states):
    """Softmax over all experts in fp32, top-k, optional renormalisation (Mixtral, Qwen-MoE, OLMoE families)."""
    hidden_states = hidden_states.reshape(-1, self.hidden_dim)
    router_logits = F.linear(hidden_states, self.weight)
    renormalize = self._eureka_fast_renormalize
    if renormalize is None:
        renormalize = bool(self.norm_topk_prob)
    weights, ids = ops.route_topk(router_logits, self.top_k, scoring="softmax", renormalize=renormalize)
    if self._eureka_fast_weights_in_logits_dtype:
        weights = weights.to(router_logits.dtype)
    # int64 ids keep the router's output contract: unpatched consumers (eager experts) one_hot them.
    return router_logits, weights, ids.long()


def _sigmoid_group_router_forward(self, hidden_states):
    """DeepSeek-V3 routing: fp32 sigmoid scores, correction bias on selection only, group-limited top-k,
    optional renormalisation, routed scaling factor."""
    hidden_states = hidden_states.view(-1, self.hidden_dim)
    router_logits = F.linear(hidden_states.type(torch.float32), self.weight.type(torch.float32))
    weights, ids = ops.route_topk(
        router_logits,
        self.top_k,
        scoring="sigmoid",
        renormalize=bool(self.norm_topk_prob),
        correction_bias=self.e_score_correction_bias,
        n_group=self.num_group,
        topk_group=self.topk_group,
        routed_scaling=float(self.routed_scaling_factor),
    )
    return router_logits, weights, ids.long()


@dataclass(frozen=True)
class _RouterRule:
    description: str
    forward: Callable
    required: Tuple[str, ...]
    renormalize: Optional[bool] = None  # None: the module's norm_topk_prob decides
    weights_in_logits_dtype: bool = False


_QWEN = _RouterRule("softmax top-k, renormalised if norm_topk_prob", _softmax_router_forward,
                    ("weight", "top_k", "hidden_dim", "norm_topk_prob"), None, True)
_QWEN_VL = _RouterRule("softmax top-k, renormalised", _softmax_router_forward,
                       ("weight", "top_k", "hidden_dim"), True, True)
_MIXTRAL = _RouterRule("softmax top-k, renormalised, fp32 weights", _softmax_router_forward,
                       ("weight", "top_k", "hidden_dim"), True, False)
_DEEPSEEK_V3 = _RouterRule(
    "sigmoid + correction bias, group-limited top-k, routed scaling", _sigmoid_group_router_forward,
    ("weight", "top_k", "hidden_dim", "num_experts", "e_score_correction_bias", "num_group", "topk_group",
     "norm_topk_prob", "routed_scaling_factor"))

# Router classes whose forward we reproduce exactly. The groups were read from the transformers 5.24 and 5.17 sources:
# within a group the classes are copies of one implementation (python_tests/integrations checks the installed
# sources still agree).
ROUTER_RULES: Dict[str, _RouterRule] = {
    **{name: _QWEN for name in (
        "Qwen2MoeTopKRouter", "Qwen3MoeTopKRouter", "OlmoeTopKRouter", "FlexOlmoTopKRouter", "Qwen3NextTopKRouter",
        "Qwen3OmniMoeThinkerTextTopKRouter", "Qwen3OmniMoeTalkerTextTopKRouter")},
    **{name: _QWEN_VL for name in ("Qwen3VLMoeTextTopKRouter", "Qwen3_5MoeTopKRouter")},
    **{name: _MIXTRAL for name in ("MixtralTopKRouter", "MiniMaxTopKRouter")},
    **{name: _DEEPSEEK_V3 for name in ("DeepseekV3TopkRouter", "Dots1TopkRouter", "Glm4MoeTopkRouter")},
}


def _router_unsupported_reasons(module: nn.Module, rule: _RouterRule) -> List[str]:
    missing = [a for a in rule.required if not hasattr(module, a)]
    if missing:
        return [f"{type(module).__name__} lacks {', '.join(missing)} (a transformers version we have not read?)"]
    reasons = []
    weight = module.weight
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        reasons.append("router weight is not a 2-D [E, H] tensor")
    elif not 1 <= int(module.top_k) <= weight.shape[0]:
        reasons.append(f"top_k={module.top_k} outside 1..{weight.shape[0]}")
    if getattr(module, "bias", None) is not None:
        reasons.append("router bias")
    if rule is _DEEPSEEK_V3 and not reasons:
        E, groups = weight.shape[0], int(module.num_group)
        if groups < 1 or E % groups or not 1 <= int(module.topk_group) <= groups:
            reasons.append(f"n_group={groups}, topk_group={module.topk_group} do not split {E} experts")
        elif E // groups < 2 and groups > 1:
            reasons.append("groups of one expert (the group score sums each group's top 2)")
    return reasons


# --------------------------------------------------------------------------------------------------------------
# Patching
# --------------------------------------------------------------------------------------------------------------
_FAST_CLASSES: Dict[Tuple[type, Callable, Optional[bool], bool], type] = {}


def _fast_class(original: type, forward: Callable, renormalize: Optional[bool] = None,
                weights_in_logits_dtype: bool = False) -> type:
    """A subclass of ``original`` that only overrides forward (cached: one per original class and rule)."""
    key = (original, forward, renormalize, weights_in_logits_dtype)
    cls = _FAST_CLASSES.get(key)
    if cls is None:
        cls = type(f"EurekaFast{original.__name__}", (original,), {
            "forward": forward,
            "_eureka_fast_original_class": original,
            "_eureka_fast_renormalize": renormalize,
            "_eureka_fast_weights_in_logits_dtype": weights_in_logits_dtype,
            "__module__": __name__,
            "__doc__": f"{original.__name__} running eureka_fast kernels (same parameters, forward replaced).",
        })
        _FAST_CLASSES[key] = cls
    return cls


@dataclass
class ModuleEntry:
    name: str        # qualified module name in the model
    class_name: str  # the module's transformers class
    detail: str      # what now runs (patched) or why it was left alone (untouched)


@dataclass
class FastMoEReport:
    """What ``apply_fast_moe`` did: patched modules and the MoE modules it left untouched, with reasons."""
    patched: List[ModuleEntry] = field(default_factory=list)
    untouched: List[ModuleEntry] = field(default_factory=list)

    @property
    def patched_routers(self) -> List[ModuleEntry]:
        return [e for e in self.patched if e.detail.startswith("router")]

    @property
    def patched_experts(self) -> List[ModuleEntry]:
        return [e for e in self.patched if e.detail.startswith("experts")]

    def __str__(self) -> str:
        lines = [f"eureka_fast MoE patch: {len(self.patched)} modules patched, {len(self.untouched)} left untouched "
                 f"(ops backend: {ops.backend()})"]
        lines += [f"  patched   {e.name} ({e.class_name}): {e.detail}" for e in self.patched]
        lines += [f"  untouched {e.name} ({e.class_name}): {e.detail}" for e in self.untouched]
        return "\n".join(lines)


def _is_experts_like(name: str, module: nn.Module) -> bool:
    if isinstance(module, nn.ModuleList):  # transformers 4 style: a list of per-expert MLPs
        return name == "experts"
    return (hasattr(module, "gate_up_proj") or hasattr(module, "has_gate") or name == "experts"
            or type(module).__name__.endswith("Experts"))


def _is_router_like(name: str, module: nn.Module) -> bool:
    if type(module).__name__ in ROUTER_RULES or name in ("gate", "router"):
        return True
    if isinstance(module, nn.Linear):  # e.g. Qwen2-MoE's shared_expert_gate: a dense scalar gate, not a router
        return False
    return hasattr(module, "top_k") or "router" in type(module).__name__.lower()


def apply_fast_moe(model: nn.Module, *, routers: bool = True, experts: bool = True) -> FastMoEReport:
    """Patches the MoE blocks of a transformers model in place to run on eureka_fast kernels; returns a report.

    A MoE block is a module with an experts child (``@use_experts_implementation`` style ``gate_up_proj`` /
    ``down_proj``) and its router sibling. Experts that ``fused_experts`` runs exactly are patched; routers whose
    family is in ``ROUTER_RULES`` go through ``route_topk``. When a block's experts are unsupported (GPT-OSS: biases,
    interleaved layout, clamped SwiGLU) the whole block is left as it was, router included. Everything else in the
    model (attention, shared experts, norms) is untouched. Idempotent; ``remove_fast_moe`` undoes it.
    """
    report = FastMoEReport()
    for parent_name, parent in model.named_modules():
        children = dict(parent.named_children())
        expert_children = {n: m for n, m in children.items() if _is_experts_like(n, m)}
        if not expert_children:
            continue
        prefix = f"{parent_name}." if parent_name else ""
        block_supported = True
        for child_name, module in expert_children.items():
            qual = prefix + child_name
            original = getattr(type(module), "_eureka_fast_original_class", type(module))
            if original is not type(module):
                report.patched.append(ModuleEntry(qual, original.__name__, "experts: already patched"))
                continue
            reasons = experts_unsupported_reasons(module)
            if reasons:
                block_supported = False
                report.untouched.append(ModuleEntry(qual, original.__name__, "experts unsupported: " + "; ".join(reasons)))
            elif not experts:
                report.untouched.append(ModuleEntry(qual, original.__name__, "experts: not requested (experts=False)"))
            else:
                activation = _activation_name(module.act_fn)
                module._eureka_fast_activation = activation
                module.__class__ = _fast_class(original, _patched_experts_forward)
                report.patched.append(ModuleEntry(qual, original.__name__, f"experts: fused_experts ({activation})"))
        for child_name, module in children.items():
            if child_name in expert_children or not _is_router_like(child_name, module):
                continue
            qual = prefix + child_name
            original = getattr(type(module), "_eureka_fast_original_class", type(module))
            if original is not type(module):
                report.patched.append(ModuleEntry(qual, original.__name__, "router: already patched"))
                continue
            rule = ROUTER_RULES.get(original.__name__)
            if not block_supported:
                report.untouched.append(ModuleEntry(
                    qual, original.__name__, "router left with its unsupported experts (blocks are patched whole)"))
            elif rule is None:
                report.untouched.append(ModuleEntry(
                    qual, original.__name__, "unknown router family: routing stays transformers' "
                    "(the experts still run fused_experts)"))
            elif not routers:
                report.untouched.append(ModuleEntry(qual, original.__name__, "router: not requested (routers=False)"))
            else:
                reasons = _router_unsupported_reasons(module, rule)
                if reasons:
                    report.untouched.append(ModuleEntry(qual, original.__name__, "router unsupported: " + "; ".join(reasons)))
                    continue
                module.__class__ = _fast_class(original, rule.forward, rule.renormalize, rule.weights_in_logits_dtype)
                report.patched.append(ModuleEntry(qual, original.__name__, f"router: route_topk ({rule.description})"))
    return report


def remove_fast_moe(model: nn.Module) -> int:
    """Undoes ``apply_fast_moe``: every patched module gets its original class back. Returns how many."""
    restored = 0
    for module in model.modules():
        original = getattr(type(module), "_eureka_fast_original_class", None)
        if original is not None:
            module.__class__ = original
            module.__dict__.pop("_eureka_fast_activation", None)
            restored += 1
    return restored


__all__ = [
    "EXPERTS_IMPLEMENTATION",
    "FastMoEReport",
    "ModuleEntry",
    "ROUTER_RULES",
    "apply_fast_moe",
    "eureka_fast_experts_forward",
    "experts_unsupported_reasons",
    "register_experts_implementation",
    "remove_fast_moe",
]
