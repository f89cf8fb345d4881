"""Kill-and-resume: a run killed at any point and resumed produces the same output as an uninterrupted run."""
import json
import os
import signal
import subprocess
import sys

import pytest
import yaml

from mock_openai import MockOpenAIServer, http_roles

from eureka_fast.dataflux.runner import load_config, run_dataflux
from eureka_fast.dataflux.store import RunStore
from run_helpers import wait_for_committed


def snapshot(out):
    """Everything a run committed, order-independent and without timings."""
    store = RunStore(out)
    store.manifest = json.load(open(os.path.join(out, "manifest.json")))
    assert store.manifest["complete"]
    kept = sorted(store.records("data"), key=lambda r: r["id"])
    rejected = sorted(store.records("rejected"), key=lambda r: r["id"])
    caps = sorted(store.read_jsonl("captions.jsonl"), key=lambda r: r["id"])
    clips = sorted(({k: v for k, v in c.items() if k != "seconds"} for c in store.read_jsonl("clips.jsonl")),
                   key=lambda r: r["id"])
    stats = json.load(open(os.path.join(out, "stats.json")))
    return {"kept": kept, "rejected": rejected, "captions": caps, "clips": clips, "stats": stats}


def _cli(args, env_extra=None, timeout=240):
    env = dict(os.environ, **(env_extra or {}))
    return subprocess.run([sys.executable, "-m", "eureka_fast.cli", "dataflux", *args, "--no-progress"],
                          capture_output=True, text=True, env=env, timeout=timeout)


@pytest.fixture(scope="module")
def mock_server():
    with MockOpenAIServer() as srv:  # no faults: replies are a pure function of the request
        yield srv


@pytest.fixture(scope="module")
def http_reference(tiny_audio_dir, mock_server, tmp_path_factory):
    d = tmp_path_factory.mktemp("resume_ref")
    cfg_path = d / "roles.yaml"
    cfg_path.write_text(yaml.safe_dump({"pipeline": {"shard_size": 1, "workers": 2},
                                        "roles": http_roles(mock_server.base_url, timeout_s=20)}))
    out = str(d / "ref")
    run_dataflux(tiny_audio_dir, out, load_config(str(cfg_path)), progress=False, log=lambda m: None)
    return str(cfg_path), snapshot(out)


@pytest.mark.parametrize("point", ["after_shard:2", "after_ledger:3", "after_manifest:2"])
def test_crash_at_commit_points_then_resume(point, tiny_audio_dir, http_reference, tmp_path):
    cfg_path, reference = http_reference
    out = str(tmp_path / "out")
    proc = _cli(["run", "--audio-dir", tiny_audio_dir, "--out", out, "--config", cfg_path],
                {"EUREKA_DATAFLUX_CRASH_AT": point})
    assert proc.returncode == 77, proc.stderr[-2000:]  # died at the injected point, mid-run
    manifest = json.load(open(os.path.join(out, "manifest.json")))
    assert not manifest["complete"] and len(manifest["done"]) < 4
    run_dataflux(None, out, resume=True, progress=False, log=lambda m: None)
    assert snapshot(out) == reference


def test_resume_of_finished_run_changes_nothing(tiny_audio_dir, http_reference, tmp_path):
    cfg_path, reference = http_reference
    out = str(tmp_path / "out")
    run_dataflux(tiny_audio_dir, out, load_config(cfg_path), progress=False, log=lambda m: None)
    run_dataflux(None, out, resume=True, progress=False, log=lambda m: None)
    assert snapshot(out) == reference
    with pytest.raises(FileExistsError, match="resume"):
        run_dataflux(tiny_audio_dir, out, load_config(cfg_path), progress=False, log=lambda m: None)


@pytest.mark.slow
def test_sigkill_offline_run_then_resume(tiny_audio_dir, tmp_path):
    """Built-in offline roles (signal analysis, no ASR so it stays fast), SIGKILL mid-run."""
    audio_dir = tiny_audio_dir
    cfg = tmp_path / "offline.yaml"
    cfg.write_text(yaml.safe_dump({"pipeline": {"shard_size": 1, "workers": 1, "rounds": 2,
                                                "categories": ["speaker_gender", "background_noise"]},
                                   "roles": {r: {"asr": "none"} for r in ("captioner", "answerer_a", "answerer_b")}}))
    ref = str(tmp_path / "ref")
    run_dataflux(audio_dir, ref, load_config(str(cfg)), progress=False, log=lambda m: None)
    reference = snapshot(ref)
    assert reference["kept"]

    out = str(tmp_path / "out")
    proc = subprocess.Popen([sys.executable, "-m", "eureka_fast.cli", "dataflux", "run", "--audio-dir", audio_dir,
                             "--out", out, "--config", str(cfg), "--no-progress"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    manifest = os.path.join(out, "manifest.json")
    # kill once a clip is committed (so the kill lands mid-run, between or inside commits)
    wait_for_committed(manifest, 1, proc)
    if proc.poll() is not None:
        pytest.skip("run finished before it could be killed")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(30)
    done_at_kill = len(json.load(open(manifest))["done"])
    assert done_at_kill < len(os.listdir(audio_dir))
    run_dataflux(None, out, resume=True, progress=False, log=lambda m: None)
    assert snapshot(out) == reference
