"""WhisperModel.transcribe over a list of clips: token-for-token equal to one clip at a time, and clear errors."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from eureka_fast.models.whisper import load_whisper_model
from whisper_helpers import needs_espeak, needs_tiny

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def tiny_model():
    return load_whisper_model("tiny.en")


def espeak(tmp_path, text, name, voice="en", speed=150):
    from eureka_fast.audio import load_audio

    path = tmp_path / (name + ".wav")
    subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "-w", str(path), text], check=True,
                   capture_output=True)
    return load_audio(str(path))


@needs_tiny
@needs_espeak
def test_batched_windows_equal_one_clip_at_a_time(tiny_model, tmp_path):
    rng = np.random.default_rng(0)
    short = espeak(tmp_path, "Good morning.", "short", "en-us", 170)
    medium = espeak(tmp_path, "Please call Stella and ask her to bring these things.", "medium", "en+f3")
    longer = espeak(tmp_path, "The children walked slowly across the old bridge before the evening train arrived "
                              "at the small station.", "longer", "en", 140)
    noise = (rng.standard_normal(16000 * 4) * 0.1).astype(np.float32)
    # over 30 s: a sentence, silence past the window boundary, the sentence again (two windows, like one clip alone)
    long_clip = np.concatenate([medium, np.zeros(16000 * 30 - len(medium), np.float32), medium])
    clips = [short, noise, longer, long_clip, medium]
    lengths = [len(c) / 16000 for c in clips]
    assert lengths[0] < lengths[4] < lengths[2] < 30 < lengths[3]
    # batch_size 3 over 6 windows: the long clip's two windows land in different batches, rows of different lengths
    # finish at different steps, and the noise clip's window fails greedy and takes the fallback chain
    # shorter fallbacks than the defaults (the same options both ways) keep the noise clip's chain affordable
    options = dict(max_new_tokens=48, temperatures=(0.0, 0.5, 1.0), best_of=2)
    batched = tiny_model.decode_clips(clips, batch_size=3, **options)
    alone = [tiny_model.decode_windows(clip, **options) for clip in clips]
    assert [len(windows) for windows in batched] == [1, 1, 1, 2, 1]
    for index, (got, expected) in enumerate(zip(batched, alone)):
        for window, reference in zip(got, expected):
            assert window.tokens == reference.tokens, index
            assert (window.stop, window.attempts, window.temperature, window.beam_size) == (
                reference.stop, reference.attempts, reference.temperature, reference.beam_size), index
            assert window.sum_logprob == pytest.approx(reference.sum_logprob, abs=1e-3), index
    assert batched[1][0].fell_back  # the noise clip really exercised the per-clip fallback
    assert not batched[0][0].fell_back and not batched[2][0].fell_back
    assert "bring these things" in batched[4][0].text.lower()
    # the public API: a list gives a list of transcripts (windows joined as for one clip), one clip still a string
    texts = tiny_model.transcribe([short, medium], batch_size=2, **options)
    assert texts == [" ".join(w.text for w in alone[0]), " ".join(w.text for w in alone[4])]
    assert texts[1] == tiny_model.transcribe(medium) and isinstance(tiny_model.transcribe(short), str)
    assert tiny_model.transcribe([]) == []


@needs_tiny
def test_greedy_rows_leave_the_batch_like_the_full_batch_decode(tiny_model):
    """The row-dropping greedy decode against sample_decode (which keeps finished rows in the batch): same ids,
    log-probabilities and stop reasons, with the n-gram guard and a token cap."""
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(4, 1500, tiny_model.dims.n_audio_state, generator=generator)
    prompt = tiny_model.tokenizer.prompt(multilingual=False)
    for max_new_tokens in (None, 2):
        got = tiny_model._greedy_rows(features, prompt, max_new_tokens, (3, 16))
        expected = tiny_model.sample_decode(features, prompt, max_new_tokens, 0.0, None, (3, 16))
        assert [(ids, stop) for ids, _, stop in got] == [(ids, stop) for ids, _, stop in expected]
        assert [lp for _, lp, _ in got] == pytest.approx([lp for _, lp, _ in expected], abs=1e-3)
    # with the cap of 2, rows ending at step 1 leave the batch while the others run on to the cap
    assert {stop for _, _, stop in got} == {"eot", "length"}


@needs_tiny
@pytest.mark.parametrize("bad, message", [
    (None, "clip 1 is None"),
    (np.zeros(0, np.float32), "clip 1: .*zero samples"),
    (b"", "clip 1: "),
    (np.array([0.1, np.nan] * 800, np.float32), "clip 1: .*NaN"),
    (np.zeros((4, 4, 1600), np.float32), "clip 1: .*shape"),
    (np.array(["a", "b"]), "clip 1: "),
    ([np.zeros(1600, np.float32)], "clip 1 is a list"),
])
def test_bad_clip_is_named_by_its_index(tiny_model, bad, message):
    good = np.zeros(16000, np.float32)
    with pytest.raises(ValueError, match=message):
        tiny_model.transcribe([good, bad, good])


@needs_tiny
@pytest.mark.parametrize("batch_size", [0, -1, 2.5, True])
def test_batch_size_must_be_positive_integer(tiny_model, batch_size):
    with pytest.raises(ValueError, match="batch_size"):
        tiny_model.transcribe([np.zeros(16000, np.float32)], batch_size=batch_size)


@needs_tiny
@needs_espeak
def test_bench_transcribe_smoke():
    pytest.importorskip("faster_whisper")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "transcribe.py"), "--clips", "1",
                             "--real", "0", "--batch-size", "1", "--threads", "1", "--no-warmup",
                             "--engines", "ours-batched,ours-loop,ours-trimmed-int8,fw-int8"],
                            capture_output=True, text=True, timeout=180, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = {line.split("|")[1].strip(): line.split("|")[2:-1] for line in result.stdout.splitlines()
            if line.startswith("| ")}
    assert set(rows) == {"engine", "ours-batched", "ours-loop", "ours-trimmed-int8", "fw-int8"}
    header = [cell.strip() for cell in rows["engine"]]
    assert header == ["s", "clips/s", "speed vs fw-int8", "WER espeak", "WER recorded", "WER vs ours-loop",
                      "transcripts equal to ours-loop"]
    cells = {name: dict(zip(header, (c.strip() for c in row))) for name, row in rows.items() if name != "engine"}
    for name in ("ours-loop", "ours-batched"):  # the exact engines agree with the reference, word for word
        assert cells[name]["transcripts equal to ours-loop"] == "1/1"
        assert cells[name]["WER vs ours-loop"] == "0.0%"
    assert cells["fw-int8"]["speed vs fw-int8"] == "1.00x" and cells["fw-int8"]["WER recorded"] == "-"
    assert cells["ours-batched"]["WER espeak"] == cells["ours-loop"]["WER espeak"]
    assert all(row["WER espeak"].endswith("%") for row in cells.values())
    assert "ours-trimmed-int8 vs the fastest faster-whisper engine (fw-int8)" in result.stdout
