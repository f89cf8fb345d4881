"""`eureka-audio train` then `eureka-audio eval` end to end on the test model; config loading and overrides."""
from __future__ import annotations

import json
import os

import pytest
import yaml

from eureka_fast.cli import main
from eureka_fast.train.config import ConfigError, apply_overrides, load_config, parse_override
from train_helpers import base_config

CONFIG_DIR = os.path.join(os.path.dirname(__import__("eureka_fast.train").train.__file__), "configs")


def test_overrides_parse_yaml_values_and_index_lists():
    assert parse_override("optim.lr=3e-4") == (["optim", "lr"], 3e-4)
    assert parse_override("train.freeze=[audio_encoder]") == (["train", "freeze"], ["audio_encoder"])
    assert parse_override("output.progress=false") == (["output", "progress"], False)
    raw = apply_overrides({"data": {"train": ["a.jsonl", {"path": "b.jsonl"}]}},
                          ["data.train.0.ratio=0.25", "data.train.1.path=c.jsonl", "train.stage=align"])
    assert raw["data"]["train"] == [{"path": "a.jsonl", "ratio": 0.25}, {"path": "c.jsonl"}]
    assert raw["train"]["stage"] == "align"
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_override("optim.lr")


@pytest.mark.parametrize("name", ["tiny_cpu", "align_1.7b", "joint_1.7b", "sft_1.7b"])
def test_bundled_configs_load(name):
    cfg = load_config(os.path.join(CONFIG_DIR, f"{name}.yaml"))
    assert cfg.optim.betas == (0.9, 0.95)
    expected_stage = {"tiny_cpu": "sft", "align_1.7b": "align", "joint_1.7b": "joint", "sft_1.7b": "sft"}[name]
    assert cfg.train.stage == expected_stage
    if name == "sft_1.7b":
        ratios = [s.ratio for s in cfg.data.train]
        assert ratios == [0.6, 0.1, 0.2, 0.1]  # the paper's SFT mix (docs/training.md#stages)


def test_config_errors_name_the_key(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"train": {"stage": "pretrain"}}))
    with pytest.raises(ConfigError, match="train.stage"):
        load_config(str(path))
    path.write_text(yaml.safe_dump({"optim": {"learning_rate": 1}}))
    with pytest.raises(ConfigError, match="unknown key.*learning_rate"):
        load_config(str(path))


def test_train_then_eval_command_line(train_manifest, tmp_path, capsys):
    cfg = base_config(train_manifest, str(tmp_path / "run"), max_steps=2)
    cfg["train"]["freeze"] = ["audio_encoder"]
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["train", "--config", str(path), "--set", "optim.lr=1e-3"]) == 0
    run = tmp_path / "run"
    assert json.load(open(run / "config.json"))["optim"]["lr"] == 1e-3
    metrics = [json.loads(l) for l in open(run / "metrics.jsonl")]
    assert [m["step"] for m in metrics] == [1, 2] and all("tokens_per_s" in m and "router_load" in m for m in metrics)
    assert json.load(open(run / "data_report.json"))["total"] == 0
    report_path = tmp_path / "eval" / "report.json"
    assert main(["eval", "--model", str(run / "final"), "--data", train_manifest, "--output", str(report_path),
                 "--limit", "3", "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert "asr" in out and "WER" in out
    report = json.load(open(report_path))["report"]
    assert report["asr"]["n"] == 3 and report["asr"]["ref_words"] > 0
    predictions = [json.loads(l) for l in open(str(report_path).replace(".json", ".predictions.jsonl"))]
    assert [p["id"] for p in predictions] == ["r0", "r1", "r2"]
