"""Decoding audio from files, bytes, data URIs and arrays into 16 kHz float32 mono.

Decoding goes through libsndfile (via `soundfile`: WAV PCM 8/16/24/32-bit and IEEE float, FLAC, Ogg/Vorbis/Opus and,
with libsndfile >= 1.1, MP3). Anything libsndfile cannot open (m4a, webm, ...) falls back to an `ffmpeg` subprocess
(the `ffmpeg` on PATH, else the one the imageio-ffmpeg wheel ships). Resampling uses soxr (band-limited, high
quality), never decimation.

Every failure is raised as `AudioError`, whose message names the source (file path, "<bytes, N bytes>",
"<data URI ...>", "<array>") and the problem. A file cut short is reported where its container states its length
(WAV, FLAC, Ogg, MP3 with a Xing/Info or VBRI header); a constant-bitrate MP3 without such a header states no length,
so a cut one decodes to the frames that remain (see `_declared_length`).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import io
import math
import numbers
import os
import re
import shutil
import struct
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from typing import Any, BinaryIO

import numpy as np

__all__ = ["AudioError", "AudioTooLongError", "load_audio", "is_array_rate_pair", "is_sample_rate", "SAMPLE_RATE",
           "MIN_SAMPLE_RATE", "MAX_SAMPLE_RATE"]

SAMPLE_RATE = 16000
# Rates outside this range are not audio anyone records speech at; a header claiming them is corrupt or the caller
# passed the wrong number (e.g. a duration or a sample count instead of a rate).
MIN_SAMPLE_RATE = 1000
MAX_SAMPLE_RATE = 768000
# Floating-point samples may exceed full scale a little (unclipped mixes); beyond this (60 dB over) they are garbage.
MAX_ABS_SAMPLE = 1000.0


class AudioError(ValueError):
    """Audio could not be loaded or is not usable. The message names the source and the problem."""


class AudioTooLongError(AudioError):
    """The source is longer than the `max_duration` the caller allowed (decoding stopped at the limit)."""


def _describe(source: Any) -> str:
    if isinstance(source, (str, os.PathLike)):
        text = os.fspath(source)
        if text.startswith("data:"):
            return "<data URI %s...>" % text[:40]
        return repr(text)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return "<bytes, %d bytes>" % len(source)
    return "<array>"


def is_sample_rate(value: Any) -> bool:
    """Whether `value` is a scalar number (the rate of an ``(array, rate)`` pair), as opposed to an array or a clip."""
    if isinstance(value, (bool, np.bool_)):
        return False
    if isinstance(value, numbers.Real):  # int, float, numpy integer and floating scalars
        return True
    if isinstance(value, np.ndarray):
        return value.ndim == 0 and value.dtype.kind in "iuf"
    if type(value).__name__ == "Tensor":
        import torch

        return value.dim() == 0 and not value.dtype.is_complex and value.dtype != torch.bool
    return False


def is_array_rate_pair(item: Any) -> bool:
    """Whether `item` is one clip given as ``(samples, sample_rate)`` rather than a tuple of clips."""
    return isinstance(item, tuple) and len(item) == 2 and is_sample_rate(item[1]) and not is_sample_rate(item[0])


def _check_rate(rate: Any, name: str) -> int:
    if isinstance(rate, (bool, np.bool_)):
        raise AudioError("%s: sample rate %r is not a number" % (name, rate))
    try:
        rate_float = float(rate)
    except (TypeError, ValueError, OverflowError):
        shape = getattr(rate, "shape", None)
        what = "an array of shape %s" % (tuple(shape),) if shape is not None else "a %s" % type(rate).__name__
        raise AudioError("%s: sample rate must be a number of Hz, got %s" % (name, what)) from None
    if not math.isfinite(rate_float):
        raise AudioError("%s: sample rate %r is not a finite number" % (name, rate))
    if rate_float != math.floor(rate_float):
        raise AudioError("%s: sample rate %r is not a whole number of Hz" % (name, rate))
    if not (MIN_SAMPLE_RATE <= rate_float <= MAX_SAMPLE_RATE):
        raise AudioError(
            "%s: sample rate %r is out of the supported range [%d, %d] Hz"
            % (name, rate, MIN_SAMPLE_RATE, MAX_SAMPLE_RATE)
        )
    return int(rate_float)


# ----------------------------------------------------------------------------------------------------------------------
# Truncation: what the container says the length is, checked against what was decoded.
#
# Decoders shorten a cut file to whatever is left (libsndfile for WAV and MP3, ffmpeg for everything) with at most a
# warning on stderr, which would drop audio without a word. Where the container states its length up front we compare:
# the WAV `data` chunk size, FLAC's STREAMINFO sample count, and an MP3's Xing/Info or VBRI frame count (with the LAME
# tag's encoder delay and padding). Ogg states no total length before its last page, but every page states its own
# size and the last page carries an end-of-stream flag, so a cut Ogg file is recognised from its page structure.
# A constant-bitrate MP3 without a Xing/Info header (e.g. `ffmpeg -write_xing 0`, many streaming captures) states no
# length anywhere: a cut one cannot be told from a short one and decodes to the frames that are present.


@dataclass
class _DeclaredLength:
    samples: int  # per channel, at `rate`
    rate: int
    source: str  # which header said so, for the message
    slack: int  # samples the decode may fall short by without the file being cut (decoder delay, partial frames)


def _read_at(fh: BinaryIO, offset: int, count: int) -> bytes:
    fh.seek(offset)
    return fh.read(count)


def _skip_id3v2(fh: BinaryIO) -> int:
    """Offset just past a leading ID3v2 tag (MP3s, and some FLACs, start with one), or 0."""
    header = _read_at(fh, 0, 10)
    if len(header) == 10 and header[:3] == b"ID3" and all(b < 0x80 for b in header[6:10]):
        size = (header[6] << 21) | (header[7] << 14) | (header[8] << 7) | header[9]  # "syncsafe": 7 bits a byte
        return 10 + size + (10 if header[5] & 0x10 else 0)  # a footer repeats the header
    return 0


def _wav_declared(fh: BinaryIO, file_size: int) -> tuple[_DeclaredLength, int] | None:
    """For a RIFF/WAVE file: (the sample count its `data` chunk declares, the whole samples the file holds)."""
    head = _read_at(fh, 0, 65536)
    if len(head) < 12 or head[:4] not in (b"RIFF", b"RIFX") or head[8:12] != b"WAVE":
        return None
    endian = "<" if head[:4] == b"RIFF" else ">"
    block_align = 0
    pos = 12
    while pos + 8 <= len(head):
        chunk_id = head[pos:pos + 4]
        (chunk_size,) = struct.unpack(endian + "I", head[pos + 4:pos + 8])
        if chunk_id == b"fmt " and pos + 24 <= len(head):
            (rate,) = struct.unpack(endian + "I", head[pos + 12:pos + 16])
            (block_align,) = struct.unpack(endian + "H", head[pos + 20:pos + 22])
        if chunk_id == b"data":
            # 0 and 0xFFFFFFFF are the placeholders streaming writers leave when the length is unknown.
            if chunk_size in (0, 0xFFFFFFFF) or block_align == 0:
                return None
            available = max(file_size - (pos + 8), 0)
            declared = _DeclaredLength(chunk_size // block_align, rate, "WAV data chunk", 0)
            return declared, min(available, chunk_size) // block_align
        pos += 8 + chunk_size + (chunk_size & 1)  # chunks are word aligned
    return None


def _flac_declared(fh: BinaryIO) -> _DeclaredLength | None:
    start = _skip_id3v2(fh)
    head = _read_at(fh, start, 42)
    # "fLaC", then the STREAMINFO block (type 0, always first): 4-byte block header, 34 bytes of data.
    if len(head) < 42 or head[:4] != b"fLaC" or head[4] & 0x7F != 0:
        return None
    (packed,) = struct.unpack(">Q", head[18:26])  # rate:20 channels-1:3 bits-1:5 total samples:36
    rate, total = packed >> 44, packed & ((1 << 36) - 1)
    if total == 0 or rate == 0:  # 0: unknown (a stream written without seeking back)
        return None
    return _DeclaredLength(total, rate, "FLAC STREAMINFO", 0)


_MP3_RATES = {3: (44100, 48000, 32000), 2: (22050, 24000, 16000), 0: (11025, 12000, 8000)}  # by MPEG version bits


def _mp3_declared(fh: BinaryIO) -> _DeclaredLength | None:
    """The length an MP3's first frame declares in a Xing/Info (with LAME tag) or VBRI header, or None."""
    start = _skip_id3v2(fh)
    head = _read_at(fh, start, 4096)
    for pos in range(max(len(head) - 200, 0)):
        if head[pos] != 0xFF or head[pos + 1] & 0xE0 != 0xE0:
            continue
        version, layer = (head[pos + 1] >> 3) & 3, (head[pos + 1] >> 1) & 3
        rate_index = (head[pos + 2] >> 2) & 3
        if version == 1 or layer == 0 or rate_index == 3 or (head[pos + 2] >> 4) in (0, 15):
            continue  # reserved values: not a frame header
        break
    else:
        return None
    rate = _MP3_RATES[version][rate_index]
    samples_per_frame = {3: 384, 2: 1152}.get(layer, 1152 if version == 3 else 576)  # layer bits: 3 = I, 1 = III
    mono = (head[pos + 3] >> 6) == 3
    side_info = (17 if mono else 32) if version == 3 else (9 if mono else 17)
    xing = pos + 4 + side_info
    if head[xing:xing + 4] in (b"Xing", b"Info"):
        (flags,) = struct.unpack(">I", head[xing + 4:xing + 8])
        if not flags & 1:
            return None  # no frame count
        (frames,) = struct.unpack(">I", head[xing + 8:xing + 12])
        lame = xing + 8 + 4 * bool(flags & 1) + 4 * bool(flags & 2) + 100 * bool(flags & 4) + 4 * bool(flags & 8)
        tag = head[lame:lame + 24]
        delay = padding = 0
        if len(tag) == 24 and tag[:4].isalnum():
            # LAME tag: 9-byte encoder name, ..., then 12 bits encoder delay and 12 bits padding at byte 21. Gapless
            # decoders (mpg123, ffmpeg) drop exactly these.
            delay, padding = (tag[21] << 4) | (tag[22] >> 4), ((tag[22] & 0x0F) << 8) | tag[23]
            slack = samples_per_frame
        else:
            slack = 2 * samples_per_frame  # a decoder may or may not drop its own delay
        return _DeclaredLength(frames * samples_per_frame - delay - padding, rate, "MP3 Xing/Info header", slack)
    vbri = pos + 4 + 32
    if head[vbri:vbri + 4] == b"VBRI":
        (frames,) = struct.unpack(">I", head[vbri + 14:vbri + 18])
        return _DeclaredLength(frames * samples_per_frame, rate, "MP3 VBRI header", 2 * samples_per_frame + 2048)
    return None


