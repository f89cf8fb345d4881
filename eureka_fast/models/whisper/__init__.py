"""Whisper, split by job: `encoder` (WhisperDims, WhisperEncoder: the audio encoder Eureka-Audio runs),
`decoding` (text decoder, guarded decoding, `WhisperModel.transcribe`) and `checkpoints` (the readers behind
`load_whisper_encoder` / `load_whisper_model`). Every public name is importable from here.
"""
from .checkpoints import (load_whisper_encoder, load_whisper_model, load_whisper_state, read_ctranslate2_model_bin,
                          resolve_whisper_path)
from .decoding import (COMPRESSION_RATIO_THRESHOLD, COMPUTE_TYPES, FALLBACK_TEMPERATURES, FIRST_PASSES,
                       LOGPROB_THRESHOLD, WINDOW_MODES, WhisperDecoder, WhisperModel, WhisperTokenizer, WindowDecoding,
                       compression_ratio, repeated_suffix, trimmed_frames)
from .encoder import WhisperDims, WhisperEncoder, encoder_flops, int8_linears, sinusoids

__all__ = [
    "WhisperDims", "WhisperEncoder", "WhisperDecoder", "WhisperModel", "WhisperTokenizer", "sinusoids",
    "load_whisper_encoder", "load_whisper_model", "load_whisper_state", "resolve_whisper_path",
    "read_ctranslate2_model_bin", "encoder_flops", "compression_ratio", "repeated_suffix", "WindowDecoding",
    "COMPRESSION_RATIO_THRESHOLD", "LOGPROB_THRESHOLD", "FALLBACK_TEMPERATURES", "WINDOW_MODES", "COMPUTE_TYPES",
    "FIRST_PASSES", "trimmed_frames", "int8_linears",
]
