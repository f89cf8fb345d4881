"""Eureka-Audio model, processor and Whisper encoder.

The transformers-based classes load on first use, so `from eureka_fast.models.whisper import ...` stays light.
"""
_EXPORTS = {
    "EurekaAudioConfig": "configuration_eureka",
    "EurekaAudioEncoderConfig": "configuration_eureka",
    "EurekaAdapterConfig": "configuration_eureka",
    "EurekaAudioForCausalLM": "modeling_eureka",
    "EurekaAudioCausalLMOutput": "modeling_eureka",
    "AudioInputError": "modeling_eureka",
    "MoEAdapter": "adapter",
    "DenseAdapter": "adapter",
    "EurekaAudioProcessor": "processing_eureka",
    "MessageFormatError": "processing_eureka",
    "build_tiny_tokenizer": "processing_eureka",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        import importlib

        module = importlib.import_module(f".{_EXPORTS[name]}", __name__)
        return getattr(module, name)
    raise AttributeError(f"module 'eureka_fast.models' has no attribute {name!r}")
