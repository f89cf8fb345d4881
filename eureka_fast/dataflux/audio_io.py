"""Audio loading and encoding for DataFlux.

Loading goes through `eureka_fast.audio.load_audio` (the project's loader) when it is available, and falls back to
soundfile + soxr otherwise, so DataFlux keeps working in builds without the audio part. Every failure becomes a
`ClipReadError` naming the source, which the pipeline records as a rejected clip instead of crashing.
"""
from __future__ import annotations

import base64
import io
import os

import numpy as np

SAMPLE_RATE = 16000
# Longest clip DataFlux decodes (seconds). A longer file is rejected as "audio_too_long" as soon as decoding passes
# this, so a small compressed file that decodes to hours costs no more than this much audio in time and memory.
MAX_CLIP_SECONDS = 1800.0
AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".mp3", ".opus", ".m4a", ".aiff", ".aif")


class ClipReadError(ValueError):
    """An audio clip could not be read or decoded; the message names the source and the problem, `reason` the kind
    of failure for rejected/ ("unreadable_audio", or "audio_too_long" past the maximum duration)."""

    def __init__(self, message: str, reason: str = "unreadable_audio"):
        super().__init__(message)
        self.reason = reason


def _load_with_soundfile(source, sr: int, max_duration: float | None = None) -> np.ndarray:
    import soundfile as sf
    import soxr

    if isinstance(source, tuple):
        data, rate = source
        data = np.asarray(data, dtype=np.float32)
    else:
        handle = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else os.fspath(source)
        with sf.SoundFile(handle) as fh:
            rate = fh.samplerate
            limit = -1 if max_duration is None else int(max_duration * rate) + 1
            data = fh.read(frames=limit, dtype="float32", always_2d=True).mean(axis=1)
    if data.ndim > 1:
        data = data.mean(axis=1) if data.shape[1] <= 8 else data.mean(axis=0)
    if int(rate) != sr:
        data = soxr.resample(data, int(rate), sr)
    return np.ascontiguousarray(data, dtype=np.float32)


def load_clip(source, sr: int = SAMPLE_RATE, max_duration: float | None = MAX_CLIP_SECONDS) -> np.ndarray:
    """Load one clip as float32 mono at `sr`. Raises ClipReadError for unreadable, empty, non-finite or (past
    `max_duration` seconds; None for no limit) too long audio."""
    name = source if isinstance(source, (str, os.PathLike)) else type(source).__name__
    try:
        try:
            from eureka_fast.audio import load_audio  # the project loader, when this build has it
        except ImportError:
            load_audio = None
        if load_audio is not None:
            audio = load_audio(source, sr=sr, max_duration=max_duration)
        else:
            audio = _load_with_soundfile(source, sr, max_duration)
    except ClipReadError:
        raise
    except Exception as exc:  # decoder errors come in many types (RuntimeError, LibsndfileError, AudioError, ...)
        if type(exc).__name__ == "AudioTooLongError":
            raise ClipReadError(str(exc), "audio_too_long") from exc
        raise ClipReadError(f"{name}: cannot decode audio ({type(exc).__name__}: {exc})") from exc
    audio = np.asarray(audio, dtype=np.float32).reshape(-1)
    if max_duration is not None and audio.size > max_duration * sr:
        raise ClipReadError(f"{name}: longer than the maximum duration of {max_duration:g} s", "audio_too_long")
    if audio.size == 0:
        raise ClipReadError(f"{name}: audio is empty")
    if not np.all(np.isfinite(audio)):
        raise ClipReadError(f"{name}: audio contains NaN or infinite samples")
    return audio


def wav_bytes(audio: np.ndarray, sr: int = SAMPLE_RATE) -> bytes:
    """16-bit PCM WAV bytes of a float clip (what OpenAI-compatible `input_audio` expects)."""
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, np.clip(audio, -1.0, 1.0), sr, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def wav_base64(audio: np.ndarray, sr: int = SAMPLE_RATE) -> str:
    return base64.b64encode(wav_bytes(audio, sr)).decode("ascii")


def list_audio_files(audio_dir) -> list[str]:
    """Audio files under `audio_dir`, recursively, sorted so ids and order are stable across runs."""
    root = os.fspath(audio_dir)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"audio directory not found: {root}")
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for fn in filenames:
            if fn.lower().endswith(AUDIO_EXTENSIONS):
                found.append(os.path.join(dirpath, fn))
    return sorted(found)
