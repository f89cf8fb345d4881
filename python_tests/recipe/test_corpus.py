"""The recipe's corpus builder: a real quick corpus synthesised with espeak-ng, checked against independent measurements
(soundfile headers, Praat F0 on the written clean clips, Whisper tiny.en on the audio) and against its own promises:
disjoint held-out voices and sentences, balanced labels, reuse of a finished corpus."""
from __future__ import annotations

import json
import os
import re
from collections import Counter

import pytest

from eureka_fast.dataflux.synthetic import espeak_available

pytestmark = pytest.mark.skipif(not espeak_available(), reason="needs espeak-ng (program or espeakng-loader wheel)")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from eureka_fast.recipe.corpus import build_corpus, read_corpus

    out = str(tmp_path_factory.mktemp("corpus"))
    lines = []
    summary = build_corpus(out, quick=True, seed=0, workers=2, progress=lines.append)
    return out, summary, read_corpus(out), lines


def _key(text):
    return " ".join(re.findall(r"[a-z0-9']+", text.lower()))


def test_files_and_rows(corpus):
    import soundfile as sf

    out, summary, rows, lines = corpus
    assert summary["clips"] == {"train": 24, "heldout": 12} and len(rows) == 36
    assert summary["reused"] is False and summary["seconds"] > 0
    assert any("36/36 clips" in line for line in lines)  # progress reached the end
    ids = [r["id"] for r in rows]
    assert len(set(ids)) == len(ids)
    for r in rows:
        assert r["audio"] == f"audio/{r['split']}/{r['id']}.wav"
        info = sf.info(os.path.join(out, r["audio"]))
        assert (info.samplerate, info.channels) == (16000, 1)
        assert info.frames / 16000 == pytest.approx(r["duration_s"], abs=1e-3)
        assert 1.5 < r["duration_s"] < 12.0
        assert r["voice"] == f"{r['accent']}+{r['variant']}"
        assert r["gender"] == ("male" if r["variant"].startswith("m") else "female")
        assert r["noise"] == ("clean" if r["snr_db"] is None or r["snr_db"] >= 20 else "noisy")
    # every row in the file is one of these, and nothing else is in the audio folders
    on_disk = {f"audio/{s}/{f}" for s in ("train", "heldout") for f in os.listdir(os.path.join(out, "audio", s))}
    assert on_disk == {r["audio"] for r in rows}


def test_held_out_voices_and_sentences_never_in_training(corpus):
    _, summary, rows, _ = corpus
    train = [r for r in rows if r["split"] == "train"]
    held = [r for r in rows if r["split"] == "heldout"]
    assert {r["variant"] for r in train}.isdisjoint({r["variant"] for r in held})
    assert {_key(r["text"]) for r in train}.isdisjoint({_key(r["text"]) for r in held})
    held_genders = {r["gender"] for r in held}
    assert held_genders == {"male", "female"}  # at least one held-out variant of each
    assert set(summary["held_out_variants"]) == {r["variant"] for r in held}
    assert len({r["variant"] for r in train}) >= 6 and len({r["accent"] for r in rows}) >= 3


