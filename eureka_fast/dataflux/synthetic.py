"""Labelled synthetic speech from espeak-ng, for tests and benchmarks of the offline captioner.

Each clip has a known text, a voice of known gender, an espeak pitch setting, a speed setting and an optional noise
mixed in at a known SNR. The attribute labels are NOT what espeak was asked for: they come from the issue's
thresholds applied to reference measurements on the clean signal:
- gender: the espeak voice variant's gender (m* male, f* female);
- pitch_level: Praat cross-correlation F0 median of the clean clip, with the pitch range Praat recommends for the
  known gender (male 60-250 Hz, female 100-500 Hz), against the gender's thresholds;
- speaking_rate: the known text's syllable count (acoustics.count_syllables) over the clean clip's speech span (first
  to last sample of the signal envelope above -40 dB re. its peak), against the captioner's syllables-per-second
  classes (acoustics.SLOW_SYL_PER_S / FAST_SYL_PER_S, from published speaking-rate norms);
- noise: "clean" if the mixed-in SNR (speech-span power over noise power) is >= 20 dB or no noise, else "noisy".
"""
from __future__ import annotations

import dataclasses
import io
import math
import subprocess

import numpy as np

from .audio_io import SAMPLE_RATE

TEXTS = (
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "Please remember to bring your umbrella because it might rain this afternoon.",
    "She sells sea shells by the sea shore every single morning.",
    "Our train leaves the station at seven thirty tomorrow evening.",
    "The children played football in the park until the sun went down.",
    "Could you send me the report before the meeting on Friday?",
    "A cup of hot coffee is the best way to start a cold day.",
    "The museum opens at nine and closes at five during the winter.",
    "He planted tomatoes and peppers in the garden behind the house.",
    "We should check the weather forecast before we drive to the mountains.",
    "The library has thousands of old books about history and science.",
    "My sister bought a new bicycle with a bright red basket.",
)

MALE_VOICES = ("m1", "m2", "m3", "m4", "m5", "m6", "m7")
FEMALE_VOICES = ("f1", "f2", "f3", "f4", "f5")
# espeak -p settings per gender, chosen to land in the low / medium / high F0 bands of each gender
# (measured: male -p15 ~70-85 Hz, -p60 ~100-118 Hz, -p92 ~140-160 Hz;
#            female -p15 ~130-165 Hz, -p55 ~190-225 Hz, -p92 ~280-320 Hz).
PITCH_SETTINGS = {"male": (15, 60, 92), "female": (15, 55, 92)}
SPEED_SETTINGS = (80, 135, 270)  # espeak words per minute: slow, normal and fast at the syllables-per-second classes
# extra gap between words (espeak -g, units of 10 ms) per speed: espeak's slowest speed alone still lands near 2 w/s
WORD_GAP = {80: 6}
NOISE_SETTINGS = (None, 30.0, 10.0, 5.0)  # SNR dB; None = no noise
LEAD_SILENCE_S, TRAIL_SILENCE_S = 0.4, 0.6

from .acoustics import CLEAN_SNR_DB, FEMALE_PITCH_BANDS, MALE_PITCH_BANDS, count_syllables  # noqa: E402
from .acoustics import rate_class  # noqa: E402,F401  (the labels use the captioner's classes)


@dataclasses.dataclass
class LabelledClip:
    clip_id: str
    audio: np.ndarray  # float32 mono 16 kHz
    text: str
    voice: str
    espeak_pitch: int
    espeak_speed: int
    snr_db: float | None
    noise_kind: str | None
    labels: dict  # gender, pitch_level, speaking_rate, noise
    reference: dict  # f0_median_hz, words_per_second, syllables_per_second, speech_span_s


def espeak_available() -> bool:
    """The espeak-ng program, or its library from the espeakng-loader wheel (see espeak.py)."""
    from .espeak import command

    return command() is not None


def synthesize(text: str, voice: str, pitch: int, speed: int, language: str = "en-us", word_gap: int = 0) -> np.ndarray:
    """espeak-ng speech at 16 kHz, float32 mono."""
    import soundfile as sf
    import soxr

    from .espeak import command

    args = ["-v", f"{language}+{voice}", "-p", str(pitch), "-s", str(speed), "-g", str(word_gap), "--stdout", text]
    out = subprocess.run((command() or ["espeak-ng"]) + args, capture_output=True, check=True, timeout=60).stdout
    data, rate = sf.read(io.BytesIO(out), dtype="float32")
    return soxr.resample(data, rate, SAMPLE_RATE).astype(np.float32)


def pitch_class(f0_hz: float, gender: str) -> str:
    low, high = MALE_PITCH_BANDS if gender == "male" else FEMALE_PITCH_BANDS
    return "low" if f0_hz < low else "high" if f0_hz > high else "medium"


def speech_span(audio: np.ndarray, sr: int = SAMPLE_RATE, floor_db: float = -40.0) -> tuple[int, int]:
    """First and last sample of a clean signal whose 10 ms envelope is within floor_db of its peak."""
    hop = sr // 100
    n = len(audio) // hop
    env = np.sqrt(np.mean(audio[: n * hop].reshape(n, hop) ** 2, axis=1) + 1e-20)
    active = np.nonzero(20 * np.log10(env / env.max()) > floor_db)[0]
    return int(active[0] * hop), int((active[-1] + 1) * hop)


