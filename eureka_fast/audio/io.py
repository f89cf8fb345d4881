"""Decoding audio from files, bytes, data URIs and arrays into 16 kHz float32 mono.

Decoding goes through libsndfile (via `soundfile`: WAV PCM 8/16/24/32-bit and IEEE float, FLAC, Ogg/Vorbis/Opus and,
with libsndfile >= 1.1, MP3). Anything libsndfile cannot open (m4a, webm, ...) falls back to an `ffmpeg` subprocess
when the `ffmpeg` executable is on PATH. Resampling uses soxr (band-limited, high quality), never decimation.

Every failure is raised as `AudioError`, whose message names the source (file path, "<bytes>", "<data URI>",
"<array>") and the problem.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import shutil
import struct
import subprocess
from typing import Any

import numpy as np

__all__ = ["AudioError", "load_audio", "SAMPLE_RATE", "MIN_SAMPLE_RATE", "MAX_SAMPLE_RATE"]

SAMPLE_RATE = 16000
# Rates outside this range are not audio anyone records speech at; a header claiming them is corrupt or the caller
# passed the wrong number (e.g. a duration or a sample count instead of a rate).
MIN_SAMPLE_RATE = 1000
MAX_SAMPLE_RATE = 768000


class AudioError(ValueError):
    """Audio could not be loaded or is not usable. The message names the source and the problem."""


def _describe(source: Any) -> str:
    if isinstance(source, (str, os.PathLike)):
        text = os.fspath(source)
        if text.startswith("data:"):
            return "<data URI %s...>" % text[:40]
        return repr(text)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return "<%d bytes>" % len(source)
    return "<array>"


def _check_rate(rate: Any, name: str) -> int:
    try:
        rate_int = int(rate)
    except (TypeError, ValueError):
        raise AudioError("%s: sample rate %r is not an integer" % (name, rate)) from None
    if rate_int != rate or not (MIN_SAMPLE_RATE <= rate_int <= MAX_SAMPLE_RATE):
        raise AudioError(
            "%s: sample rate %r is out of the supported range [%d, %d] Hz"
            % (name, rate, MIN_SAMPLE_RATE, MAX_SAMPLE_RATE)
        )
    return rate_int


def _wav_truncation(head: bytes, file_size: int) -> str | None:
    """For a RIFF/WAVE file, compare the byte count the `data` chunk declares with what the file holds.

    libsndfile silently shortens a truncated WAV to the samples present, which would drop audio without a word; we
    want that reported. Returns a description of the truncation or None. `head` is the start of the file (enough to
    hold the chunk headers before `data`).
    """
    if len(head) < 12 or head[:4] not in (b"RIFF", b"RIFX") or head[8:12] != b"WAVE":
        return None
    endian = "<" if head[:4] == b"RIFF" else ">"
    pos = 12
    while pos + 8 <= len(head):
        chunk_id = head[pos:pos + 4]
        (chunk_size,) = struct.unpack(endian + "I", head[pos + 4:pos + 8])
        if chunk_id == b"data":
            # 0 and 0xFFFFFFFF are the placeholders streaming writers leave when the length is unknown.
            if chunk_size in (0, 0xFFFFFFFF):
                return None
            available = file_size - (pos + 8)
            if available < chunk_size:
                return "truncated: the WAV header declares %d bytes of samples but the file holds %d" % (
                    chunk_size, max(available, 0))
            return None
        pos += 8 + chunk_size + (chunk_size & 1)  # chunks are word aligned
    return None


def _decode_with_ffmpeg(data: bytes | None, path: str | None, name: str, sr: int) -> np.ndarray:
    ffmpeg = shutil.which("ffmpeg")
    if ffmpeg is None:
        raise AudioError("%s: libsndfile cannot decode it and ffmpeg is not installed" % name)
    # ffmpeg decodes, downmixes and resamples in one go; float output avoids a 16-bit requantisation.
    cmd = [ffmpeg, "-nostdin", "-hide_banner", "-loglevel", "error", "-i", path if path is not None else "pipe:0",
           "-f", "f32le", "-ac", "1", "-acodec", "pcm_f32le", "-ar", str(sr), "pipe:1"]
    try:
        proc = subprocess.run(cmd, input=data, capture_output=True, check=False)
    except OSError as exc:
        raise AudioError("%s: running ffmpeg failed: %s" % (name, exc)) from exc
    if proc.returncode != 0:
        message = proc.stderr.decode("utf-8", "replace").strip().splitlines()
        raise AudioError("%s: not decodable audio (ffmpeg: %s)" % (name, message[-1] if message else "failed"))
    return np.frombuffer(proc.stdout, dtype=np.float32).copy()


def _decode(data: bytes | None, path: str | None, name: str, sr: int) -> np.ndarray:
    """Decode a file (path) or an in-memory file (data) to mono float32 at `sr`."""
    import soundfile as sf

    if path is not None:
        if not os.path.exists(path):
            raise AudioError("%s: file not found" % name)
        if os.path.isdir(path):
            raise AudioError("%s: is a directory, not an audio file" % name)
        size = os.path.getsize(path)
        if size == 0:
            raise AudioError("%s: file is empty" % name)
        with open(path, "rb") as fh:
            head = fh.read(65536)
    else:
        size = len(data)
        if size == 0:
            raise AudioError("%s: no bytes to decode (empty)" % name)
        head = data[:65536]
    truncation = _wav_truncation(head, size)
    if truncation:
        raise AudioError("%s: %s" % (name, truncation))

    try:
        samples, rate = sf.read(path if path is not None else io.BytesIO(data), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, TypeError) as exc:
        soundfile_error = str(exc)
        if "lost sync" in soundfile_error or "truncated" in soundfile_error.lower():
            raise AudioError("%s: corrupt or truncated audio (%s)" % (name, soundfile_error)) from exc
        try:
            return _decode_with_ffmpeg(data, path, name, sr)
        except AudioError as ffmpeg_exc:
            raise AudioError("%s: not a readable audio file (libsndfile: %s; %s)"
                             % (name, soundfile_error, str(ffmpeg_exc).split(": ", 1)[-1])) from exc
    rate = _check_rate(rate, name)
    return _to_mono_resampled(samples, rate, sr, name, channels_last=True)


def _to_mono_resampled(samples: np.ndarray, rate: int, sr: int, name: str, *, channels_last: bool) -> np.ndarray:
    if samples.ndim == 2:
        samples = samples.mean(axis=1 if channels_last else 0, dtype=np.float64).astype(np.float32)
    if samples.size == 0:
        raise AudioError("%s: contains zero samples" % name)
    if not np.isfinite(samples).all():
        bad = int((~np.isfinite(samples)).sum())
        raise AudioError("%s: contains %d NaN or infinite samples" % (name, bad))
    if rate != sr:
        import soxr

        samples = soxr.resample(samples, rate, sr, quality="HQ")
    return np.ascontiguousarray(samples, dtype=np.float32)


def _array_to_float(array: Any, name: str) -> np.ndarray:
    try:
        import torch

        if isinstance(array, torch.Tensor):
            array = array.detach().cpu().numpy()
    except ImportError:  # pragma: no cover - torch is a hard dependency, this is only defensive
        pass
    array = np.asarray(array)
    if array.dtype.kind == "i":
        # Integer PCM: full scale of the type maps to [-1, 1), like libsndfile does.
        return array.astype(np.float32) / float(2 ** (8 * array.dtype.itemsize - 1))
    if array.dtype.kind == "u":
        if array.dtype.itemsize != 1:
            raise AudioError("%s: unsigned integer samples of %d bytes are not a PCM format"
                             % (name, array.dtype.itemsize))
        return (array.astype(np.float32) - 128.0) / 128.0  # 8-bit PCM is unsigned with a 128 offset
    if array.dtype.kind == "f":
        return array.astype(np.float32, copy=False)
    raise AudioError("%s: samples of dtype %s are not numeric audio" % (name, array.dtype))


def _from_array(array: Any, rate: Any, sr: int) -> np.ndarray:
    name = "<array>"
    rate = _check_rate(rate, name)
    samples = _array_to_float(array, name)
    if samples.ndim == 1:
        return _to_mono_resampled(samples, rate, sr, name, channels_last=True)
    if samples.ndim == 2:
        # soundfile's layout is [time, channels]; torchaudio's is [channels, time]. A dimension of at most 8
        # next to a longer one is the channel axis.
        if samples.shape[1] <= 8 and samples.shape[0] > samples.shape[1]:
            return _to_mono_resampled(samples, rate, sr, name, channels_last=True)
        if samples.shape[0] <= 8 and samples.shape[1] > samples.shape[0]:
            return _to_mono_resampled(samples, rate, sr, name, channels_last=False)
    raise AudioError("%s: expected samples shaped [time] or [time, channels] / [channels, time] (<= 8 channels), "
                     "got shape %s" % (name, tuple(samples.shape)))


def _from_data_uri(uri: str, sr: int) -> np.ndarray:
    name = _describe(uri)
    header, sep, payload = uri.partition(",")
    if not sep:
        raise AudioError("%s: malformed data URI (no comma before the payload)" % name)
    if not header.endswith(";base64"):
        raise AudioError("%s: only base64 data URIs are supported" % name)
    try:
        data = base64.b64decode(payload, validate=False)
    except (binascii.Error, ValueError) as exc:
        raise AudioError("%s: invalid base64 payload (%s)" % (name, exc)) from exc
    return _decode(data, None, name, sr)


def load_audio(source: Any, sr: int = SAMPLE_RATE) -> np.ndarray:
    """Load audio as a float32 mono numpy array at `sr` Hz.

    `source` is one of:
      - a path (str or os.PathLike): WAV (PCM 8/16/24/32-bit, IEEE float), FLAC, Ogg, MP3, or anything ffmpeg reads;
      - bytes / bytearray / memoryview holding an encoded file;
      - a ``data:audio/...;base64,...`` URI;
      - ``(array, rate)``: samples shaped [time], [time, channels] or [channels, time]; integer arrays are PCM and
        scaled to [-1, 1);
      - a bare 1-D numpy array or torch tensor, taken to be at `sr` already.

    Stereo and multichannel audio is averaged to mono; other rates are resampled with soxr.
    Raises `AudioError` (a ValueError) naming the source and the problem.
    """
    sr = _check_rate(sr, "target")
    if isinstance(source, tuple):
        if len(source) != 2:
            raise AudioError("<array>: expected (array, rate), got a tuple of %d items" % len(source))
        return _from_array(source[0], source[1], sr)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return _decode(bytes(source), None, _describe(source), sr)
    if isinstance(source, (str, os.PathLike)):
        text = os.fspath(source)
        if isinstance(text, bytes):
            text = os.fsdecode(text)
        if text.startswith("data:"):
            return _from_data_uri(text, sr)
        if text.startswith(("http://", "https://")):
            raise AudioError("%r: URLs are not fetched here; download the file and pass its path" % text)
        return _decode(None, text, _describe(text), sr)
    if isinstance(source, np.ndarray) or type(source).__name__ == "Tensor":
        samples = _array_to_float(source, "<array>")
        if samples.ndim != 1:
            raise AudioError("<array>: a bare array must be 1-D mono at %d Hz; pass (array, rate) for other layouts, "
                             "got shape %s" % (sr, tuple(samples.shape)))
        return _to_mono_resampled(samples, sr, sr, "<array>", channels_last=True)
    raise AudioError("%s: unsupported audio source type %s" % (_describe(source), type(source).__name__))
