"""Where a clip comes from: the one loader behind the processor, training and DataFlux. A path (a relative one
resolved against a base directory, `file://` stripped), an http(s) URL (downloaded), a data URI, bytes, an array or an
(array, rate) pair -> 16 kHz float32 mono through `load_audio`."""
from __future__ import annotations

import os
import urllib.error
import urllib.request
from typing import Any

import numpy as np

from .io import SAMPLE_RATE, AudioError, load_audio

__all__ = ["fetch_url", "load_clip"]


def fetch_url(url: str, timeout: float = 30.0) -> bytes:
    """Downloads an http(s) audio URL; a clear error when offline or on an HTTP error."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.read()
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise AudioError(f"{url!r}: could not download the audio ({exc}); without network access pass a local "
                         f"path or a base64 data URI") from exc


def load_clip(source: Any, base_dir: str | None = None, sr: int = SAMPLE_RATE) -> np.ndarray:
    """Mono float32 samples at `sr` (16 kHz) from a path (relative ones resolve against base_dir), an http(s) URL,
    a data URI, bytes, an array or an (array, rate) pair. Failures raise AudioError naming the source."""
    if isinstance(source, (str, os.PathLike)):
        text = os.fspath(source)
        if text.startswith(("http://", "https://")):
            return load_audio(fetch_url(text), sr=sr)
        if text.startswith("file://"):
            text = text[len("file://"):]
        if not text.startswith("data:") and base_dir and not os.path.isabs(text):
            text = os.path.join(base_dir, text)
        return load_audio(text, sr=sr)
    return load_audio(source, sr=sr)
