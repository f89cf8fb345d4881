"""eureka_fast: fast, complete, open Eureka-Audio (MoE kernels, audio front end, model, training, DataFlux)."""
__version__ = "0.1.0"

from . import ops  # noqa: F401,E402


def __getattr__(name):
    # Heavier entry points load on first use so `import eureka_fast` stays cheap.
    if name == "EurekaAudio":
        from .inference import EurekaAudio

        return EurekaAudio
    if name == "apply_fast_moe":
        from .integrations.transformers import apply_fast_moe

        return apply_fast_moe
    raise AttributeError(f"module 'eureka_fast' has no attribute {name!r}")
