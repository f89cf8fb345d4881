"""`eureka-audio dataflux run|stats|resume` wiring, config validation, output layout."""
import json
import os
import subprocess
import sys

import pytest
import yaml

from mock_openai import MockOpenAIServer, http_roles

from eureka_fast.dataflux.runner import ConfigError, load_config


def test_example_config_and_taxonomy_ship_and_parse():
    import eureka_fast.dataflux as df

    here = os.path.dirname(df.__file__)
    cfg = load_config(os.path.join(here, "roles_example.yaml"))
    assert cfg["roles"]["query_generator"]["backend"] == "openai" and cfg["pipeline"]["rounds"] == 3
    assert os.path.exists(os.path.join(here, "taxonomy.yaml"))


def test_config_errors(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("pipelin: {}\n")
    with pytest.raises(ConfigError, match="unknown top-level"):
        load_config(str(p))
    p.write_text("pipeline: {rounds: 2, colour: red}\n")
    with pytest.raises(ConfigError, match="colour"):
        load_config(str(p))
    from eureka_fast.dataflux.roles import build_roles

    with pytest.raises(ValueError, match="backend"):
        build_roles({"judge": {"backend": "gpt"}}, [])
    with pytest.raises(ValueError, match="NOPE_KEY"):
        build_roles({"judge": {"backend": "openai", "base_url": "http://x/v1", "model": "m",
                               "api_key_env": "NOPE_KEY"}}, [])


def test_cli_run_then_stats(tiny_audio_dir, tmp_path):
    with MockOpenAIServer() as srv:
        cfg = tmp_path / "roles.yaml"
        cfg.write_text(yaml.safe_dump({"roles": http_roles(srv.base_url, timeout_s=20)}))
        out = tmp_path / "out"
        run = subprocess.run([sys.executable, "-m", "eureka_fast.cli", "dataflux", "run", "--audio-dir",
                              tiny_audio_dir, "--out", str(out), "--config", str(cfg), "--categories",
                              "clip_duration,background_noise", "--questions", "3", "--shard-size", "2"],
                             capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "clips/s" in run.stderr and "background_noise" in run.stderr  # summary table printed
    assert sorted(os.listdir(out)) == ["captions.jsonl", "clips.jsonl", "data", "manifest.json", "rejected",
                                       "run_config.json", "stats.json", "stats.txt"]
    stats = json.loads((out / "stats.json").read_text())
    assert set(stats["categories"]) == {"clip_duration", "background_noise"}
    assert stats["questions"]["kept"] <= 3 * 2 * 3
    caps = [json.loads(line) for line in (out / "captions.jsonl").read_text().splitlines()]
    assert len(caps) == 3 and all({"id", "audio", "caption", "facts"} <= set(c) for c in caps)
    st = subprocess.run([sys.executable, "-m", "eureka_fast.cli", "dataflux", "stats", "--out", str(out), "--json"],
                        capture_output=True, text=True, timeout=120)
    assert st.returncode == 0 and json.loads(st.stdout) == stats
