"""Audio parts of a request -> 16 kHz samples, with the server's limits.

Sources: base64 ``input_audio`` data, ``data:`` URIs, local paths / ``file://`` URIs only under the
``--allow-local-audio`` directory (symlinks and ``..`` resolved before the check), http(s) only when allowed.
The duration limit is enforced before the full decode: the container's declared length is checked first, then the
audio is decoded block by block and refused as soon as it passes the limit, so a small compressed file that decodes
to hours costs no more than the limit's worth of decoding.
"""
from __future__ import annotations

import base64
import binascii
import http.client
import io
import os
import re
import socket
import stat
import time
import urllib.parse

import numpy as np

from ..audio import AudioError, load_audio

INPUT_AUDIO_FORMATS = ("wav", "mp3", "flac", "ogg")
_BLOCK_SECONDS = 10
_MAX_REDIRECTS = 5


class AudioInputError(ValueError):
    """A request's audio is unusable or not allowed (the message is for the client)."""

    def __init__(self, message: str, param: str | None = None, code: str = "invalid_audio"):
        super().__init__(message)
        self.param, self.code = param, code


class AudioPolicy:
    def __init__(self, *, max_seconds: float = 600.0, max_bytes: int = 64 << 20, local_dir: str | None = None,
                 allow_remote: bool = False, remote_timeout_s: float = 30.0):
        self.max_seconds = float(max_seconds)
        self.max_bytes = int(max_bytes)
        self.local_dir = os.path.realpath(local_dir) if local_dir else None
        if self.local_dir is not None and not os.path.isdir(self.local_dir):
            raise ValueError(f"--allow-local-audio {local_dir!r} is not a directory")
        self.allow_remote = bool(allow_remote)
        self.remote_timeout_s = float(remote_timeout_s)

    # --- sources --------------------------------------------------------------------------------------------------
    def input_audio(self, value, param: str) -> np.ndarray:
        if not isinstance(value, dict) or not isinstance(value.get("data"), str):
            raise AudioInputError("an input_audio part needs {'data': base64 string, 'format': 'wav'|'mp3'|'flac'|"
                                  "'ogg'}", param)
        fmt = value.get("format", "wav")
        if fmt not in INPUT_AUDIO_FORMATS:
            raise AudioInputError(f"input_audio format {fmt!r} is not supported; use one of "
                                  f"{', '.join(INPUT_AUDIO_FORMATS)}", param + ".format")
        return self.decode(_b64(value["data"], param + ".data"), f"input_audio ({fmt})", param + ".data")

    def audio_url(self, value, param: str) -> np.ndarray:
        url = value.get("url") if isinstance(value, dict) else value
        if not isinstance(url, str) or not url:
            raise AudioInputError("an audio_url part needs {'url': data URI | file path}", param)
        param = param + ".url" if isinstance(value, dict) else param
        if url.startswith("data:"):
            header, sep, payload = url.partition(",")
            if not sep or not header.endswith(";base64"):
                raise AudioInputError("a data URI must be data:audio/...;base64,<payload>", param)
            return self.decode(_b64(payload, param), "data URI", param)
        if url.startswith(("http://", "https://")):
            if not self.allow_remote:
                raise AudioInputError("http(s) audio URLs are not fetched by this server (start it with "
                                      "--allow-remote-audio); send the audio as base64 input_audio", param,
                                      code="audio_url_not_allowed")
            return self.decode(self._fetch(url, param), "downloaded audio", param)
        if url.startswith("file://"):
            parsed = urllib.parse.urlparse(url)
            if parsed.netloc not in ("", "localhost"):
                raise AudioInputError("file:// URLs must name a local path", param)
            path = urllib.parse.unquote(parsed.path)
        elif re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", url):
            raise AudioInputError(f"unsupported audio URL scheme in {url[:40]!r}", param)
        else:
            path = url
        return self.decode(self._read_local(path, param), "local file", param)

    def _read_local(self, path: str, param: str) -> bytes:
        if self.local_dir is None:
            raise AudioInputError("local audio paths are not allowed by this server (start it with "
                                  "--allow-local-audio DIR); send the audio as base64 input_audio", param,
                                  code="local_audio_not_allowed")
        # Relative paths are relative to the allowed directory; symlinks and ".." are resolved before the check.
        resolved = os.path.realpath(os.path.join(self.local_dir, path))
        if os.path.commonpath([resolved, self.local_dir]) != self.local_dir:
            raise AudioInputError("the audio path is outside the directory this server may read", param,
                                  code="local_audio_not_allowed")
        try:
            fd = os.open(resolved, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except OSError:
            raise AudioInputError("the audio file does not exist or cannot be read", param) from None
        with os.fdopen(fd, "rb") as fh:
            info = os.fstat(fh.fileno())
            if not stat.S_ISREG(info.st_mode):
                raise AudioInputError("the audio path is not a regular file", param)
            if info.st_size > self.max_bytes:
                raise AudioInputError(f"the audio file is larger than {self.max_bytes >> 20} MiB", param)
            return fh.read(self.max_bytes + 1)

    def _fetch(self, url: str, param: str) -> bytes:
        """The body at an http(s) URL: at most max_bytes of it, within remote_timeout_s in all (connecting,
        redirects and a slowly dripping body included), following at most 5 redirects, to http(s) only."""
        deadline = time.monotonic() + self.remote_timeout_s
        limit_mib = f"{self.max_bytes / (1 << 20):g} MiB"

        def failed(message: str, code: str = "audio_download_failed") -> AudioInputError:
            return AudioInputError(message, param, code=code)

        try:
            for _ in range(_MAX_REDIRECTS + 1):
                parsed = urllib.parse.urlsplit(url)
                if parsed.scheme not in ("http", "https") or not parsed.hostname:
                    raise failed(f"the audio URL redirected to {url[:80]!r}, which is not an http(s) URL")
                connection_class = http.client.HTTPSConnection if parsed.scheme == "https" else \
                    http.client.HTTPConnection
                connection = connection_class(parsed.hostname, parsed.port, timeout=_left(deadline))
                try:
                    target = parsed.path or "/"
                    if parsed.query:
                        target += "?" + parsed.query
                    connection.request("GET", target, headers={"User-Agent": "eureka-audio-serve",
                                                               "Accept-Encoding": "identity"})
                    sock = connection.sock  # the response reads from it (getresponse may drop the connection's)
                    response = connection.getresponse()
                    if response.status in (301, 302, 303, 307, 308) and response.getheader("Location"):
                        url = urllib.parse.urljoin(url, response.getheader("Location"))
                        continue
                    if response.status != 200:
                        raise failed(f"the audio URL answered HTTP {response.status} ({response.reason})")
                    declared = (response.getheader("Content-Length") or "").strip()
                    if declared.isdigit() and int(declared) > self.max_bytes:
                        raise failed(f"the audio at the URL is {int(declared)} bytes, larger than {limit_mib}",
                                     "audio_too_large")
                    chunks, size = [], 0
                    while size <= self.max_bytes:
                        sock.settimeout(_left(deadline))
                        chunk = response.read1(min(1 << 16, self.max_bytes + 1 - size))
                        if not chunk:
                            break
                        chunks.append(chunk)
                        size += len(chunk)
                    if size > self.max_bytes:
                        raise failed(f"the audio at the URL is larger than {limit_mib}", "audio_too_large")
                    return b"".join(chunks)
                finally:
                    connection.close()
            raise failed(f"the audio URL redirected more than {_MAX_REDIRECTS} times")
        except AudioInputError:
            raise
        except (TimeoutError, socket.timeout):
            raise failed(f"downloading the audio took longer than {self.remote_timeout_s:g} s") from None
        except (OSError, http.client.HTTPException, ValueError) as exc:  # refused, unresolvable, cut short...
            raise failed(f"could not download the audio ({type(exc).__name__})") from None

    # --- decoding -------------------------------------------------------------------------------------------------
    def decode(self, data: bytes, what: str, param: str) -> np.ndarray:
        if not data:
            raise AudioInputError(f"the {what} is empty", param)
        if len(data) > self.max_bytes:
            raise AudioInputError(f"the {what} is larger than {self.max_bytes >> 20} MiB", param)
        self._check_duration(data, what, param)
        try:
            samples = load_audio(data)
        except AudioError as exc:
            raise AudioInputError(f"the {what} could not be decoded: {_without_source(str(exc))}", param) from None
        seconds = len(samples) / 16000
        if seconds > self.max_seconds:
            raise AudioInputError(f"the {what} is {seconds:.1f} s long; this server takes at most "
                                  f"{self.max_seconds:g} s of audio (--max-audio-seconds)", param,
                                  code="audio_too_long")
        return samples

    def _check_duration(self, data: bytes, what: str, param: str) -> None:
        """Refuse audio longer than the limit without decoding more than the limit's worth of it."""
        import soundfile as sf

        try:
            handle = sf.SoundFile(io.BytesIO(data))
        except Exception:  # not for libsndfile: load_audio reports it (or decodes it with ffmpeg) below
            return
        with handle:
            rate = handle.samplerate
            if rate <= 0:
                return
            limit = int(self.max_seconds * rate)
            declared = handle.frames
            if 0 < declared < (1 << 62) and declared > limit:
                raise AudioInputError(f"the {what} is {declared / rate:.1f} s long; this server takes at most "
                                      f"{self.max_seconds:g} s of audio (--max-audio-seconds)", param,
                                      code="audio_too_long")
            decoded = 0
            try:
                while decoded <= limit:
                    block = handle.read(_BLOCK_SECONDS * rate, dtype="float32", always_2d=True)
                    if len(block) == 0:
                        break
                    decoded += len(block)
            except Exception:  # a corrupt stream: load_audio names the problem below
                return
            if decoded > limit:
                raise AudioInputError(f"the {what} decodes to more than {self.max_seconds:g} s of audio "
                                      f"(--max-audio-seconds)", param, code="audio_too_long")


def _left(deadline: float) -> float:
    """Seconds left before the deadline; past it, a timeout."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError
    return left


def _b64(text: str, param: str) -> bytes:
    payload = re.sub(r"\s+", "", text)
    if not payload:
        raise AudioInputError("the audio data is empty", param)
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise AudioInputError("the audio data is not valid base64", param) from None


def _without_source(message: str) -> str:
    """load_audio's messages start with the source's description (here '<bytes, N bytes>: '); drop it."""
    return re.sub(r"^<bytes, \d+ bytes>: ", "", message)
