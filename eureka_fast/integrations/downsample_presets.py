"""Downsampler presets of published audio LLMs (Eureka-Audio, Voxtral, Ultravox, Qwen2-Audio) on
``eureka_fast.ops.stack_norm_project``, and ``ultravox_projector_args`` to run a real Ultravox projector on it. They
know other projects' models, so they live here rather than in ops (``eureka_fast.ops`` re-exports them).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from ..ops.checks import check_int, check_tensor

__all__ = ["DOWNSAMPLE_PRESETS", "downsample_preset", "ultravox_projector_args"]


# Presets of the downsamplers used by published audio LLMs: name -> keyword arguments of stack_norm_project
# (weights excluded) plus "mlp" (a second Linear) and "bias" (whether the Linears have biases). Checked against:
# - eureka: our adapter (models/adapter.py MoEAdapter.fuse; docs/model.md: stack 4, conv1d-equivalent): nn.LayerNorm +
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
    check_int(stack_factor, "stack_factor", 1)
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
        return check_tensor(hits[0], name, floating=True).detach()

    ln_pre, w1, w2 = find("ln_pre.weight"), find("linear_1.weight"), find("linear_2.weight")
    ln_mid, ln_post = find("ln_mid.weight", False), find("ln_post.weight", False)
    for name in ("linear_1.bias", "linear_2.bias"):
        if find(name, False) is not None:
            raise ValueError(f"projector has {name!r}, but Ultravox's linears have no bias")
    if (ln_mid is None) == (ln_post is None):
        raise ValueError("projector must have exactly one of 'ln_mid.weight' (v0.5+) and 'ln_post.weight' (v0.4.1-)")
    check_tensor(ln_pre, "ln_pre.weight", dim=1)
    check_tensor(w1, "linear_1.weight", dim=2)
    check_tensor(w2, "linear_2.weight", dim=2)
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