def _ogg_truncation(fh: BinaryIO, file_size: int) -> str | None:
    """Walk an Ogg file's pages: a page running past the end of the file, or a last page without the end-of-stream
    flag, means the file was cut. Returns a description, or None (not Ogg, or complete)."""
    pos, last_flags = 0, None
    while pos < file_size:
        header = _read_at(fh, pos, 27)
        if len(header) < 27:
            return "truncated: the Ogg file ends inside a page header at byte %d" % pos
        if header[:4] != b"OggS":
            return None  # not Ogg, or corrupt in a way the decoder will report
        segments = header[26]
        table = _read_at(fh, pos + 27, segments)
        page_size = 27 + segments + sum(table)
        if len(table) < segments or pos + page_size > file_size:
            return ("truncated: the Ogg page at byte %d needs %d bytes but the file ends after %d"
                    % (pos, page_size, file_size - pos))
        last_flags = header[5]
        pos += page_size
    if last_flags is not None and not last_flags & 0x04:
        return "truncated: the Ogg stream ends without its end-of-stream page"
    return None


def _declared_length(fh: BinaryIO, file_size: int, name: str) -> _DeclaredLength | None:
    """The length the container declares, for checking the decode against. Raises AudioError at once where the
    container's structure alone shows the file is cut (WAV data chunk longer than the file, Ogg page cut off)."""
    magic = _read_at(fh, 0, 4)
    if magic in (b"RIFF", b"RIFX"):
        wav = _wav_declared(fh, file_size)
        if wav is not None and wav[1] < wav[0].samples:
            raise AudioError("%s: file is truncated (expected %d samples per channel from the %s, the file holds %d)"
                             % (name, wav[0].samples, wav[0].source, wav[1]))
        return None  # libsndfile reads what the data chunk declares
    if magic == b"OggS":
        problem = _ogg_truncation(fh, file_size)
        if problem:
            raise AudioError("%s: file is %s" % (name, problem))
        return None
    return _flac_declared(fh) or _mp3_declared(fh)


