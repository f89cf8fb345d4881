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


def test_formant_dispersion_of_a_uniform_tube():
    # uniform tube: F_i = (2i - 1) c / 4L -> dispersion c / 2L, from four formants or from the first three
    for length_cm in (17.5, 14.5):
        formants = [(2 * i - 1) * 35000 / (4 * length_cm) for i in range(1, 5)]
        assert abs(ac.formant_dispersion(formants) - 35000 / (2 * length_cm)) < 1e-6
        assert abs(ac.formant_dispersion(formants[:3] + [float("nan")]) - 35000 / (2 * length_cm)) < 1e-6


def test_cue_llr_is_the_gaussian_log_likelihood_ratio_capped():
    # independent arithmetic: log N(x; mu_f, sd) - log N(x; mu_m, sd) in the log domain
    for cue, x in (("f0", 150.0), ("f0", 170.0), ("dispersion", 1080.0), ("dispersion", 1120.0)):
        ref = ac.SEX_CUES[cue]
        mu_m, mu_f, sd = math.log(ref["male_hz"]), math.log(ref["female_hz"]), ref["log_sd"]
        expected = (-(math.log(x) - mu_f) ** 2 + (math.log(x) - mu_m) ** 2) / (2 * sd * sd)
        assert ac.cue_llr(cue, x) == pytest.approx(max(-ref["llr_cap"], min(ref["llr_cap"], expected)), abs=1e-9)
    # zero at the geometric midpoint of the two reference medians, capped far from it
    mid = math.sqrt(ac.SEX_CUES["f0"]["male_hz"] * ac.SEX_CUES["f0"]["female_hz"])
    assert ac.cue_llr("f0", mid) == pytest.approx(0.0, abs=1e-9)
    assert ac.cue_llr("f0", 400.0) == ac.SEX_CUES["f0"]["llr_cap"]
    assert ac.cue_llr("dispersion", 800.0) == -ac.SEX_CUES["dispersion"]["llr_cap"]
    assert ac.cue_llr("f0", float("nan")) is None and ac.cue_llr("f0", None) is None


def test_gender_decision_needs_agreeing_cues():
    # typical adult voices (Peterson & Barney / Hillenbrand ranges): both cues agree -> a confident answer
    male = ac.gender_decision(115.0, 1000.0)
    female = ac.gender_decision(215.0, 1200.0)
    assert male["gender"] == "male" and female["gender"] == "female"
    assert male["gender_confidence"] >= ac.GENDER_MIN_CONFIDENCE <= female["gender_confidence"]
    # F0 alone never names a sex, however typical (its LLR cap is below the decision threshold)
    assert ac.gender_decision(240.0, None)["gender"] == "unknown"
    assert ac.gender_decision(95.0, float("nan"))["gender"] == "unknown"
    # an expressive male voice: F0 in the female range, vocal tract long -> not "female"
    assert ac.gender_decision(235.0, 1000.0)["gender"] == "unknown"
    assert ac.gender_decision(235.0, 960.0)["gender"] == "unknown"
    assert ac.gender_decision(150.0, 960.0)["gender"] == "male"  # raised into the overlap: the vocal tract decides
    # a low female voice with a short vocal tract
    assert ac.gender_decision(160.0, 1250.0)["gender"] == "female"
    # the evidence explains the decision: per-cue LLRs add up; a dropped cue says why and contributes nothing
    d = ac.gender_decision(150.0, 1100.0, dropped={"dispersion": "effective bandwidth 2500 Hz"})
    assert d["gender_evidence"]["dispersion"]["llr"] is None
    assert d["gender_evidence"]["dispersion"]["dropped"] == "effective bandwidth 2500 Hz"
    assert d["gender_llr"] == pytest.approx(d["gender_evidence"]["f0"]["llr"], abs=1e-3)
    both = ac.gender_decision(150.0, 1100.0)
    assert both["gender_llr"] == pytest.approx(both["gender_evidence"]["f0"]["llr"] +
                                               both["gender_evidence"]["dispersion"]["llr"], abs=2e-3)
    # the confidence is the posterior of the likelier sex under equal priors
    p = 1 / (1 + math.exp(-both["gender_llr"]))
    assert both["gender_confidence"] == pytest.approx(max(p, 1 - p), abs=1e-3)
    assert ac.gender_decision(None, None) == {"gender": "unknown", "gender_confidence": 0.5, "gender_llr": 0.0,
                                              "gender_evidence": ac.gender_decision(None, None)["gender_evidence"]}


def test_f0_range():
    track = np.concatenate([np.zeros(10), np.linspace(100.0, 200.0, 101)])
    assert ac.f0_range(track) == pytest.approx(80.0)  # 10-90 percentile of the voiced values only
    assert math.isnan(ac.f0_range(np.array([0.0, 120.0, 0.0])))


def test_effective_bandwidth_finds_the_band_edge():
    from scipy.signal import butter, sosfiltfilt

    rng = np.random.default_rng(0)
    voice = harmonic_tone(140.0, 1.0) + 0.02 * rng.standard_normal(SR).astype(np.float32)
    wide = sosfiltfilt(butter(4, 7000, fs=SR, output="sos"), voice)
    assert ac.effective_bandwidth_hz(wide) > 6000
    import soxr

    phone = soxr.resample(soxr.resample(voice, SR, 8000), 8000, SR)  # 8 kHz channel: nothing above 4 kHz
    bw = ac.effective_bandwidth_hz(phone)
    assert 3000 < bw <= 4100, bw
    assert math.isnan(ac.effective_bandwidth_hz(np.zeros(SR, np.float32)))
    # the formant analysis follows the band
    assert ac.formant_settings(8000.0) == (5500.0, 5.0, 4)
    ceiling, count, use = ac.formant_settings(3900.0)
    assert ceiling == 3900.0 and use == 3 and 3.0 <= count <= 4.0
    assert ac.formant_settings(2500.0) is None and ac.formant_settings(float("nan")) is None


