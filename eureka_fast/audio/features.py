"""Log-mel front end: openai-whisper's `log_mel_spectrogram` semantics and the Eureka-Audio windowing on top.

Shared math (both modes): n_fft 400, hop 160, periodic Hann window, reflect padding of 200 samples both sides, power
spectrum, Slaney mel filter bank, log10(max(x, 1e-10)), clamp at (max - 8) with the max over the whole clip,
(x + 4) / 4, last STFT frame dropped.

- mode="whisper": the clip is zero-padded / trimmed to 30 s first (openai-whisper's `pad_or_trim`), giving exactly
  [n_mels, 3000]; the result equals `whisper.log_mel_spectrogram(whisper.pad_or_trim(audio))`.
- mode="eureka": each clip is zero-padded at the end to a multiple of 1280 samples (one audio token = 1280 samples =
  8 mel frames) and gets its own whole-clip max clamp; the clips of one request are concatenated in time and cut into
  3000-frame windows, the last padded with -1.5. Nothing is trimmed: long audio gives more windows.

Mel filters: loaded from openai-whisper's bundled ``assets/mel_filters.npz`` when that package is installed (so the
whisper mode is bit compatible); otherwise computed here with the Slaney formulas librosa uses (equal to the npz to
float32 rounding, see python_tests/audio/test_features.py).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Sequence

import numpy as np
import torch

from ..ops.mel import mel_power
from ..ops.scratch import scratch
from .io import SAMPLE_RATE, AudioError, is_array_rate_pair, load_audio

__all__ = [
    "SAMPLE_RATE", "N_FFT", "HOP_LENGTH", "SAMPLES_PER_TOKEN", "FRAMES_PER_TOKEN", "FRAMES_PER_WINDOW",
    "SAMPLES_PER_WINDOW", "TOKENS_PER_WINDOW", "PAD_VALUE", "EurekaFeatures", "audio_token_count",
    "mel_filters", "slaney_mel_filters", "log_mel", "eureka_features_batch",
]

N_FFT = 400
HOP_LENGTH = 160
SAMPLES_PER_TOKEN = 1280  # 80 ms: the Whisper encoder's 50 Hz frames stacked by 4 -> 12.5 Hz audio tokens
FRAMES_PER_TOKEN = SAMPLES_PER_TOKEN // HOP_LENGTH  # 8 mel frames
FRAMES_PER_WINDOW = 3000  # 30 s, the Whisper encoder's context
SAMPLES_PER_WINDOW = FRAMES_PER_WINDOW * HOP_LENGTH  # 480000
TOKENS_PER_WINDOW = FRAMES_PER_WINDOW // FRAMES_PER_TOKEN  # 375
# Value of padded frames: the official constant (log10 of the 1e-10 floor, -10, normalised as (x + 4) / 4 = -1.5).
PAD_VALUE = -1.5
LOG_FLOOR = 1e-10
DYNAMIC_RANGE = 8.0  # log10 units kept below the clip's max (80 dB)


def audio_token_count(num_samples: int) -> int:
    """Number of audio tokens for a clip of `num_samples` samples at 16 kHz: ceil(num_samples / 1280)."""
    if num_samples < 0:
        raise ValueError("num_samples must be >= 0, got %d" % num_samples)
    return -(-int(num_samples) // SAMPLES_PER_TOKEN)


# ----------------------------------------------------------------------------------------------------------------------
# Mel filter bank


def _hz_to_mel_slaney(hz: np.ndarray) -> np.ndarray:
    # Slaney's auditory toolbox scale: linear below 1 kHz (3 mels per 200/3 Hz), logarithmic above.
    hz = np.asarray(hz, dtype=np.float64)
    linear_step = 200.0 / 3.0
    knee_hz, knee_mel = 1000.0, 1000.0 / (200.0 / 3.0)
    log_step = math.log(6.4) / 27.0
    return np.where(hz >= knee_hz, knee_mel + np.log(np.maximum(hz, 1e-12) / knee_hz) / log_step, hz / linear_step)


def _mel_to_hz_slaney(mel: np.ndarray) -> np.ndarray:
    mel = np.asarray(mel, dtype=np.float64)
    linear_step = 200.0 / 3.0
    knee_hz, knee_mel = 1000.0, 1000.0 / (200.0 / 3.0)
    log_step = math.log(6.4) / 27.0
    return np.where(mel >= knee_mel, knee_hz * np.exp(log_step * (mel - knee_mel)), mel * linear_step)


def slaney_mel_filters(n_mels: int, *, sample_rate: int = SAMPLE_RATE, n_fft: int = N_FFT) -> np.ndarray:
    """Slaney-style, area-normalised triangular mel filters [n_mels, n_fft // 2 + 1] from 0 Hz to Nyquist.

    The same construction as librosa.filters.mel(htk=False, norm="slaney"), which produced openai-whisper's
    mel_filters.npz; computed in float64 and returned as float32.
    """
    fft_freqs = np.linspace(0.0, sample_rate / 2.0, n_fft // 2 + 1)
    mel_points = np.linspace(_hz_to_mel_slaney(0.0), _hz_to_mel_slaney(sample_rate / 2.0), n_mels + 2)
    hz_points = _mel_to_hz_slaney(mel_points)
    widths = np.diff(hz_points)
    distance = hz_points[:, None] - fft_freqs[None, :]
    rising = -distance[:-2] / widths[:-1, None]
    falling = distance[2:] / widths[1:, None]
    weights = np.maximum(0.0, np.minimum(rising, falling))
    weights *= (2.0 / (hz_points[2:] - hz_points[:-2]))[:, None]  # constant area per filter
    return weights.astype(np.float32)


def _whisper_filters_npz() -> str | None:
    try:
        import importlib.util

        spec = importlib.util.find_spec("whisper")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        path = os.path.join(location, "assets", "mel_filters.npz")
        if os.path.exists(path):
            return path
    return None


@lru_cache(maxsize=None)
def _mel_filters_np(n_mels: int) -> np.ndarray:
    path = _whisper_filters_npz()
    if path is not None:
        with np.load(path, allow_pickle=False) as data:
            key = "mel_%d" % n_mels
            if key in data:
                return np.ascontiguousarray(data[key], dtype=np.float32)
    return slaney_mel_filters(n_mels)


@lru_cache(maxsize=None)
def mel_filters(n_mels: int, device: str = "cpu") -> torch.Tensor:
    """Mel filter bank [n_mels, 201] (openai-whisper's bundled one when installed, else computed)."""
    if n_mels <= 0:
        raise ValueError("n_mels must be positive, got %d" % n_mels)
    return torch.from_numpy(_mel_filters_np(n_mels)).to(device)


@lru_cache(maxsize=None)
def _hann_window(device: str) -> torch.Tensor:
    return torch.hann_window(N_FFT, periodic=True, dtype=torch.float32, device=device)


# ----------------------------------------------------------------------------------------------------------------------
# Core spectrogram


def _as_tensor(audio: Any) -> torch.Tensor:
    """A float32 1-D waveform at 16 kHz. Float arrays / tensors are taken as they are (after a finiteness check);
    anything else (integer PCM, paths, bytes, (array, rate), ...) goes through `load_audio`."""
    if isinstance(audio, torch.Tensor) and audio.is_floating_point():
        tensor = audio.detach()
    elif isinstance(audio, np.ndarray) and audio.dtype.kind == "f":
        tensor = torch.from_numpy(np.ascontiguousarray(audio, dtype=np.float32))
    else:
        if isinstance(audio, (torch.Tensor, np.ndarray)) and audio.ndim != 1:
            raise AudioError("<array>: a clip must be a 1-D waveform at 16 kHz, got shape %s" % (tuple(audio.shape),))
        tensor = torch.from_numpy(load_audio(audio))
    if tensor.dim() != 1:
        raise AudioError("<array>: a clip must be a 1-D waveform at 16 kHz, got shape %s" % (tuple(tensor.shape),))
    if tensor.numel() == 0:
        raise AudioError("<array>: clip has zero samples")
    tensor = tensor.to(torch.float32)
    # A sum is finite iff no sample is NaN/inf, unless finite samples overflow it (|x| ~ 1e33, not audio): one
    # reduction instead of a boolean mask over the clip; the exact test decides only when the sum is not finite.
    if not bool(torch.isfinite(tensor.sum())) and not bool(torch.isfinite(tensor).all()):
        raise AudioError("<array>: clip contains NaN or infinite samples")
    return tensor


# Per front-end buffer (eureka_fast.ops.scratch): 16 MB holds the windowed frames of ~80 s of audio; longer clips
# allocate their own.
_SCRATCH_MAX_BYTES = 16 << 20


def _padded_signal(waveform: torch.Tensor, length: int, pad: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """The waveform zero-padded at the end to `length` samples, then reflect-padded by `pad` on both sides (edge
    sample not repeated, as F.pad(mode="reflect")), built in one buffer (`out`, [length + 2 pad], when given): no
    intermediate zero-padded copy, and plain copies instead of ATen's reflection-pad kernel, which is several times
    slower on a long 1-D signal."""
    n = waveform.numel()
    if out is None:
        out = torch.empty(length + 2 * pad, dtype=waveform.dtype, device=waveform.device)
    out[pad:pad + n] = waveform
    out[pad + n:pad + length].zero_()
    out[:pad] = out[pad + 1:2 * pad + 1].flip(0)
    out[pad + length:] = out[length - 1:length + pad - 1].flip(0)
    return out


def _log10_mel(waveform: torch.Tensor, n_mels: int, length: int | None = None) -> torch.Tensor:
    """log10(max(mel power, 1e-10)) [n_mels, length // 160] of the waveform zero-padded to `length` samples (default:
    its own length), last STFT frame dropped. No clamp, no scaling yet.

    Equal to torch.stft(center=True, reflect, periodic Hann) -> |.|^2 -> mel, computed frame-major: the frames are
    strided views of the padded signal and the dropped last frame is never transformed; |z|^2 -> mel -> floor is one
    pass of eureka_fast.ops.mel.mel_power (the compiled kernel, or its PyTorch reference without the extension).
    """
    length = waveform.numel() if length is None else length
    if length <= N_FFT // 2 or length < waveform.numel():
        raise AudioError("<array>: cannot take a 400-point STFT with reflect padding of %d samples padded to %d"
                         % (waveform.numel(), length))
    device = str(waveform.device)
    num_frames = length // HOP_LENGTH  # 1 + length // 160 STFT frames, minus the dropped last one
    padded_buf, windowed_buf = (scratch("log_mel." + name, shape, waveform.dtype, waveform.device, _SCRATCH_MAX_BYTES)
                                for name, shape in (("padded", (length + N_FFT,)), ("windowed", (num_frames, N_FFT))))
    padded = _padded_signal(waveform, length, N_FFT // 2, out=padded_buf)
    frames = padded.unfold(0, N_FFT, HOP_LENGTH)[:num_frames]
    windowed = torch.mul(frames, _hann_window(device), out=windowed_buf)
    # not rfft(out=): that computes into a fresh tensor and copies it over (a 4.8 MB copy per 30 s)
    spectrum = torch.fft.rfft(windowed, dim=-1)  # [F, 201] complex
    return mel_power(spectrum, mel_filters(n_mels, device), LOG_FLOOR).log10_()


def _clamp_and_scale_(log_spec: torch.Tensor) -> torch.Tensor:
    floor = log_spec.max() - DYNAMIC_RANGE
    return log_spec.clamp_(min=floor).add_(4.0).div_(4.0)


def _whisper_log_mel(audio: Any, n_mels: int) -> torch.Tensor:
    waveform = _as_tensor(audio)[:SAMPLES_PER_WINDOW]  # pad_or_trim: longer audio is cut, shorter zero-padded
    return _clamp_and_scale_(_log10_mel(waveform, n_mels, SAMPLES_PER_WINDOW))


def _eureka_clip(waveform: torch.Tensor, n_mels: int) -> tuple[torch.Tensor, int]:
    """One clip -> ([n_mels, 8 N] normalised log-mel, N) with N = ceil(len / 1280)."""
    tokens = audio_token_count(waveform.numel())
    return _clamp_and_scale_(_log10_mel(waveform, n_mels, tokens * SAMPLES_PER_TOKEN)), tokens


def _window_count(total_frames: int) -> int:
    return max(1, -(-total_frames // FRAMES_PER_WINDOW))


def _window(frames: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """[n_mels, F] -> [ceil(F / 3000), n_mels, 3000], the tail padded with PAD_VALUE, written into `out` when given
    (a batch's preallocated windows): each element is written once, no full() of the whole tensor first."""
    n_mels, total = frames.shape
    windows = _window_count(total)
    if out is None:
        out = torch.empty((windows, n_mels, FRAMES_PER_WINDOW), dtype=frames.dtype, device=frames.device)
    # Window w holds frames [3000 w, 3000 (w + 1)): write them through a [n_mels, W, 3000] view of `out`.
    flat = out.transpose(0, 1)  # [n_mels, W, 3000], a view
    full = total // FRAMES_PER_WINDOW
    if full:
        flat[:, :full] = frames[:, :full * FRAMES_PER_WINDOW].reshape(n_mels, full, FRAMES_PER_WINDOW)
    rest = total - full * FRAMES_PER_WINDOW
    if full < windows:  # a last, partial window
        flat[:, full, :rest] = frames[:, full * FRAMES_PER_WINDOW:]
        flat[:, full, rest:] = PAD_VALUE
    return out


@dataclass
class EurekaFeatures:
    """Windows of one request: `windows` [W, n_mels, 3000], `token_counts` per clip, `num_frames` = 8 * sum."""

    windows: torch.Tensor
    token_counts: list[int]
    num_frames: int

    @property
    def num_tokens(self) -> int:
        return sum(self.token_counts)


def _eureka_frames(clips: Sequence[Any], n_mels: int, where: str = "") -> tuple[torch.Tensor, list[int]]:
    """One request's clips -> (their log-mels concatenated in time [n_mels, F], tokens per clip); `where` prefixes
    error messages (e.g. "requests[3] " in a batch)."""
    if len(clips) == 0:
        raise AudioError("<request>: no audio clips given")
    per_clip = []
    counts = []
    for index, clip in enumerate(clips):
        try:
            features, tokens = _eureka_clip(_as_tensor(clip), n_mels)
        except AudioError as exc:
            if len(clips) == 1 and not where:
                raise
            # Say which clip: "<array>" alone does not tell the caller which of several arrays was bad.
            raise AudioError("%sclips[%d] (of %d): %s" % (where, index, len(clips), exc)) from exc
        per_clip.append(features)
        counts.append(tokens)
    return (per_clip[0] if len(per_clip) == 1 else torch.cat(per_clip, dim=1)), counts


def _eureka_request(clips: Sequence[Any], n_mels: int, where: str = "") -> EurekaFeatures:
    """Features of one request's clips; `where` prefixes error messages (e.g. "requests[3] " in a batch)."""
    frames, counts = _eureka_frames(clips, n_mels, where)
    return EurekaFeatures(windows=_window(frames), token_counts=counts, num_frames=frames.shape[1])


def _check_n_mels(n_mels: int) -> None:
    if n_mels not in (80, 128):
        raise ValueError("n_mels must be 80 or 128 (the Whisper front ends), got %r" % (n_mels,))


def log_mel(audio: Any, n_mels: int = 80, *, mode: str = "eureka"):
    """Log-mel features.

    audio: a 1-D float waveform at 16 kHz (numpy / torch) or anything `load_audio` accepts; in "eureka" mode also a
      list of clips belonging to ONE request (they are concatenated in time).
    mode="whisper": one clip -> Tensor [n_mels, 3000] (openai-whisper pad_or_trim + log_mel_spectrogram).
    mode="eureka": -> EurekaFeatures(windows [W, n_mels, 3000], token_counts, num_frames).
    """
    _check_n_mels(n_mels)
    with torch.no_grad():
        if mode == "whisper":
            if isinstance(audio, list):
                raise ValueError("mode='whisper' takes one clip, got a list; use mode='eureka' for several clips")
            return _whisper_log_mel(audio, n_mels)
        if mode == "eureka":
            clips = audio if isinstance(audio, list) else [audio]
            return _eureka_request(clips, n_mels)
    raise ValueError("mode must be 'eureka' or 'whisper', got %r" % (mode,))


def eureka_features_batch(requests: Sequence[Sequence[Any]], n_mels: int = 80):
    """Eureka features for a batch of requests (each a list of clips).

    Returns (windows [sum W, n_mels, 3000], windows_per_request list[int], token_counts list[list[int]]).
    """
    _check_n_mels(n_mels)
    frames, counts = [], []
    with torch.no_grad():
        for index, request in enumerate(requests):
            # A request is a list (or tuple) of clips, or one clip: an array, a path, bytes or an (array, rate) pair.
            clips = request if isinstance(request, (list, tuple)) and not is_array_rate_pair(request) else [request]
            request_frames, request_counts = _eureka_frames(list(clips), n_mels,
                                                            where="requests[%d] " % index if len(requests) > 1 else "")
            frames.append(request_frames)
            counts.append(request_counts)
        per_request = [_window_count(f.shape[1]) for f in frames]
        # The batch's windows are allocated once and each request writes its own, instead of a full() per request
        # and a cat over all of them (bench/RESULTS.md, audio history).
        windows = torch.empty((sum(per_request), n_mels, FRAMES_PER_WINDOW))
        start = 0
        for request_frames, count in zip(frames, per_request):
            _window(request_frames, out=windows[start:start + count])
            start += count
    return windows, per_request, counts

