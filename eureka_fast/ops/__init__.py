"""eureka_fast.ops: Mixture-of-Experts and audio-downsampling ops, and the Whisper encoder's inference kernels.

Each op runs on the compiled kernels in ``eureka_fast._C`` (``torch.ops.eureka_fast.*``) when they are built and
on the pure-PyTorch references in ``eureka_fast.ops.reference`` otherwise (with a one-time warning).
``backend()`` says which. Pass ``use_reference=True`` to force the reference path. ``eureka_fast.ops.registry``
loads the extension and answers which kernels it has.
"""
from . import attention, mel, packed_linear, reference, registry, rowwise  # noqa: F401
from .api import (  # noqa: F401
    DOWNSAMPLE_PRESETS,
    MoEPlan,
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
from .registry import backend  # noqa: F401

# Load the kernels at import, outside any torch.compile trace, once every op module has handed in its registrations.
registry.load_extension()
