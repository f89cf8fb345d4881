"""Signal measurements against synthetic signals with known answers (no espeak, no ASR)."""
import math

import numpy as np
import pytest

from eureka_fast.dataflux import acoustics as ac
from eureka_fast.dataflux.asr import word_error_rate

SR = ac.SR


def harmonic_tone(f0, seconds, rng=None, vibrato=0.0):
    t = np.arange(int(seconds * SR)) / SR
    phase = 2 * np.pi * f0 * t + vibrato * np.sin(2 * np.pi * 5 * t)
    x = sum((0.6 / k) * np.sin(k * phase) for k in range(1, 8))
    return (0.3 * x / np.max(np.abs(x))).astype(np.float32)


def padded(x, lead=0.5, trail=0.7):
    return np.concatenate([np.zeros(int(lead * SR), np.float32), x, np.zeros(int(trail * SR), np.float32)])


@pytest.mark.parametrize("f0", [80.0, 120.0, 210.0, 300.0])
def test_pitch_trackers_agree_with_known_f0(f0):
    x = harmonic_tone(f0, 1.0)
    for times, track in (ac.praat_pitch(x, "ac"), ac.praat_pitch(x, "cc"), ac.yin_pitch(x)):
        assert abs(ac.voiced_median(track) / f0 - 1) < 0.01, (f0, ac.voiced_median(track))


def test_yin_marks_silence_unvoiced():
    x = padded(harmonic_tone(150.0, 0.5), 0.5, 0.5)
    times, f0 = ac.yin_pitch(x)
    assert np.all(f0[times < 0.4] == 0) and np.all(f0[times > 1.1] == 0)
    assert np.mean(f0[(times > 0.6) & (times < 0.9)] > 0) > 0.9


def test_snr_estimators_on_known_mixtures():
    rng = np.random.default_rng(0)
    speech = padded(harmonic_tone(140.0, 2.0))
    span = (0.5, 2.5)
    p_speech = float(np.mean(speech[int(0.5 * SR): int(2.5 * SR)].astype(np.float64) ** 2))
    for snr in (0.0, 10.0, 25.0):
        noise = rng.standard_normal(speech.size)
        noise *= math.sqrt(p_speech / 10 ** (snr / 10) / np.mean(noise ** 2))
        x = (speech + noise).astype(np.float32)
        assert abs(ac.snr_from_span(x, span) - snr) < 1.0
        assert abs(ac.snr_from_span(x, ac.speech_span_vad(x) or span) - snr) < 3.0
    assert ac.snr_from_span(speech, span) == ac.SNR_CAP_DB  # digital silence around the speech


def test_speech_spans_find_padded_tone():
    x = padded(harmonic_tone(150.0, 1.5, vibrato=3.0), lead=0.6, trail=0.9)
    rng = np.random.default_rng(1)
    noisy = x + 0.003 * rng.standard_normal(x.size).astype(np.float32)
    for span in (ac.speech_span_energy(x), ac.speech_span_energy(noisy)):
        assert abs(span[0] - 0.6) < 0.05 and abs(span[1] - 2.1) < 0.05
    assert ac.speech_span_energy(np.zeros(SR, np.float32)) is None
    assert ac.speech_span_vad(np.zeros(SR, np.float32)) is None


def test_formant_dispersion_and_gender_rule():
    # uniform tube: F_i = (2i - 1) c / 4L -> dispersion c / 2L
    for length_cm in (17.5, 14.5):
        formants = [(2 * i - 1) * 35000 / (4 * length_cm) for i in range(1, 5)]
        assert abs(ac.formant_dispersion(formants) - 35000 / (2 * length_cm)) < 1e-6
    assert ac.gender_score(120, 1000) < 0 < ac.gender_score(220, 1200)
    # the other cues decide when F0 is ambiguous (a high male vs. a low female voice): a high voice with a long
    # vocal tract, a dull upper spectrum and a narrow F0 range is male; a lower one with the opposite cues is female
    male_high = dict(f0_hz=160.0, dispersion_hz=1030.0, f0_range_hz=18.0, high_band_db=-28.0)
    female_low = dict(f0_hz=135.0, dispersion_hz=1150.0, f0_range_hz=38.0, high_band_db=-21.0)
    assert ac.gender_score(**male_high) < 0 < ac.gender_score(**female_low)
    # each cue alone moves the score the way it should
    for cue, lo, hi in (("dispersion_hz", 1000.0, 1200.0), ("f0_range_hz", 15.0, 45.0), ("high_band_db", -32, -18)):
        assert ac.gender_score(**dict(male_high, **{cue: lo})) < ac.gender_score(**dict(male_high, **{cue: hi}))


