"""Audio input and the Eureka-Audio / Whisper log-mel front end (rules: docs/audio.md#front-end-rules).

Decoding (`load_audio`, `load_clip`, `SAMPLE_RATE`) needs numpy only and loads with the package; the log-mel front end
(torch and the compiled ops) loads on first use, so DataFlux and `eureka-audio --help` import this package cheaply.
"""
from .io import SAMPLE_RATE, AudioError, is_array_rate_pair, load_audio
from .sources import fetch_url, load_clip

_FEATURE_NAMES = (
    "N_FFT", "HOP_LENGTH", "SAMPLES_PER_TOKEN", "FRAMES_PER_TOKEN", "FRAMES_PER_WINDOW", "SAMPLES_PER_WINDOW",
    "TOKENS_PER_WINDOW", "PAD_VALUE", "EurekaFeatures", "audio_token_count", "log_mel", "eureka_features_batch",
    "mel_filters", "slaney_mel_filters",
)

__all__ = ["AudioError", "load_audio", "load_clip", "fetch_url", "is_array_rate_pair", "SAMPLE_RATE",
           *_FEATURE_NAMES]


def __getattr__(name):
    if name in _FEATURE_NAMES or name == "features":
        import importlib

        features = importlib.import_module(".features", __name__)
        return features if name == "features" else getattr(features, name)
    raise AttributeError(f"module 'eureka_fast.audio' has no attribute {name!r}")
