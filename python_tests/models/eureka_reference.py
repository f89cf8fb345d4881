"""An independent, loop-based re-statement of the Eureka-Audio adapter and audio merge (docs/model.md#the-adapter,
paper Eq. 1/3), written from the equations with plain torch ops: no eureka_fast.ops, no batching tricks."""
import torch
import torch.nn.functional as F


def reference_adapter(adapter, frames: torch.Tensor, renormalize: bool | None = None):
    """frames [N * stack, D_enc] of ONE request (already cut to 4 x its tokens) -> (embeddings [N, H], logits, ids)."""
    cfg = adapter.config
    stack = cfg.stack_factor
    renorm = cfg.renormalize if renormalize is None else renormalize
    n = frames.shape[0] // stack
    rows = []
    all_logits, all_ids = [], []
    for t in range(n):
        # time-major stacking: frame t*stack + j fills channels j*D .. (j+1)*D
        stacked = torch.cat([frames[t * stack + j] for j in range(stack)])
        h = F.layer_norm(stacked, stacked.shape, adapter.input_norm.weight, adapter.input_norm.bias,
                         adapter.input_norm.eps)
        x = F.silu(adapter.input_proj.weight @ h + adapter.input_proj.bias)
        logits = adapter.router.weight @ x
        probs = torch.softmax(logits, dim=-1)
        order = sorted(range(len(probs)), key=lambda e: -float(probs[e].detach()))[: cfg.top_k]
        weights = torch.stack([probs[e] for e in order])
        if renorm:
            weights = weights / weights.sum()
        mixed = torch.zeros_like(x)
        inter = adapter.experts.intermediate_size
        for w, e in zip(weights, order):
            gate = adapter.experts.gate_up_proj[e, :inter] @ x
            up = adapter.experts.gate_up_proj[e, inter:] @ x
            mixed = mixed + w * (adapter.experts.down_proj[e] @ (F.silu(gate) * up))
        if adapter.shared_experts is not None:
            se = adapter.shared_experts
            mixed = mixed + se.down_proj.weight @ (F.silu(se.gate_proj.weight @ x) * (se.up_proj.weight @ x))
        y = adapter.output_proj.weight @ mixed + adapter.output_proj.bias
        y = F.layer_norm(y, y.shape, adapter.output_norm.weight, adapter.output_norm.bias, adapter.output_norm.eps)
        rows.append(y)
        all_logits.append(logits)
        all_ids.append(order)
    return torch.stack(rows), torch.stack(all_logits), torch.tensor(all_ids)


def reference_aux_loss(logits: torch.Tensor, ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Eq. 3 by hand: E * sum_e P_e f_e, P_e mean softmax probability, f_e share of routed slots."""
    probs = torch.softmax(logits.double(), dim=-1)
    total = 0.0
    slots = ids.numel()
    for e in range(num_experts):
        p_e = probs[:, e].mean()
        f_e = float((ids == e).sum()) / slots
        total = total + p_e * f_e
    return num_experts * total


def reference_audio_embeddings(model, windows: torch.Tensor, windows_per_request, tokens_per_request):
    """Encoder on each window alone, request frames concatenated in time, cut to 4 x tokens, reference adapter."""
    out = []
    start = 0
    for w, n in zip(windows_per_request, tokens_per_request):
        if n:
            frames = torch.cat([model.audio_encoder(windows[i:i + 1])[0] for i in range(start, start + w)])
            stack = model.config.adapter_config.stack_factor
            emb, _, _ = reference_adapter(model.adapter, frames[: stack * n])
            out.append(emb)
        start += w
    return torch.cat(out)