def test_clipped_fraction():
    x = harmonic_tone(150.0, 1.0)
    assert ac.clipped_fraction(x) < 0.001  # a smooth peak: no flat top
    hard = np.clip(x * 10, -1.0, 1.0)
    assert ac.clipped_fraction(hard) > 0.2
    assert ac.clipped_fraction(np.clip(x * 10, -0.5, 0.5)) > 0.2  # clipped, then scaled down
    assert ac.clipped_fraction(np.zeros(10, np.float32)) == 0.0


def test_flatness_span_finds_a_voice_in_noise_and_not_noise_alone():
    rng = np.random.default_rng(2)
    x = padded(harmonic_tone(150.0, 1.5, vibrato=3.0), lead=0.6, trail=0.9)
    noisy = x + 0.003 * rng.standard_normal(x.size).astype(np.float32)
    span = ac.speech_span_flatness(noisy)
    assert abs(span[0] - 0.6) < 0.06 and abs(span[1] - 2.1) < 0.06, span
    assert ac.speech_span_flatness(0.1 * rng.standard_normal(SR).astype(np.float32)) is None
    assert ac.speech_span_flatness(np.zeros(SR, np.float32)) is None


def synthetic_vowel(formants, f0=120.0, bw=80.0):
    """A pulse train through two-pole resonators at known formants."""
    from scipy.signal import lfilter

    src = np.zeros(SR)
    src[:: int(SR / f0)] = 1.0
    y = src
    for f in formants:
        r = math.exp(-math.pi * bw / SR)
        y = lfilter([1.0], [1.0, -2 * r * math.cos(2 * math.pi * f / SR), r * r], y)
    return (y / np.max(np.abs(y)) * 0.5).astype(np.float32)


def test_lpc_formants_of_synthetic_vowel():
    formants = (700.0, 1220.0, 2600.0, 3500.0)
    y = synthetic_vowel(formants)
    times = np.linspace(0.1, 0.9, 20)
    est = ac.lpc_formants(y, times)
    assert np.all(np.abs(est / np.array(formants) - 1) < 0.08), est  # F1 sits near a harmonic
    # Praat looks for 5 formants below 5.5 kHz: with a fifth resonance (4.5 kHz) every slot holds a formant
    burg = ac.praat_formants(synthetic_vowel(formants + (4500.0,)), times)
    assert np.all(np.abs(burg / np.array(formants) - 1) < 0.12), burg  # F1 near a harmonic
    # covariance LPC drops broad poles itself: F1..F3 of the four-formant vowel
    cov = ac.praat_covariance_formants(y, times)
    assert np.all(np.abs(cov[:3] / np.array(formants[:3]) - 1) < 0.12), cov
    # with four, Burg puts its spare slot between F3 and F4 as a broad pole (over 1 kHz wide): reading that as F4
    # would shift the formants above it, so those frames are left out (and here no frame is left)
    assert np.all(np.isnan(ac.praat_formants(y, times)))
    broad_allowed = ac.FORMANT_MAX_BANDWIDTH_HZ
    try:
        ac.FORMANT_MAX_BANDWIDTH_HZ = 0.0  # no resonance check: slot 4 reads the broad pole near F3
        loose = ac.praat_formants(y, times)
    finally:
        ac.FORMANT_MAX_BANDWIDTH_HZ = broad_allowed
    assert np.all(np.abs(loose[:3] / np.array(formants[:3]) - 1) < 0.08) and abs(loose[3] / formants[2] - 1) < 0.05
    # band-limited analysis: three formants under a 3.9 kHz ceiling
    three = ac.lpc_formants(y, times, 3900.0, 3.5, 3)
    assert np.all(np.abs(three[:3] / np.array(formants[:3]) - 1) < 0.08) and math.isnan(three[3]), three


def test_classes_follow_documented_bands():
    assert [ac.pitch_class(f, "male") for f in (94.9, 95.0, 130.0, 130.1)] == ["low", "medium", "medium", "high"]
    assert [ac.pitch_class(f, "female") for f in (174, 175, 235, 236)] == ["low", "medium", "medium", "high"]
    for unknown in ("unknown", None):  # absolute bands when the sex is not known with confidence
        assert [ac.pitch_class(f, unknown) for f in (94.9, 95.0, 235.0, 235.1)] == ["low", "medium", "medium", "high"]
        # an absolute low or high is the level either sex's range gives: it never contradicts both of them
        for f0 in np.arange(60.0, 400.0, 0.5):
            level = ac.pitch_class(f0, unknown)
            if level != "medium":
                assert ac.pitch_class(f0, "male") == ac.pitch_class(f0, "female") == level, f0
            if ac.pitch_class(f0, "male") == ac.pitch_class(f0, "female"):
                assert level == ac.pitch_class(f0, "male"), f0
    # syllables per second; espeak-ng's default 175 words per minute (4.7-5.9 syllables/s here) is normal
    assert [ac.rate_class(w) for w in (2.99, 3.0, 5.9, 6.5, 6.51)] == ["slow", "normal", "normal", "normal", "fast"]
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
