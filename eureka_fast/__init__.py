"""eureka_fast: fast, complete, open Eureka-Audio (MoE kernels, audio front end, model, training, DataFlux).

Submodules and entry points load on first use, so `import eureka_fast` (and every `eureka-audio` subcommand that
does not need torch) stays cheap.
"""
import importlib

__version__ = "0.1.0"

_LAZY_ATTRS = {
    "EurekaAudio": ("eureka_fast.inference", "EurekaAudio"),
    "apply_fast_moe": ("eureka_fast.integrations.transformers", "apply_fast_moe"),
}
_SUBMODULES = ("ops", "audio", "models", "integrations", "train", "dataflux", "inference")


def __getattr__(name):
    if name in _LAZY_ATTRS:
        module, attr = _LAZY_ATTRS[name]
        return getattr(importlib.import_module(module), attr)
    if name in _SUBMODULES:
        return importlib.import_module(f"eureka_fast.{name}")
    raise AttributeError(f"module 'eureka_fast' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_LAZY_ATTRS) + list(_SUBMODULES))