def _check_complete(declared: _DeclaredLength | None, decoded: int, decoded_rate: int, name: str) -> None:
    if declared is None:
        return
    # ffmpeg hands back samples already resampled to `decoded_rate`: compare at the declared rate.
    got = decoded if decoded_rate == declared.rate else int(round(decoded * declared.rate / decoded_rate))
    if got < declared.samples - declared.slack:
        raise AudioError("%s: file is truncated or corrupt (expected %d samples per channel at %d Hz from the %s, "
                         "got %d)" % (name, declared.samples, declared.rate, declared.source, got))


# ----------------------------------------------------------------------------------------------------------------------
# Decoding


class _BackendFailed(Exception):
    """A decoder could not decode the input; the message is its short reason."""


# libmpg123 (libsndfile's MP3 decoder) prints notes such as "Illegal Audio-MPEG-Header" and "Xing stream size off"
# straight to the process's stderr. They are either reported properly by us (truncation, not audio) or harmless, so
# while libsndfile decodes something that may be MP3 the C-level stderr goes to a temporary file; lines that are not
# decoder chatter (another thread's output) are written back afterwards. One decode at a time may redirect.
_STDERR_LOCK = threading.Lock()
_DECODER_CHATTER = re.compile(r"^\s*(Note|Warning|Error|\[[^\]]*(mpg123|libmpg123)[^\]]*\])\b|mpg123", re.IGNORECASE)


