"""`eureka-audio dataflux`: arguments checked before anything is written, a run in which every clip fails is an
error naming the cause, a missing optional package is named at start, and Ctrl-C / SIGTERM keep finished clips."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from cli_helpers import (assert_one_line_error, cli_env, popen_cli, read_manifest, run_cli, write_tone)


def test_misspelt_audio_dir_leaves_nothing_and_the_next_run_works(tmp_path, tone_dir, offline_config):
    out = tmp_path / "out"
    proc = run_cli("dataflux", "run", "--audio-dir", tmp_path / "tonez", "--out", out, "--config", offline_config,
                   "--no-progress")
    assert_one_line_error(proc, "dataflux run", "audio directory not found", str(tmp_path / "tonez"), code=2)
    assert not out.exists()
    # the same --out is then usable (nothing half-made refuses it), and resume of it says there is no run
    proc = run_cli("dataflux", "resume", "--out", out, "--no-progress")
    assert_one_line_error(proc, "dataflux resume", "no such directory")
    proc = run_cli("dataflux", "run", "--audio-dir", tone_dir, "--out", out, "--config", offline_config,
                   "--no-progress", "--limit", "1")
    assert proc.returncode == 0, proc.stderr
    assert read_manifest(out)["complete"] and len(read_manifest(out)["done"]) == 1


def test_empty_audio_dir_and_a_file_as_audio_dir(tmp_path, offline_config):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not audio")
    out = tmp_path / "out"
    out.mkdir()  # an existing empty --out stays as it was
    proc = run_cli("dataflux", "run", "--audio-dir", empty, "--out", out, "--config", offline_config)
    assert_one_line_error(proc, "dataflux run", "no audio files", str(empty), code=2)
    assert os.listdir(out) == []
    clip = write_tone(tmp_path / "one.wav", 0.5, 200)
    proc = run_cli("dataflux", "run", "--audio-dir", clip, "--out", tmp_path / "out2", "--config", offline_config)
    assert_one_line_error(proc, "dataflux run", "is a file, not a directory", code=2)
    assert not (tmp_path / "out2").exists()


def test_argument_errors_are_one_line(tmp_path, tone_dir, offline_config):
    proc = run_cli("dataflux", "run", "--audio-dir", tone_dir, "--out", tmp_path / "o", "--workers", "0")
    assert_one_line_error(proc, "dataflux run", "--workers must be >= 1", code=2)
    bad = tmp_path / "bad.yaml"
    bad.write_text("pipeline: {rounds: 2, colour: red}\n")
    proc = run_cli("dataflux", "run", "--audio-dir", tone_dir, "--out", tmp_path / "o", "--config", bad)
    assert_one_line_error(proc, "dataflux run", "colour", code=2)
    proc = run_cli("dataflux", "run", "--audio-dir", tone_dir, "--out", tmp_path / "o", "--config",
                   tmp_path / "missing.yaml")
    assert_one_line_error(proc, "dataflux run", "missing.yaml", code=2)
    keyed = tmp_path / "keyed.yaml"
    keyed.write_text("roles: {judge: {backend: openai, base_url: 'http://127.0.0.1:9/v1', model: m, "
                     "api_key_env: EUREKA_TEST_UNSET_KEY}}\n")
    proc = run_cli("dataflux", "run", "--audio-dir", tone_dir, "--out", tmp_path / "o", "--config", keyed,
                   env_extra={"EUREKA_TEST_UNSET_KEY": ""})
    assert_one_line_error(proc, "dataflux run", "roles.judge", "EUREKA_TEST_UNSET_KEY", code=2)
    assert not (tmp_path / "o").exists()
    proc = run_cli("dataflux", "stats", "--out", tmp_path / "o")
    assert_one_line_error(proc, "dataflux stats", "no DataFlux run here")


def test_debug_flag_and_environment_variable_show_the_traceback(tmp_path):
    for extra, env in ((["--debug"], None), ([], {"EUREKA_AUDIO_DEBUG": "1"})):
        proc = run_cli("dataflux", "stats", "--out", tmp_path / "nothing", *extra, env_extra=env)
        assert proc.returncode != 0 and "Traceback" in proc.stderr and "no DataFlux run here" in proc.stderr


def test_every_clip_failing_is_an_error_naming_the_cause(tmp_path, offline_config):
    audio = tmp_path / "audio"
    audio.mkdir()
    (audio / "a.wav").write_bytes(b"RIFF\x10\x00\x00\x00WAVEjunk")
    (audio / "b.wav").write_bytes(b"")
    out = tmp_path / "out"
    proc = run_cli("dataflux", "run", "--audio-dir", audio, "--out", out, "--config", offline_config,
                   "--no-progress")
    line = assert_one_line_error(proc, "dataflux run", "all 2 clip(s) failed", "unreadable_audio: 2",
                                 str(audio / "a.wav"), code=1)
    assert "rejected" in line
    assert len(read_manifest(out)["failed"]) == 2  # the run itself is recorded (stats, rejected/) as usual


def test_missing_optional_package_is_named_at_start(tmp_path, tone_dir):
    """parselmouth hidden from the interpreter: one line naming the pip package, before any output is made."""
    out = tmp_path / "out"
    code = ("import sys; sys.modules['parselmouth'] = None; from eureka_fast.cli import main; "
            f"sys.exit(main(['dataflux', 'run', '--audio-dir', {str(tone_dir)!r}, '--out', {str(out)!r}]))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=cli_env())
    assert_one_line_error(proc, "dataflux run", "praat-parselmouth", "pip install praat-parselmouth", code=2)
    assert not out.exists()


def _wait_for_committed(out, n, proc, deadline_s=180.0):
    manifest = os.path.join(out, "manifest.json")
    deadline = time.time() + deadline_s
    while time.time() < deadline and proc.poll() is None:
        try:
            with open(manifest, encoding="utf-8") as fh:
                if len(json.load(fh)["done"]) >= n:
                    return True
        except (OSError, ValueError):
            pass
        time.sleep(0.05)
    return False


@pytest.mark.parametrize("sig, code, word", [(signal.SIGINT, 130, "interrupted"),
                                             (signal.SIGTERM, 143, "terminated")])
def test_interrupt_commits_finished_clips_and_resume_continues(sig, code, word, tmp_path, offline_config):
    """With the default shard size (200 clips), the clips finished before Ctrl-C / SIGTERM are kept, the command
    says how to resume in one line, and resume does only the rest."""
    audio = tmp_path / "audio"
    audio.mkdir()
    n = 8
    for i in range(n):
        write_tone(audio / f"c{i}.wav", 2.0, 120 + 30 * i)
    out = tmp_path / "out"
    # the run pauses after committing its first clip: otherwise its batch commits the rest within milliseconds
    # and may finish before the signal arrives
    proc = popen_cli("dataflux", "run", "--audio-dir", audio, "--out", out, "--config", offline_config,
                     "--no-progress", env_extra={"EUREKA_DATAFLUX_PAUSE_AT": "after_manifest:1:5"})
    try:
        if not _wait_for_committed(out, 1, proc):
            pytest.skip("the run finished (or stalled) before it could be interrupted")
        proc.send_signal(sig)
        _, stderr = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    assert proc.returncode == code, stderr
    assert "Traceback" not in stderr, stderr
    last = [line for line in stderr.splitlines() if line.strip()][-1]
    assert last.startswith(f"eureka-audio dataflux run: {word}") and "dataflux resume --out" in last, last
    kept = read_manifest(out)
    assert not kept["complete"] and 1 <= len(kept["done"]) < n
    with open(out / "clips.jsonl", encoding="utf-8") as fh:
        assert len([line for line in fh if line.strip()]) >= len(kept["done"])

    proc = run_cli("dataflux", "resume", "--out", out, "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert f"{len(kept['done'])} already done, {n - len(kept['done'])} to do" in proc.stderr
    final = read_manifest(out)
    assert final["complete"] and sorted(final["done"]) == sorted(set(final["done"])) and len(final["done"]) == n
    assert final["done"][:len(kept["done"])] == kept["done"]
