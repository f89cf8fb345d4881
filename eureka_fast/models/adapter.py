"""The adapter between the Whisper encoder and the LLM: the sparse Mixture-of-Experts one (Eureka-Audio Eq. 1 and 3)
or, for the MoE-vs-dense ablation, a dense one (`adapter_type: dense`) with one MLP of the same parameter count.

    frames [*, 4k, D_enc] --stack 4 -> LayerNorm(4 D_enc) -> Linear(4 D_enc -> d) -> SiLU-->  x [N, d]
    router logits G(x) = x W_g, top-k with a sparse softmax, routed SiLU experts (+ optional shared experts)
    y = LayerNorm(W_P (sum_{i in topk} g_i E_i(x) [+ shared(x)]))                            ->  [N, H_llm]

Every step runs on the eureka_fast ops (stack_norm_project, route_topk, fused_experts, moe_aux_loss), so the
compiled kernels are used where built; ``use_reference_ops = True`` forces the pure-PyTorch references.
`build_adapter(config, ...)` picks the class from ``config.adapter_type``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from .configuration_eureka import EurekaAdapterConfig


class MoEExperts(nn.Module):
    """Routed SiLU-gated experts in the transformers-5 3-D layout, so ops.fused_experts reads them without copies:
    gate_up_proj [E, 2I, d] (gate rows first), down_proj [E, d, I]."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.num_experts = num_experts
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))

    def forward(self, x, weights, ids, *, use_reference: bool = False):
        return ops.fused_experts(x, self.gate_up_proj, self.down_proj, weights, ids, activation="silu",
                                 use_reference=use_reference)


class SharedExpert(nn.Module):
    """Always-on SiLU-gated FFN (all shared experts fused into one wider FFN: same function, one matmul)."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


@dataclass
class AdapterOutput:
    embeddings: torch.Tensor  # [N, H_llm]
    aux_loss: torch.Tensor  # scalar, float32 (0 for the dense adapter)
    router_load: torch.Tensor | None  # [E] fraction of routed token-slots per expert (detached); None when dense
    router_logits: torch.Tensor | None  # [N, E]; None when dense
    expert_ids: torch.Tensor | None  # [N, k] int32; None when dense


class _FusedAdapter(nn.Module):
    """What both adapters share: input fusion (stack, LayerNorm, Linear, SiLU) and the output W_P + LayerNorm."""

    def __init__(self, config: EurekaAdapterConfig, encoder_width: int, llm_width: int):
        super().__init__()
        self.config = config
        d = config.hidden_size or llm_width
        stacked = encoder_width * config.stack_factor
        self.stack_factor = config.stack_factor
        self.input_norm = nn.LayerNorm(stacked, eps=config.layer_norm_eps)
        self.input_proj = nn.Linear(stacked, d)
        self.output_proj = nn.Linear(d, llm_width)  # W_P
        self.output_norm = nn.LayerNorm(llm_width, eps=config.layer_norm_eps)
        # Runtime switch, not saved: True runs every op on eureka_fast.ops.reference (for checking the kernels).
        self.use_reference_ops = False

    def fuse(self, frames: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """Input fusion: [B, T, D_enc] encoder frames -> [B, ceil(T / stack), d] (stack, LayerNorm, Linear, SiLU)."""
        return ops.stack_norm_project(
            frames, self.stack_factor, lengths=lengths, norm="layer", norm_weight=self.input_norm.weight,
            norm_bias=self.input_norm.bias, w1=self.input_proj.weight, b1=self.input_proj.bias, activation="silu",
            eps=self.input_norm.eps, pool="stack", use_reference=self.use_reference_ops)

    def mix(self, x: torch.Tensor) -> AdapterOutput:
        raise NotImplementedError

    def forward(self, frames: torch.Tensor, lengths: torch.Tensor | None = None) -> AdapterOutput:
        """Whole adapter on [B, T, D_enc] frames -> AdapterOutput with embeddings [B * ceil(T / stack), H_llm]."""
        fused = self.fuse(frames, lengths)
        return self.mix(fused.reshape(-1, fused.shape[-1]))


class MoEAdapter(_FusedAdapter):
    def __init__(self, config: EurekaAdapterConfig, encoder_width: int, llm_width: int):
        super().__init__(config, encoder_width, llm_width)
        d = self.input_proj.out_features
        self.top_k = config.top_k
        self.num_experts = config.num_experts
        self.router = nn.Linear(d, config.num_experts, bias=False)
        self.experts = MoEExperts(config.num_experts, d, config.expert_intermediate_size)
        if config.num_shared_experts > 0:
            width = config.shared_expert_intermediate_size or config.expert_intermediate_size
            self.shared_experts = SharedExpert(d, width * config.num_shared_experts)
        else:
            self.shared_experts = None

    def route(self, x: torch.Tensor):
        """Router logits [N, E], top-k weights [N, k] (sparse softmax, see EurekaAdapterConfig.renormalize), ids."""
        logits = self.router(x)
        weights, ids = ops.route_topk(logits, self.top_k, scoring=self.config.router_scoring,
                                      renormalize=self.config.renormalize, use_reference=self.use_reference_ops)
        return logits, weights, ids

    def mix(self, x: torch.Tensor) -> AdapterOutput:
        """Routed + shared experts, W_P, LayerNorm on fused tokens x [N, d]; plus the load-balancing loss."""
        logits, weights, ids = self.route(x)
        mixed = self.experts(x, weights.to(x.dtype), ids, use_reference=self.use_reference_ops)
        if self.shared_experts is not None:
            mixed = mixed + self.shared_experts(x)
        out = self.output_norm(self.output_proj(mixed))
        # Eq. 3 uses the router's probability over all experts (softmax), whatever the selection scoring.
        probs = torch.softmax(logits.float(), dim=-1)
        aux = ops.moe_aux_loss(probs, ids, use_reference=self.use_reference_ops)
        if ids.numel():
            load = torch.bincount(ids.reshape(-1).long(), minlength=self.num_experts).float() / ids.numel()
        else:
            load = torch.zeros(self.num_experts, device=x.device)
        return AdapterOutput(out, aux.float(), load.detach(), logits, ids)


class DenseAdapter(_FusedAdapter):
    """The ablation's dense adapter: the MoE adapter with its router, routed experts and shared expert replaced by
    one SiLU-gated MLP d -> I -> d whose width I (`EurekaAdapterConfig.dense_width`) gives it their total parameter
    count. Same input fusion, W_P and output norm; no routing, so the load-balancing loss is 0."""

    def __init__(self, config: EurekaAdapterConfig, encoder_width: int, llm_width: int):
        super().__init__(config, encoder_width, llm_width)
        d = self.input_proj.out_features
        self.mlp = SharedExpert(d, config.dense_width(d))

    def mix(self, x: torch.Tensor) -> AdapterOutput:
        out = self.output_norm(self.output_proj(self.mlp(x)))
        return AdapterOutput(out, torch.zeros((), dtype=torch.float32, device=x.device), None, None, None)


ADAPTER_TYPES = {"moe": MoEAdapter, "dense": DenseAdapter}


def build_adapter(config: EurekaAdapterConfig, encoder_width: int, llm_width: int) -> _FusedAdapter:
    """The adapter ``config.adapter_type`` names ("moe", the default, or "dense")."""
    return ADAPTER_TYPES[config.adapter_type](config, encoder_width=encoder_width, llm_width=llm_width)
