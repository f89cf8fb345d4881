"""espeak-ng speech without a system espeak-ng: its library and voice data from the espeakng-loader wheel.

`synthesize_wav` drives libespeak-ng through ctypes the way the `espeak-ng` program does for `--stdout` (synchronous
output, the voice, then the rate, volume, pitch and word-gap parameters, the same synthesis flags); `main` is a
stand-in for that program's options the tests use (`-v -p -s -g -a -w --stdout TEXT`), for machines that have only
the wheel. Like the program, use one process per utterance: voices with flutter or breath carry generator state from
one utterance to the next, so only the first utterance of a process is reproducible. `command()` gives such a
per-utterance command. The wheel may carry another espeak-ng release than a system package (its voice data
differs for some variants), so a clip can differ between the two.
"""
from __future__ import annotations

import argparse
import ctypes
import io
import os
import sys
import threading

import numpy as np

# speak_lib.h
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_POS_CHARACTER = 1
_CHARS_AUTO, _PHONEMES, _ENDPAUSE = 0, 0x100, 0x1000  # the flags the espeak-ng program synthesises with
_RATE, _VOLUME, _PITCH, _WORDGAP = 1, 2, 3, 7
_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)

_lock = threading.Lock()  # libespeak-ng keeps global state: one synthesis at a time per process
_state: dict = {}


class EspeakUnavailable(RuntimeError):
    pass


def library_available() -> bool:
    try:
        import espeakng_loader  # noqa: F401
    except ImportError:
        return False
    return True


def command() -> list[str] | None:
    """The command that speaks like `espeak-ng`: the program when it is on PATH, else this module over the wheel's
    library in a fresh Python process; None when neither is installed."""
    import shutil

    if shutil.which("espeak-ng"):
        return ["espeak-ng"]
    if not library_available():
        return None
    package_parent = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return [sys.executable, "-c", f"import sys; sys.path.insert(0, {package_parent!r}); "
                                  "from eureka_fast.dataflux.espeak import main; sys.exit(main())"]


def _library():
    """(library, sample rate), initialised once per process."""
    if "lib" not in _state:
        try:
            import espeakng_loader
        except ImportError as exc:
            raise EspeakUnavailable("no espeak-ng: install the espeak-ng program or `pip install espeakng-loader`"
                                    ) from exc
        lib = ctypes.CDLL(espeakng_loader.get_library_path())
        lib.espeak_Initialize.restype = ctypes.c_int
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.espeak_Synth.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int, ctypes.c_uint,
                                     ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p]
        rate = lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, espeakng_loader.get_data_path().encode(), 0)
        if rate <= 0:
            raise EspeakUnavailable(f"libespeak-ng failed to initialise (status {rate})")
        chunks: list[np.ndarray] = []

        def collect(wav, n, events):
            if n > 0 and wav:
                chunks.append(np.ctypeslib.as_array(wav, shape=(n,)).copy())
            return 0

        callback = _CALLBACK(collect)
        lib.espeak_SetSynthCallback(callback)
        _state.update(lib=lib, rate=rate, chunks=chunks, callback=callback)  # keep the callback alive  # keep the callback alive
    return _state["lib"], _state["rate"]


def synthesize_wav(text: str, voice: str = "en", pitch: int = 50, speed: int = 175, word_gap: int = 0,
                   amplitude: int = 100) -> tuple[np.ndarray, int]:
    """(int16 samples, sample rate) of `text` spoken with espeak-ng's parameters (-v -p -s -g -a)."""
    with _lock:
        lib, rate = _library()
        if lib.espeak_SetVoiceByName(voice.encode()) != 0:
            raise ValueError(f"espeak-ng: unknown voice {voice!r}")
        for param, value in ((_RATE, speed), (_VOLUME, amplitude), (_PITCH, pitch), (_WORDGAP, word_gap)):
            lib.espeak_SetParameter(param, int(value), 0)
        chunks = _state["chunks"]
        chunks.clear()
        data = text.encode("utf-8") + b"\0"
        status = lib.espeak_Synth(data, len(data), 0, _POS_CHARACTER, 0, _CHARS_AUTO | _PHONEMES | _ENDPAUSE,
                                  None, None)
        lib.espeak_Synchronize()
        if status != 0:
            raise RuntimeError(f"espeak-ng: synthesis failed (status {status})")
        samples = np.concatenate(chunks) if chunks else np.zeros(0, np.int16)
        chunks.clear()
    return samples.astype(np.int16), rate


def wav_bytes(samples: np.ndarray, rate: int) -> bytes:
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, samples, rate, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def main(argv=None) -> int:
    """`espeak-ng` stand-in: the options the tests pass, written as the program writes them (16-bit WAV)."""
    p = argparse.ArgumentParser(prog="espeak-ng", description="espeak-ng over the espeakng-loader wheel's library")
    p.add_argument("-v", dest="voice", default="en", help="voice, e.g. en-us+m3")
    p.add_argument("-p", dest="pitch", type=int, default=50, help="pitch 0-99")
    p.add_argument("-s", dest="speed", type=int, default=175, help="words per minute")
    p.add_argument("-g", dest="word_gap", type=int, default=0, help="gap between words, in 10 ms units")
    p.add_argument("-a", dest="amplitude", type=int, default=100, help="amplitude 0-200")
    p.add_argument("-w", dest="wav", help="write a WAV file")
    p.add_argument("--stdout", action="store_true", help="write the WAV to standard output")
    p.add_argument("text", nargs="*", help="the text to speak")
    args = p.parse_args(argv)
    samples, rate = synthesize_wav(" ".join(args.text), args.voice, args.pitch, args.speed, args.word_gap,
                                   args.amplitude)
    data = wav_bytes(samples, rate)
    if args.wav:
        with open(args.wav, "wb") as fh:
            fh.write(data)
    if args.stdout or not args.wav:
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
