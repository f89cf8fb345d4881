"""roles.captioner.asr_window (full | trimmed): read from the config, carried to the batched speech recognition of
both recognisers (and the answerers that read them), a bad value is a clear config error before anything is written,
and the nano recipe's DataFlux settings use the trimmed window."""
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import yaml

from eureka_fast.dataflux import asr as asr_module
from eureka_fast.dataflux.runner import ConfigError, load_config, run_dataflux

RECIPE_CONFIG = os.path.join(os.path.dirname(__file__), "..", "..", "eureka_fast", "recipe", "nano",
                             "dataflux.yaml")


def write_config(path, roles):
    path.write_text(yaml.safe_dump({"pipeline": {"rounds": 1}, "roles": roles}))
    return str(path)


def test_config_reads_asr_window(tmp_path):
    cfg = load_config(write_config(tmp_path / "c.yaml", {"captioner": {"asr_window": "trimmed"}}))
    assert cfg["roles"]["captioner"]["asr_window"] == "trimmed"
    assert load_config(None)["roles"] == {}  # default: no option, the full window


@pytest.mark.parametrize("value", ["half", "Trimmed", 30, None, ["trimmed"]])
def test_bad_asr_window_is_a_config_error(tmp_path, value):
    path = write_config(tmp_path / "c.yaml", {"captioner": {"asr_window": value}})
    expected = f"c.yaml: roles.captioner.asr_window must be one of full, trimmed, got {value!r}"
    with pytest.raises(ConfigError, match=re.escape(expected)):
        load_config(path)


def test_asr_window_on_a_role_without_speech_recognition_is_a_config_error(tmp_path):
    path = write_config(tmp_path / "c.yaml", {"judge": {"asr_window": "trimmed"}})
    with pytest.raises(ConfigError, match=r"roles\.judge\.asr_window: only captioner, answerer_a, answerer_b"):
        load_config(path)


def test_recipe_dataflux_settings_use_the_trimmed_window():
    cfg = load_config(RECIPE_CONFIG)
    assert cfg["roles"]["captioner"]["asr_window"] == "trimmed"


def test_cli_reports_a_bad_asr_window_and_writes_nothing(tmp_path, tiny_audio_dir):
    config = write_config(tmp_path / "bad.yaml", {"captioner": {"backend": "builtin", "asr_window": "half"}})
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    proc = subprocess.run([sys.executable, "-m", "eureka_fast.cli", "dataflux", "run", "--audio-dir", tiny_audio_dir,
                           "--out", str(out), "--config", config], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode != 0
    assert "roles.captioner.asr_window must be one of full, trimmed, got 'half'" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists()


class Window:
    def __init__(self, text):
        self.text, self.tokens, self.sum_logprob, self.fell_back = text, [1] * len(text.split()), -0.2, False


class RecordingModel:
    """Stands in for the loaded Whisper: 'hears' each clip's known text (by its length) and records the options
    of every decode call, one list per recogniser built on it."""

    def __init__(self, texts):
        self.texts, self.calls = texts, []

    def decode_windows(self, audio, **options):
        self.calls.append(("one", options))
        return [Window(self.texts.get(audio.size, ""))]

    def decode_clips(self, clips, batch_size=8, **options):
        self.calls.append(("batch", options))
        return [[Window(self.texts.get(a.size, ""))] for a in clips]


@pytest.fixture
def recording_model(monkeypatch, small_clips):
    import eureka_fast.models.whisper as whisper

    clips, _, _ = small_clips
    model = RecordingModel({c.audio.size: c.text for c in clips})
    monkeypatch.setattr(whisper, "load_whisper_model", lambda name="tiny.en": model)
    monkeypatch.setattr(asr_module, "_CACHE", {})
    return model


def run_with(tmp_path, small_clips, roles, name):
    clips, paths, _ = small_clips
    audio = tmp_path / f"{name}-audio"
    audio.mkdir()
    for c in clips[:3]:
        shutil.copy(paths[c.clip_id], audio / os.path.basename(paths[c.clip_id]))
    cfg = load_config(None, {"batch_size": 4, "workers": 1, "rounds": 1, "questions_per_category": 1,
                             "categories": ["spoken_word"]})
    cfg["roles"] = roles
    out = tmp_path / f"{name}-out"
    run_dataflux(str(audio), str(out), cfg, progress=False, log=lambda m: None)
    with open(out / "captions.jsonl", encoding="utf-8") as fh:
        captions = [json.loads(line) for line in fh]
    return captions


def test_trimmed_window_reaches_both_batched_recognisers(tmp_path, small_clips, recording_model):
    captions = run_with(tmp_path, small_clips, {"captioner": {"asr": "eureka", "asr_window": "trimmed"},
                                                "answerer_a": {"asr": "eureka"}, "answerer_b": {"asr": "eureka"}},
                        "trimmed")
    batch_options = [opts for kind, opts in recording_model.calls if kind == "batch"]
    # one batched call per recogniser (3 clips, batch size 4), nothing transcribed again clip by clip
    assert sorted(batch_options, key=lambda o: sorted(o.items())) == sorted(
        [{"window": "trimmed"}, {"window": "trimmed", **asr_module.SECOND_DECODING}],
        key=lambda o: sorted(o.items()))
    assert [kind for kind, _ in recording_model.calls] == ["batch", "batch"]
    for caption in captions:
        check = caption["facts"]["transcript_check"]
        assert check["recogniser"] == "eureka-whisper-tiny.en-trimmed-int8-beam5" and check["verified"]
        assert caption["provenance"]["captioner"].endswith("eureka-whisper-tiny.en-trimmed")


def test_default_window_is_full(tmp_path, small_clips, recording_model):
    captions = run_with(tmp_path, small_clips, {"captioner": {"asr": "eureka"}}, "full")
    batch_options = [opts for kind, opts in recording_model.calls if kind == "batch"]
    assert {opts.get("window", "full") for opts in batch_options} == {"full"}
    assert {c["facts"]["transcript_check"]["recogniser"] for c in captions} == {"eureka-whisper-tiny.en-int8-beam5"}


def test_an_unsure_first_transcript_is_not_confirmed_however_well_the_second_agrees():
    from eureka_fast.dataflux.asr import MIN_TRANSCRIPT_LOGPROB, check_transcript

    said = "Please remember to bring your umbrella today"
    sure = check_transcript(said, said.lower(), "second", confidence=MIN_TRANSCRIPT_LOGPROB + 0.3)
    assert sure["verified"] and "reason" not in sure
    unsure = check_transcript(said, said.lower(), "second", confidence=MIN_TRANSCRIPT_LOGPROB - 0.3)
    assert not unsure["verified"] and "unsure" in unsure["reason"] and unsure["agreement"] == 1.0
    assert check_transcript(said, said, "second", confidence=None)["verified"]  # a recogniser that gives none
    apart = check_transcript(said, "Please remember to ring a roundfire stump", "second", confidence=-0.1)
    assert not apart["verified"] and "agree on 43% of the words" in apart["reason"]
