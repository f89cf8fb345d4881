"""Audio input and the Eureka-Audio / Whisper log-mel front end (rules: docs/audio.md#front-end-rules)."""

from .features import (
    FRAMES_PER_TOKEN,
    FRAMES_PER_WINDOW,
    HOP_LENGTH,
    N_FFT,
    PAD_VALUE,
    SAMPLES_PER_TOKEN,
    SAMPLES_PER_WINDOW,
    TOKENS_PER_WINDOW,
    EurekaFeatures,
    audio_token_count,
    eureka_features_batch,
    log_mel,
    mel_filters,
    slaney_mel_filters,
)
from .io import SAMPLE_RATE, AudioError, is_array_rate_pair, load_audio

__all__ = [
    "AudioError", "load_audio", "is_array_rate_pair", "SAMPLE_RATE", "N_FFT", "HOP_LENGTH", "SAMPLES_PER_TOKEN",
    "FRAMES_PER_TOKEN",
    "FRAMES_PER_WINDOW", "SAMPLES_PER_WINDOW", "TOKENS_PER_WINDOW", "PAD_VALUE", "EurekaFeatures",
    "audio_token_count", "log_mel", "eureka_features_batch", "mel_filters", "slaney_mel_filters",
]
