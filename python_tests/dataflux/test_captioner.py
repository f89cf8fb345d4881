"""Offline captioner on espeak-ng labelled speech (real Whisper tiny.en ASR).

The fixture set (conftest.SMALL_PLAN) covers both genders, the three pitch and speed classes, clean and noisy.
test_gender_where_f0_overlaps adds the voice/pitch pairs where espeak's male and female voices overlap in F0 (male
variants at -p92 vs. female variants at -p15). The full 108-clip grid is measured by bench/dataflux_captioner.py
(numbers in bench/RESULTS.md)."""
import pytest

from eureka_fast.dataflux import acoustics as ac
from eureka_fast.dataflux import synthetic
from eureka_fast.dataflux.asr import get_asr, word_error_rate
from eureka_fast.dataflux.captioner import BuiltinCaptioner, analyse

ATTRS = ("gender", "pitch_level", "speaking_rate", "noise")


class KnownText:
    """Stands in for ASR with the clip's known text, so these tests measure the signal analysis alone (fast)."""

    name = "known-text"

    def __init__(self, clips):
        self.by_len = {c.audio.size: c.text for c in clips}

    def transcribe(self, audio):
        return self.by_len[audio.size]


@pytest.fixture(scope="module")
def captions(small_clips):
    clips, _, _ = small_clips
    cap = BuiltinCaptioner(KnownText(clips))
    return [(c, *cap.caption(c.audio)) for c in clips]


def test_labels_span_every_class(small_clips):
    clips, _, _ = small_clips
    seen = {a: {c.labels[a] for c in clips} for a in ATTRS}
    assert seen["gender"] == {"male", "female"} and seen["noise"] == {"clean", "noisy"}
    assert seen["pitch_level"] == {"low", "medium", "high"} and seen["speaking_rate"] == {"slow", "normal", "fast"}


def test_facts_keys_and_caption(captions):
    for clip, text, facts in captions:
        for key in ("duration_s", "transcript", "loudness_dbfs", "snr_db", "noise", "f0_median_hz", "gender",
                    "pitch_level", "words_per_second", "speaking_rate"):
            assert key in facts, key
        assert abs(facts["duration_s"] - clip.audio.size / 16000) < 1e-3
        assert facts["gender"] in text and facts["speaking_rate"] in text
        assert ("is clean" if facts["noise"] == "clean" else "audible background noise") in text
        assert facts["transcript"] in text


def test_captioner_accuracy_per_attribute(captions):
    for attr in ATTRS:
        wrong = [(c.clip_id, f[attr], c.labels[attr]) for c, _, f in captions if f[attr] != c.labels[attr]]
        assert not wrong, (attr, wrong)


# High male voices and low female voices: F0 alone gets most of these wrong (male F0 above female F0 in each pair).
OVERLAP_PLAN = [
    ("m2", 92, 135, None), ("m4", 92, 80, 30.0), ("m5", 92, 270, 10.0), ("m6", 92, 135, 5.0),
    ("f1", 15, 135, None), ("f2", 15, 270, 30.0), ("f5", 15, 80, 10.0), ("f4", 15, 135, 5.0),
]


@pytest.mark.skipif(not synthetic.espeak_available(), reason="espeak-ng not installed")
def test_gender_where_f0_overlaps():
    clips = [synthetic.make_clip(100 + i, v, p, s, snr) for i, (v, p, s, snr) in enumerate(OVERLAP_PLAN)]
    facts = [analyse(c.audio, c.text) for c in clips]
    males = [f["f0_median_hz"] for c, f in zip(clips, facts) if c.labels["gender"] == "male"]
    females = [f["f0_median_hz"] for c, f in zip(clips, facts) if c.labels["gender"] == "female"]
    assert min(males) > min(females) and max(females) > min(males)  # F0 ranges really overlap
    wrong = [(c.clip_id, f["gender"], f["gender_score"], f["gender_evidence"]) for c, f in zip(clips, facts)
             if f["gender"] != c.labels["gender"]]
    assert not wrong, wrong
    for c, f in zip(clips, facts):
        # the decision is explained: the per-cue contributions add up to the score
        assert f["gender_score"] == pytest.approx(
            ac.GENDER_MODEL["intercept"] + sum(f["gender_evidence"].values()), abs=0.01)
        assert f["pitch_level"] == c.labels["pitch_level"], (c.clip_id, f["f0_median_hz"])


def test_snr_estimate_tracks_mixed_snr(captions):
    for clip, _, facts in captions:
        if clip.snr_db is not None:
            assert abs(facts["snr_db"] - clip.snr_db) < 3.0, (clip.clip_id, facts["snr_db"])
        else:
            assert facts["snr_db"] >= 25  # speech tails outside the VAD span count as "noise" here


@pytest.mark.slow
def test_with_real_asr_accuracy_and_wer(small_clips):
    """Real Whisper tiny.en on a few clips: rate classes still right, clean-speech WER bounded. (espeak's robotic
    voice is hard for tiny.en: the bench measures ~20-35% WER on clean espeak speech, see bench/RESULTS.md.)"""
    clips, _, _ = small_clips
    cap = BuiltinCaptioner(get_asr("auto"))
    errs = words = 0
    for c in [clips[0], clips[4], clips[6]]:  # clean or 30 dB; slow, normal and fast speech
        _, facts = cap.caption(c.audio)
        assert facts["speaking_rate"] == c.labels["speaking_rate"], (c.clip_id, facts["words_per_second"])
        assert facts["gender"] == c.labels["gender"]
        e, n = word_error_rate(c.text, facts["transcript"])
        errs, words = errs + e, words + n
    assert errs / words < 0.4, errs / words


def test_silence_has_no_speech_facts():
    import numpy as np

    facts = analyse(np.zeros(16000, np.float32), "")
    assert facts["has_speech"] is False and facts["gender"] is None and facts["speaking_rate"] is None
    assert facts["duration_s"] == 1.0


def test_gender_dev_set_is_disjoint_from_the_evaluation_grid():
    """The gender model is fitted on synthetic.dev_grid() (bench/dataflux_gender_fit.py) and evaluated on
    labelled_grid(): the two share no text, espeak pitch setting, speed or SNR."""
    assert not set(synthetic.DEV_TEXTS) & set(synthetic.TEXTS)
    for g in ("male", "female"):
        assert not set(synthetic.DEV_PITCH_SETTINGS[g]) & set(synthetic.PITCH_SETTINGS[g])
    assert not set(synthetic.DEV_SPEED_SETTINGS) & set(synthetic.SPEED_SETTINGS)
    assert not set(synthetic.DEV_NOISE_SETTINGS) & set(synthetic.NOISE_SETTINGS) - {None}
    if synthetic.espeak_available():
        dev = synthetic.dev_grid(limit=2)
        assert [c.text for c in dev] == list(synthetic.DEV_TEXTS[:2])
        assert all(c.espeak_pitch in synthetic.DEV_PITCH_SETTINGS["male"] for c in dev)
