"""Offline captioner on espeak-ng labelled speech (real Whisper tiny.en ASR).

The fixture set (conftest.SMALL_PLAN) covers both genders, the three pitch and speed classes, clean and noisy. It
leaves out the voice/pitch pairs where espeak's voices overlap acoustically (m2/m4 at -p92 vs f1/f2/f5 at -p15);
the full 108-clip grid with those is measured by bench/dataflux_captioner.py (numbers in bench/RESULTS.md)."""
import pytest

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