def reference_f0(audio: np.ndarray, gender: str, sr: int = SAMPLE_RATE) -> float:
    import parselmouth

    floor, ceiling = (60.0, 250.0) if gender == "male" else (100.0, 500.0)
    pitch = parselmouth.Sound(audio.astype(np.float64), sr).to_pitch_cc(pitch_floor=floor, pitch_ceiling=ceiling)
    f0 = pitch.selected_array["frequency"]
    return float(np.median(f0[f0 > 0]))


def make_noise(n: int, kind: str, rng: np.random.Generator) -> np.ndarray:
    white = rng.standard_normal(n)
    if kind == "white":
        return white
    # pink noise: shape white noise by 1/sqrt(f) in the frequency domain
    spec = np.fft.rfft(white)
    freqs = np.arange(spec.size, dtype=np.float64)
    freqs[0] = 1.0
    return np.fft.irfft(spec / np.sqrt(freqs), n)


def mix_at_snr(clean: np.ndarray, span: tuple[int, int], snr_db: float, kind: str, seed: int) -> np.ndarray:
    """Add noise so that (mean power of the clean speech span) / (noise power) = snr_db."""
    rng = np.random.default_rng(seed)
    noise = make_noise(len(clean), kind, rng)
    speech_power = float(np.mean(clean[span[0]: span[1]].astype(np.float64) ** 2))
    noise *= math.sqrt(speech_power / (10 ** (snr_db / 10)) / np.mean(noise ** 2))
    mixed = clean + noise
    peak = np.max(np.abs(mixed))
    if peak > 0.99:  # keep it in range; scaling both keeps the SNR
        mixed = mixed * (0.99 / peak)
    return mixed.astype(np.float32)


def make_clip(index: int, voice: str, pitch: int, speed: int, snr_db: float | None, text: str | None = None,
              noise_kind: str | None = None) -> LabelledClip:
    gender = "male" if voice.startswith("m") else "female"
    text = text or TEXTS[index % len(TEXTS)]
    speech = synthesize(text, voice, pitch, speed, word_gap=WORD_GAP.get(speed, 0))
    clean = np.concatenate([np.zeros(int(LEAD_SILENCE_S * SAMPLE_RATE), np.float32), speech,
                            np.zeros(int(TRAIL_SILENCE_S * SAMPLE_RATE), np.float32)])
    clean *= 0.5 / max(1e-9, float(np.max(np.abs(clean))))
    span = speech_span(clean)
    span_s = (span[1] - span[0]) / SAMPLE_RATE
    f0 = reference_f0(clean[span[0]: span[1]], gender)
    words = text.split()
    wps = len(words) / span_s
    sps = sum(count_syllables(w) for w in words) / span_s
    if snr_db is None:
        audio, noise_kind = clean, None
    else:
        noise_kind = noise_kind or ("white" if index % 2 == 0 else "pink")
        audio = mix_at_snr(clean, span, snr_db, noise_kind, seed=1000 + index)
    labels = {"gender": gender, "pitch_level": pitch_class(f0, gender), "speaking_rate": rate_class(sps),
              "noise": "clean" if snr_db is None or snr_db >= CLEAN_SNR_DB else "noisy"}
    snr_tag = "clean" if snr_db is None else f"snr{int(snr_db)}"
    clip_id = f"{index:04d}-{voice}-p{pitch}-s{speed}-{snr_tag}"
    return LabelledClip(clip_id, audio, text, voice, pitch, speed, snr_db, noise_kind, labels,
                        {"f0_median_hz": f0, "words_per_second": wps, "syllables_per_second": sps,
                         "speech_span_s": span_s})


def labelled_grid(voices=None, pitches=None, speeds=SPEED_SETTINGS, noises=NOISE_SETTINGS, limit=None,
                  noise_cross=False):
    """The labelled set: every voice x pitch x speed, with noise conditions assigned round-robin
    (so every voice/pitch/speed sees every noise condition across the grid without multiplying its size).
    noise_cross=True instead puts every voice x pitch x speed clip (same text, same noise seed) in every noise
    condition: 4 times the clips."""
    voices = voices or (MALE_VOICES + FEMALE_VOICES)
    plan = []
    for v in voices:
        gender = "male" if v.startswith("m") else "female"
        for p in (pitches or PITCH_SETTINGS[gender]):
            for s in speeds:
                plan.append((v, p, s))
    clips = []
    for i, (v, p, s) in enumerate(plan[:limit] if limit else plan):
        for snr in (noises if noise_cross else (noises[i % len(noises)],)):
            clips.append(make_clip(i, v, p, s, snr))
    return clips


class KnownTextASR:
    """Stands in for an ASR model with the labelled clips' known text (matched by length; "" for a clip it does not
    know), so that a measurement of the signal analysis alone needs no recogniser."""

    name = "known-text"

    def __init__(self, clips=()):
        self.by_len = {c.audio.size: c.text for c in clips}

    def transcribe(self, audio):
        return self.by_len.get(audio.size, "")


def write_clips(clips, directory) -> dict:
    """Write clips as 16-bit WAV files named by clip id; returns {clip_id: path}."""
    import os

    import soundfile as sf

    os.makedirs(directory, exist_ok=True)
    paths = {}
    for c in clips:
        path = os.path.join(directory, f"{c.clip_id}.wav")
        sf.write(path, c.audio, SAMPLE_RATE, subtype="PCM_16")
        paths[c.clip_id] = path
    return paths