def test_labels_balanced_in_both_splits(corpus):
    _, _, rows, _ = corpus
    classes = {"gender": ("male", "female"), "pitch_level": ("low", "medium", "high"),
               "speaking_rate": ("slow", "normal", "fast"), "noise": ("clean", "noisy")}
    for split, n in (("train", 24), ("heldout", 12)):
        part = [r for r in rows if r["split"] == split]
        for attr, values in classes.items():
            counts = Counter(r[attr] for r in part)
            assert set(counts) <= set(values), (split, attr, counts)
            # the plan is exactly balanced; a measured label may miss its target on the odd clip
            for v in values:
                assert abs(counts[v] - n / len(values)) <= max(1, n // 12), (split, attr, counts)


def test_pitch_labels_match_an_independent_measurement_of_the_written_clean_clips(corpus):
    """Re-measure the F0 of clean clips from the wav files (16-bit, as written) and classify with the dataflux
    synthetic-set rules: the corpus must have labelled them the same way."""
    import soundfile as sf

    from eureka_fast.dataflux.synthetic import pitch_class, reference_f0, speech_span

    out, _, rows, _ = corpus
    clean = [r for r in rows if r["snr_db"] is None][:6]
    assert len(clean) >= 4
    for r in clean:
        audio, _ = sf.read(os.path.join(out, r["audio"]), dtype="float32")
        lo, hi = speech_span(audio)
        f0 = reference_f0(audio[lo:hi], r["gender"])
        assert f0 == pytest.approx(r["f0_median_hz"], rel=0.03)
        assert pitch_class(f0, r["gender"]) == r["pitch_level"]


def test_the_text_is_what_espeak_spoke(corpus):
    """Whisper tiny.en (the real model) on two clean normal-rate clips recovers the row's text."""
    from eureka_fast.models.whisper import load_whisper_model
    from eureka_fast.train.metrics_text import corpus_wer

    out, _, rows, _ = corpus
    picks = sorted((r for r in rows if r["noise"] == "clean" and r["speaking_rate"] == "normal"),
                   key=lambda r: r["id"])[:2]
    assert len(picks) == 2
    model = load_whisper_model("tiny.en")
    hyps = model.transcribe([os.path.join(out, r["audio"]) for r in picks])
    result = corpus_wer([r["text"] for r in picks], hyps)
    assert result.wer <= 0.25, list(zip([r["text"] for r in picks], hyps))


def test_a_finished_corpus_is_reused_and_a_different_one_refused(corpus):
    from eureka_fast.recipe.corpus import CorpusError, build_corpus

    out, summary, _, _ = corpus
    path = os.path.join(out, "corpus.jsonl")
    before = os.stat(path).st_mtime_ns
    again = build_corpus(out, quick=True, seed=0, workers=2, progress=False)
    assert again["reused"] is True and again["clips"] == summary["clips"]
    assert os.stat(path).st_mtime_ns == before
    with pytest.raises(CorpusError, match="seed"):
        build_corpus(out, quick=True, seed=1, progress=False)
    with pytest.raises(ValueError, match="workers"):
        build_corpus(os.path.join(out, "other"), quick=True, workers=0, progress=False)


def test_plan_is_deterministic_per_seed_and_full_size_is_balanced():
    from eureka_fast.recipe.corpus import HELD_OUT_VARIANTS, SIZES, plan_corpus

    assert plan_corpus(quick=True, seed=3) == plan_corpus(quick=True, seed=3)
    assert [p["text"] for p in plan_corpus(quick=True, seed=3)] != [p["text"] for p in plan_corpus(quick=True, seed=4)]
    full = plan_corpus(quick=False, seed=0)
    for split in ("train", "heldout"):
        part = [p for p in full if p["split"] == split]
        assert len(part) == SIZES["full"][split]
        for counts, k in ((Counter(p["gender"] for p in part), 2),
                          *((Counter(p["target"][a] for p in part), len(v)) for a, v in
                            (("pitch_level", "lmh"), ("speaking_rate", "snf"), ("noise", "cn")))):
            assert len(counts) == k and max(counts.values()) - min(counts.values()) <= 1, counts
        assert all((p["variant"] in HELD_OUT_VARIANTS) == (split == "heldout") for p in part)
        assert len({_key(p["text"]) for p in part}) == len(part)  # no sentence twice


def test_sentence_generator():
    import random

    from eureka_fast.recipe.corpus import generate_sentences, number_words, vocabulary

    assert number_words(45) == "forty five" and number_words(206) == "two hundred and six"
    assert number_words(12) == "twelve" and number_words(90) == "ninety"
    with pytest.raises(ValueError):
        number_words(1000)
    words = vocabulary()
    assert 250 <= len(words) <= 600
    sents = generate_sentences(500, random.Random(0))
    assert len({_key(s) for s in sents}) == 500
    assert sum(s.endswith("?") for s in sents) > 50  # questions
    assert sum("," in s for s in sents) > 30  # lists and two-clause sentences
    assert sum(bool(re.search(r"\b(twenty|thirty|forty|hundred|o'clock)\b", s)) for s in sents) > 20  # numbers
    assert not any(re.search(r"\d", s) for s in sents)  # numbers are words
    used = {w for s in sents for w in re.findall(r"[a-z']+", s.lower())}
    assert used <= words and len(used) > 200
    lengths = [len(s.split()) for s in sents]
    assert 4 <= min(lengths) and max(lengths) <= 16
    excl = generate_sentences(50, random.Random(1), exclude=sents)
    assert {_key(s) for s in excl}.isdisjoint({_key(s) for s in sents})


def test_corpus_rows_are_json_lines(corpus):
    out, _, _, _ = corpus
    with open(os.path.join(out, "corpus.jsonl"), encoding="utf-8") as fh:
        rows = [json.loads(line) for line in fh]
    keys = {"id", "audio", "split", "text", "voice", "variant", "gender", "pitch_level", "speaking_rate", "noise",
            "snr_db", "espeak_pitch", "espeak_speed_wpm", "duration_s"}
    assert all(keys <= set(r) for r in rows)


def test_command_line_reports_bad_input_in_one_line(tmp_path):
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = tmp_path / "c"
    proc = subprocess.run([sys.executable, "-m", "eureka_fast.recipe.corpus", str(out), "--quick", "--workers", "0"],
                          capture_output=True, text=True, timeout=120, env=env, cwd=root)
    assert proc.returncode == 1 and proc.stderr.strip() == "error: workers must be at least 1, got 0"
    assert not (out / "corpus.jsonl").exists()
    proc = subprocess.run([sys.executable, "-m", "eureka_fast.recipe.manifests", str(out), str(tmp_path / "none"),
                           str(tmp_path / "m")], capture_output=True, text=True, timeout=120, env=env, cwd=root)
    assert proc.returncode == 1 and "no DataFlux run there" in proc.stderr and "Traceback" not in proc.stderr