def test_gender_evidence_explains_the_score():
    ev = ac.gender_evidence(150.0, 1100.0, 30.0, -24.0)
    assert set(ev) == set(ac.GENDER_MODEL["weights"])
    assert ac.gender_score(150.0, 1100.0, 30.0, -24.0) == pytest.approx(ac.GENDER_MODEL["intercept"] + sum(ev.values()))
    # a cue that could not be measured contributes nothing (the others still decide)
    missing = ac.gender_evidence(150.0, float("nan"), None, None)
    assert missing["log_dispersion"] == missing["log_f0_range"] == missing["high_band_db"] == 0.0
    assert missing["log_f0"] == pytest.approx(ev["log_f0"])
    # at the development set's mean of every cue the score is the intercept
    m = ac.GENDER_MODEL["means"]
    at_mean = ac.gender_score(math.exp(m["log_f0"]), math.exp(m["log_dispersion"]), math.exp(m["log_f0_range"]),
                              10 * m["high_band_db"])
    assert at_mean == pytest.approx(ac.GENDER_MODEL["intercept"], abs=1e-9)


def test_f0_range_and_high_band_level():
    track = np.concatenate([np.zeros(10), np.linspace(100.0, 200.0, 101)])
    assert ac.f0_range(track) == pytest.approx(80.0)  # 10-90 percentile of the voiced values only
    assert math.isnan(ac.f0_range(np.array([0.0, 120.0, 0.0])))
    rng = np.random.default_rng(0)
    white = rng.standard_normal(SR).astype(np.float32)
    times = np.linspace(0.1, 0.9, 20)
    assert abs(ac.high_band_level_db(white, times)) < 1.0  # flat spectrum: equal power density in both bands
    from scipy.signal import butter, sosfilt

    dull = sosfilt(butter(6, 2000, fs=SR, output="sos"), white).astype(np.float32)
    bright = sosfilt(butter(6, 3000, btype="high", fs=SR, output="sos"), white).astype(np.float32)
    assert ac.high_band_level_db(dull, times) < -40 and ac.high_band_level_db(bright, times) > 20
    assert math.isnan(ac.high_band_level_db(white, np.array([0.001])))  # no frame fits


def test_lpc_formants_of_synthetic_vowel():
    # a pulse train through two-pole resonators at known formants: LPC must find them
    from scipy.signal import lfilter

    f0, formants, bw = 120.0, (700.0, 1220.0, 2600.0, 3500.0), 80.0
    src = np.zeros(SR)
    src[:: int(SR / f0)] = 1.0
    y = src
    for f in formants:
        r = math.exp(-math.pi * bw / SR)
        y = lfilter([1.0], [1.0, -2 * r * math.cos(2 * math.pi * f / SR), r * r], y)
    y = (y / np.max(np.abs(y)) * 0.5).astype(np.float32)
    est = ac.lpc_formants(y, np.linspace(0.1, 0.9, 20))
    assert np.all(np.abs(est / np.array(formants) - 1) < 0.08), est  # F1 sits near a harmonic


def test_classes_follow_issue_thresholds():
    assert [ac.pitch_class(f, "male") for f in (94.9, 95.0, 130.0, 130.1)] == ["low", "medium", "medium", "high"]
    assert [ac.pitch_class(f, "female") for f in (174, 175, 235, 236)] == ["low", "medium", "medium", "high"]
    assert [ac.rate_class(w) for w in (1.99, 2.0, 3.5, 3.51)] == ["slow", "normal", "normal", "fast"]
    assert [ac.noise_class(s) for s in (19.9, 20.0)] == ["noisy", "clean"]


def test_syllable_counting():
    assert [ac.count_syllables(w) for w in ("cat", "table", "umbrella", "remember", "the", "make")] == \
        [1, 2, 3, 3, 1, 1]


def test_word_error_rate():
    assert word_error_rate("The cat sat", "the cat sat.") == (0, 3)
    assert word_error_rate("the cat sat", "the bat") == (2, 3)


def test_asr_repetition_loop_is_redecoded():
    from eureka_fast.dataflux.asr import COMPRESSION_RATIO_LIMIT, EurekaWhisperASR, compression_ratio

    loop = "she's a little bit sick and " * 12
    assert compression_ratio(loop) > COMPRESSION_RATIO_LIMIT > compression_ratio(
        "The children played football in the park until the sun went down.")

    class Model:
        def __init__(self, text):
            self.text = text

        def transcribe(self, audio):
            return self.text

    import threading

    asr = EurekaWhisperASR.__new__(EurekaWhisperASR)  # skip loading real weights
    asr._lock, asr._model, asr._fallback_model = threading.Lock(), Model(loop), Model("she sells sea shells")
    assert asr.transcribe(np.zeros(16000, np.float32)) == "she sells sea shells" and asr.fallbacks == 1
    asr._model = Model("a normal sentence")
    assert asr.transcribe(np.zeros(16000, np.float32)) == "a normal sentence" and asr.fallbacks == 1
