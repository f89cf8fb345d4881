"""Speaker facts on recordings of real speakers (eureka_fast.dataflux.real_speech).

Two CMU ARCTIC clips ship with the tests (python_tests/dataflux/data/real, licence kept beside them): awb (male) and
slt (female). Derived conditions of them stand for what real data does to the cues: a telephone channel (nothing
above 3.4 kHz), noise, and an expressive delivery (the same vocal tract with F0 raised into the other sex's range).
Larger checks run on PBX voice prompts from Debian packages when installed, and skip naming the packages otherwise.
None of these recordings chose a threshold; they check that the literature-based cues carry over."""
import os

import numpy as np
import pytest

from eureka_fast.dataflux import acoustics as ac
from eureka_fast.dataflux import real_speech as rs
from eureka_fast.dataflux.captioner import analyse

DATA = os.path.join(os.path.dirname(__file__), "data", "real")


def load(name):
    from eureka_fast.dataflux.audio_io import read_clip_or_reject

    return read_clip_or_reject(os.path.join(DATA, name))


@pytest.fixture(scope="module")
def awb():
    return load("awb_arctic_a0007.wav")


@pytest.fixture(scope="module")
def slt():
    return load("slt_arctic_a0009.wav")


def test_shipped_clips_are_the_documented_recordings(awb, slt):
    assert os.path.exists(os.path.join(DATA, "COPYING.cmu_arctic"))
    assert awb.size == 64000 and slt.size == 49520  # 4.0 s and 3.1 s at 16 kHz, as shipped
    shipped = {s.id: s for s in rs.SOURCES if s.install == "shipped with the tests"}
    assert shipped["arctic-awb"].sex == "male" and shipped["arctic-slt"].sex == "female"
    assert {c.source.id for c in rs.find_clips(per_source=1)} >= {"arctic-awb", "arctic-slt"}


def test_male_studio_voice(awb):
    f = analyse(awb, "")
    assert f["gender"] == "male" and f["gender_confidence"] >= ac.GENDER_MIN_CONFIDENCE
    ev = f["gender_evidence"]
    assert ev["f0"]["llr"] < 0 and ev["dispersion"]["llr"] < 0  # both cues say male
    assert f["bandwidth_hz"] > 7000 and f["formants_hz"][3] is not None  # wideband: F1..F4 read
    assert f["pitch_level_basis"] == "male range" and f["pitch_level"] == ac.pitch_class(f["f0_median_hz"], "male")


def test_female_studio_voice_is_never_called_male(slt):
    f = analyse(slt, "")
    assert f["gender"] in ("female", "unknown")
    assert f["gender_evidence"]["f0"]["llr"] > 0
    if f["gender"] == "unknown":  # then pitch is judged on the absolute bands, not on a guessed sex's range
        assert f["pitch_level_basis"] == "absolute bands"
        assert f["pitch_level"] == ac.pitch_class(f["f0_median_hz"], None)


@pytest.mark.parametrize("name,sex", [("awb_arctic_a0007.wav", "male"), ("slt_arctic_a0009.wav", "female")])
def test_telephone_band_reads_no_cue_outside_the_band(name, sex):
    clip = rs.telephone_band(load(name))
    f = analyse(clip, "")
    assert f["bandwidth_hz"] < 4200
    assert f["formants_hz"][3] is None  # F4 is not read from an empty band
    assert f["gender"] in (sex, "unknown"), f["gender_evidence"]


@pytest.mark.parametrize("name,sex", [("awb_arctic_a0007.wav", "male"), ("slt_arctic_a0009.wav", "female")])
def test_noisy_copy_never_flips_the_sex(name, sex):
    f = analyse(rs.add_noise(load(name), 10.0, seed=1), "")
    assert f["noise"] == "noisy"
    assert f["gender"] in (sex, "unknown"), f["gender_evidence"]


def test_expressive_male_with_female_range_f0_is_not_called_female(awb):
    raised = rs.shift_pitch(awb, 235.0, 1.5)
    f = analyse(raised, "")
    assert f["f0_median_hz"] > 215 and f["f0_range_hz"] > analyse(awb, "")["f0_range_hz"]
    assert f["gender"] in ("male", "unknown"), f["gender_evidence"]
    assert f["gender_evidence"]["f0"]["llr"] > 0 > f["gender_evidence"]["dispersion"]["llr"]
    if f["gender"] == "unknown":
        assert f["pitch_level_basis"] == "absolute bands"


def test_clipping_drops_the_formant_cue(awb):
    clipped = np.clip(awb * 8.0, -0.5, 0.5)
    f = analyse(clipped, "")
    assert f["clipped_fraction"] > ac.MAX_CLIPPED_FRACTION
    assert "clipped" in f["gender_evidence"]["dispersion"]["dropped"]
    assert f["gender"] == "unknown"  # F0 alone never decides


def test_answerers_measure_independently(awb):
    from eureka_fast.dataflux.asr import NoASR
    from eureka_fast.dataflux.builtin_roles import MeasuringAnswerer

    class Ctx:
        def __init__(self, audio):
            self.audio, self.cache = audio, {}

    cap = analyse(awb, "")
    a = MeasuringAnswerer("a", NoASR(), []).measure(Ctx(awb))
    b = MeasuringAnswerer("b", NoASR(), []).measure(Ctx(awb))
    # three F0 trackers agree on a clean voice, within a few percent
    for m in (a, b):
        assert abs(m["f0"] / cap["f0_median_hz"] - 1) < 0.05
        assert m["gender"] in ("male", "unknown")
    # but the numbers come from different methods (spans and formants differ)
    assert a["span"] != b["span"] and a["dispersion"] != b["dispersion"] != cap["formant_dispersion_hz"]


@pytest.fixture(scope="module")
def installed_prompts():
    clips = [c for c in rs.find_clips(per_source=6) if c.source.install != "shipped with the tests"]
    if not clips:
        pytest.skip("no PBX voice prompts installed; for this check install: " + "; ".join(rs.missing_sources()))
    return clips


def test_installed_real_recordings(installed_prompts):
    """Telephone-band prompts in five languages (and wideband English): gender right where it answers."""
    rows = [(c, analyse(c.audio, "")) for c in installed_prompts]
    answered = [(c, f) for c, f in rows if f["gender"] in ("male", "female")]
    wrong = [(c.path, f["gender"], f["gender_evidence"]) for c, f in answered if f["gender"] != c.source.sex]
    assert len(answered) >= 0.5 * len(rows)
    assert len(wrong) <= 0.1 * len(answered), wrong
    for c, f in rows:
        if c.condition == "telephone":
            assert f["bandwidth_hz"] < 4200 and f["formants_hz"][3] is None, c.path
