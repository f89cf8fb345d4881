"""Audio reading and encoding for DataFlux.

Clips are read by the project's loader (`eureka_fast.audio.load_audio`: 16 kHz float32 mono; it rejects empty and
non-finite audio); every failure becomes a `ClipReadError` naming the source, which the pipeline records as a rejected
clip instead of crashing.
"""
from __future__ import annotations

import base64
import io
import os

import numpy as np

from ..audio import SAMPLE_RATE, load_audio
from ..audio.io import AudioTooLongError

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


def read_clip_or_reject(source, max_duration: float | None = MAX_CLIP_SECONDS) -> np.ndarray:
    """One clip at 16 kHz through `load_audio`, with any failure (decoders raise many error types) turned into a
    ClipReadError, so that one bad file rejects that clip, not the run. Decoding stops past `max_duration` seconds
    (None: no limit) and the clip is rejected as "audio_too_long"."""
    name = source if isinstance(source, (str, os.PathLike)) else type(source).__name__
    try:
        return load_audio(source, max_duration=max_duration)
    except AudioTooLongError as exc:
        raise ClipReadError(str(exc), "audio_too_long") from exc
    except Exception as exc:
        raise ClipReadError(f"{name}: cannot decode audio ({type(exc).__name__}: {exc})") from exc


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
    if os.path.isfile(root):
        raise NotADirectoryError(f"audio directory {root} is a file, not a directory (give the folder that holds "
                                 "the audio files)")
    if not os.path.isdir(root):
        raise FileNotFoundError(f"audio directory not found: {root}")
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for fn in filenames:
            if fn.lower().endswith(AUDIO_EXTENSIONS):
                found.append(os.path.join(dirpath, fn))
    return sorted(found)
