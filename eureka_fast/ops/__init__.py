"""eureka_fast.ops: Mixture-of-Experts and audio-downsampling ops.

Each op runs on the compiled kernels in ``eureka_fast._C`` (``torch.ops.eureka_fast.*``) when they are built and
on the pure-PyTorch references in ``eureka_fast.ops.reference`` otherwise (with a one-time warning).
``backend()`` says which; ``backend_report(device)`` says, per op, which path runs and why (CUDA kernels run only
where ``cuda_policy`` allows). Pass ``use_reference=True`` to force the reference path.
"""
from .api import (  # noqa: F401
    DOWNSAMPLE_PRESETS,
    MoEPlan,
    backend,
    combine,
    downsample_preset,
    fused_experts,
    grouped_mm,
    moe_aux_loss,
    moe_plan,
    permute,
    route_topk,
    stack_norm_project,
    ultravox_projector_args,
)
from . import reference  # noqa: F401
from .cuda_policy import backend_report  # noqa: F401