@contextlib.contextmanager
def _decoder_stderr_silenced(enabled: bool):
    if not enabled:
        yield
        return
    with _STDERR_LOCK:
        try:
            saved = os.dup(2)
        except OSError:  # no stderr at all: nothing to silence
            yield
            return
        with tempfile.TemporaryFile() as capture:
            os.dup2(capture.fileno(), 2)
            try:
                yield
            finally:
                os.dup2(saved, 2)
                os.close(saved)
                capture.seek(0)
                text = capture.read().decode("utf-8", "replace")
        other = [line for line in text.splitlines() if line.strip() and not _DECODER_CHATTER.search(line)]
        if other:
            os.write(2, ("\n".join(other) + "\n").encode())


FFMPEG_TIMEOUT_S = 120.0  # a decode that takes longer than this is stuck on corrupt input, not working


def ffmpeg_executable() -> str | None:
    """`ffmpeg` on PATH, else the static build the imageio-ffmpeg wheel ships (the `audio` extra), else None."""
    found = shutil.which("ffmpeg")
    if found is None:
        try:
            import imageio_ffmpeg

            found = imageio_ffmpeg.get_ffmpeg_exe()
        except (ImportError, RuntimeError, OSError):
            return None
    return found


def _decode_with_ffmpeg(data: bytes | None, path: str | None, sr: int, max_duration: float | None = None
                        ) -> np.ndarray:
    ffmpeg = ffmpeg_executable()
    if ffmpeg is None:
        raise _BackendFailed("ffmpeg: not installed (pip install imageio-ffmpeg, or a system ffmpeg)")
    # ffmpeg decodes, downmixes and resamples in one go; float output avoids a 16-bit requantisation.
    source = path if path is not None else "pipe:0"
    cmd = [ffmpeg, "-nostdin", "-hide_banner", "-loglevel", "error", "-i", source,
           "-f", "f32le", "-ac", "1", "-acodec", "pcm_f32le", "-ar", str(sr)]
    if max_duration is not None:
        # stop decoding just past the limit, so that the caller can tell "too long" without decoding hours
        cmd += ["-t", "%.6f" % (max_duration + 2.0 / sr)]
    cmd.append("pipe:1")
    try:
        proc = subprocess.run(cmd, input=data, capture_output=True, check=False, timeout=FFMPEG_TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        raise _BackendFailed("ffmpeg: gave up after %.0f s" % FFMPEG_TIMEOUT_S) from exc
    except OSError as exc:
        raise _BackendFailed("ffmpeg: could not run (%s)" % exc) from exc
    if proc.returncode != 0:
        lines = proc.stderr.decode("utf-8", "replace").strip().splitlines()
        reason = lines[-1] if lines else "failed"
        if reason.startswith(source + ": "):  # ffmpeg prefixes the input's name, which the caller names already
            reason = reason[len(source) + 2:]
        raise _BackendFailed("ffmpeg: %s" % reason)
    return np.frombuffer(proc.stdout, dtype=np.float32).copy()


def _libsndfile_reason(exc: Exception, path: str | None) -> str:
    reason = str(getattr(exc, "error_string", None) or exc).strip().rstrip(".")
    if "does not exist or is not a regular file" in reason and (path is None or os.path.isfile(path)):
        # libsndfile's MP3 probe reports data it cannot parse with this code, though the file is there.
        reason = "unrecognised or corrupt data"
    return "libsndfile: " + reason


def _too_long(name: str, max_duration: float) -> AudioError:
    return AudioTooLongError("%s: longer than the maximum duration of %g s (decoding stopped there)"
                             % (name, max_duration))


def _read_libsndfile(source: Any, max_duration: float | None, name: str) -> tuple[np.ndarray, int]:
    """(samples [time, channels], rate), reading no more than max_duration (+1 frame) when a limit is given."""
    import soundfile as sf

    with sf.SoundFile(source) as fh:
        rate = _check_rate(fh.samplerate, name)
        limit = -1 if max_duration is None else int(math.ceil(max_duration * rate)) + 1
        samples = fh.read(frames=limit, dtype="float32", always_2d=True)
    if max_duration is not None and samples.shape[0] > max_duration * rate:
        raise _too_long(name, max_duration)
    return samples, rate


def _decode(data: bytes | None, path: str | None, name: str, sr: int, max_duration: float | None = None
            ) -> np.ndarray:
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
            declared = _declared_length(fh, size, name)
            magic = _read_at(fh, 0, 4)
    else:
        size = len(data)
        if size == 0:
            raise AudioError("%s: no bytes to decode (empty)" % name)
        declared = _declared_length(io.BytesIO(data), size, name)
        magic = data[:4]

    may_be_mp3 = magic not in (b"RIFF", b"RIFX", b"fLaC", b"OggS")
    try:
        with _decoder_stderr_silenced(may_be_mp3):
            samples, rate = _read_libsndfile(path if path is not None else io.BytesIO(data), max_duration, name)
    except (sf.LibsndfileError, RuntimeError, TypeError) as exc:
        soundfile_reason = _libsndfile_reason(exc, path)
        try:
            samples = _decode_with_ffmpeg(data, path, sr, max_duration)
        except _BackendFailed as ffmpeg_exc:
            if declared is not None:
                raise AudioError("%s: file is truncated or corrupt (expected %d samples per channel at %d Hz from the "
                                 "%s, none could be decoded: %s; %s)" % (name, declared.samples, declared.rate,
                                                                        declared.source, soundfile_reason, ffmpeg_exc)
                                 ) from exc
            raise AudioError("%s: not a decodable audio file (%s; %s)" % (name, soundfile_reason, ffmpeg_exc)) from exc
        if max_duration is not None and len(samples) > max_duration * sr:
            raise _too_long(name, max_duration)
        _check_complete(declared, len(samples), sr, name)
        return _to_mono_resampled(samples, sr, sr, name, channels_last=True)
    _check_complete(declared, samples.shape[0], rate, name)
    return _to_mono_resampled(samples, rate, sr, name, channels_last=True)


def _to_mono_resampled(samples: np.ndarray, rate: int, sr: int, name: str, *, channels_last: bool) -> np.ndarray:
    if samples.ndim == 2:
        with np.errstate(invalid="ignore", over="ignore"):  # non-finite input is reported just below
            samples = samples.mean(axis=1 if channels_last else 0, dtype=np.float64).astype(np.float32)
    if samples.size == 0:
        raise AudioError("%s: contains zero samples" % name)
    if not np.isfinite(samples).all():
        bad = int((~np.isfinite(samples)).sum())
        raise AudioError("%s: contains %d NaN or infinite samples" % (name, bad))
    peak = float(np.max(np.abs(samples)))
    if peak > MAX_ABS_SAMPLE:
        # float PCM this far over full scale is corrupt data (it would also overflow when resampled), not a signal
        raise AudioError("%s: samples reach %.3g, far outside [-1, 1] (corrupt floating-point data?)" % (name, peak))
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


def _from_data_uri(uri: str, sr: int, max_duration: float | None = None) -> np.ndarray:
    name = _describe(uri)
    header, sep, payload = uri.partition(",")
    if not sep:
        raise AudioError("%s: malformed data URI (no comma before the payload)" % name)
    if not header.endswith(";base64"):
        raise AudioError("%s: only base64 data URIs are supported" % name)
    # Line breaks and spaces are allowed in a data URI's base64 (RFC 2397 payloads are often wrapped); anything else
    # outside the base64 alphabet means the payload is not base64, not that it decodes to nothing.
    payload = re.sub(r"\s+", "", payload)
    if not payload:
        raise AudioError("%s: empty payload in data: URI" % name)
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise AudioError("%s: invalid base64 in data: URI (%s)" % (name, exc)) from exc
    return _decode(data, None, name, sr, max_duration)


def _check_max_duration(max_duration: Any) -> float | None:
    if max_duration is None:
        return None
    try:
        value = float(max_duration)
    except (TypeError, ValueError):
        raise AudioError("max_duration must be a number of seconds or None, got %r" % (max_duration,)) from None
    if not math.isfinite(value) or value <= 0:
        raise AudioError("max_duration must be a positive, finite number of seconds, got %r" % (max_duration,))
    return value


def load_audio(source: Any, sr: int = SAMPLE_RATE, max_duration: float | None = None) -> np.ndarray:
    """Load audio as a float32 mono numpy array at `sr` Hz.

    `source` is one of:
      - a path (str or os.PathLike): WAV (PCM 8/16/24/32-bit, IEEE float), FLAC, Ogg, MP3, or anything ffmpeg reads;
      - bytes / bytearray / memoryview holding an encoded file;
      - a ``data:audio/...;base64,...`` URI;
      - ``(array, rate)``: samples shaped [time], [time, channels] or [channels, time]; integer arrays are PCM and
        scaled to [-1, 1); the rate is a whole number of Hz (an int, or a float / numpy / 0-d tensor scalar with an
        integral value). Several clips are a list, never a tuple;
      - a bare 1-D numpy array or torch tensor, taken to be at `sr` already.

    Stereo and multichannel audio is averaged to mono; other rates are resampled with soxr.
    `max_duration` (seconds): an encoded source longer than this raises `AudioError` once decoding has passed the
    limit, so a small file that decodes to hours costs no more than the limit (arrays are checked after the fact).
    Raises `AudioError` (a ValueError) naming the source and the problem, including files cut short where the
    container states their length (all but constant-bitrate MP3s without a Xing/Info header).
    """
    sr = _check_rate(sr, "target")
    max_duration = _check_max_duration(max_duration)
    audio = _load_any(source, sr, max_duration)
    if max_duration is not None and audio.size > max_duration * sr:
        raise _too_long(_describe(source), max_duration)
    return audio


def _load_any(source: Any, sr: int, max_duration: float | None) -> np.ndarray:
    if isinstance(source, tuple):
        if len(source) != 2:
            raise AudioError("<array>: expected (array, sample_rate), got a tuple of %d items; pass several clips "
                             "as a list" % len(source))
        if not is_sample_rate(source[1]):
            shape = getattr(source[1], "shape", None)
            what = "an array of shape %s" % (tuple(shape),) if shape is not None else "a %s" % type(source[1]).__name__
            raise AudioError("<array>: a tuple is read as (array, sample_rate), but its second item is %s, not a "
                             "number; pass several clips as a list [clip, clip, ...]" % what)
        return _from_array(source[0], source[1], sr)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return _decode(bytes(source), None, _describe(source), sr, max_duration)
    if isinstance(source, (str, os.PathLike)):
        text = os.fspath(source)
        if isinstance(text, bytes):
            text = os.fsdecode(text)
        if text.startswith("data:"):
            return _from_data_uri(text, sr, max_duration)
        if text.startswith(("http://", "https://")):
            raise AudioError("%r: URLs are not fetched here; download the file and pass its path" % text)
        return _decode(None, text, _describe(text), sr, max_duration)
    if isinstance(source, np.ndarray) or type(source).__name__ == "Tensor":
        samples = _array_to_float(source, "<array>")
        if samples.ndim != 1:
            raise AudioError("<array>: a bare array must be 1-D mono at %d Hz; pass (array, rate) for other layouts, "
                             "got shape %s" % (sr, tuple(samples.shape)))
        return _to_mono_resampled(samples, sr, sr, "<array>", channels_last=True)
    raise AudioError("%s: unsupported audio source type %s" % (_describe(source), type(source).__name__))
