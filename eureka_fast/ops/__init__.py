"""eureka_fast.ops: Mixture-of-Experts and audio-downsampling ops, and the Whisper encoder's inference kernels.

Each op runs on the compiled kernels in ``eureka_fast._C`` (``torch.ops.eureka_fast.*``) when they are built and
on the pure-PyTorch references in ``eureka_fast.ops.reference`` otherwise (with a one-time warning).
``backend()`` says which; ``backend_report(device)`` says, per op, which path runs and why (CUDA kernels run only
where ``cuda_policy`` allows). Pass ``use_reference=True`` to force the reference path.

Modules: ``registry`` (loading the extension, which kernels it has, the kernel-or-reference decision), ``cuda_policy``
(which CUDA kernel paths are validated on hardware or opted in), ``moe``
(routing, plan, permute, combine, grouped GEMM, fused experts), ``stack_norm_project`` (the downsampler),
``attention``, ``rowwise`` and ``packed_linear`` (the Whisper encoder's kernels), ``mel`` (the log-mel front end's
power -> mel step), ``reference`` (the pure-PyTorch references), ``checks`` and ``activations`` (shared by the ops).
"""
from . import attention, mel, packed_linear, reference, registry, rowwise  # noqa: F401
from .moe import MoEPlan, combine, fused_experts, grouped_mm, moe_aux_loss, moe_plan, permute, route_topk  # noqa: F401
from .cuda_policy import backend_report  # noqa: F401
from .registry import backend  # noqa: F401
from .stack_norm_project import stack_norm_project  # noqa: F401

# Published models' downsampler presets live in eureka_fast.integrations (they know other projects' models); they
# stay reachable here, loaded on first use so that importing ops does not import the layer above it.
_PRESET_NAMES = ("DOWNSAMPLE_PRESETS", "downsample_preset", "ultravox_projector_args")


def __getattr__(name):
    if name in _PRESET_NAMES:
        from ..integrations import downsample_presets

        return getattr(downsample_presets, name)
    raise AttributeError(f"module 'eureka_fast.ops' has no attribute {name!r}")


# Load the kernels at import, outside any torch.compile trace, once every op module has handed in its registrations.
registry.load_extension()
