"""`eureka-audio recipe nano` and `recipe report`: the real command in a subprocess (the --quick recipe end to end,
stopped and resumed, a second adapter reusing the data), its bad-argument errors, and the scoring and aggregation
helpers against hand-computed values."""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _env() -> dict:
    # one intra-op thread per process, as the other command tests: on a shared 2-core machine more only contend
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("EUREKA_AUDIO_DEBUG", None)
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def run_cli(*args, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "eureka_fast.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=_env(), cwd=ROOT)


def assert_one_line_error(proc, *needles, code=2):
    assert proc.returncode == code, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if ": error: " in line]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("eureka-audio recipe"), lines[0]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


# ---------------------------------------------------------------------------------------------- bad arguments --
@pytest.mark.parametrize("args, needles", [
    (["--adapter", "sparse"], ["--adapter", "sparse"]),
    (["--seed", "-1"], ["--seed", "0 or more"]),
    (["--seed", "one"], ["--seed", "whole number"]),
    (["--workers", "0"], ["--workers", "at least 1"]),
    (["--stop-after", "lunch"], ["--stop-after"]),
])
def test_bad_arguments_give_one_line_and_exit_2(tmp_path, args, needles):
    proc = run_cli("recipe", "nano", "--out", tmp_path / "r", *args)
    assert_one_line_error(proc, *needles)
    assert not (tmp_path / "r").exists()  # nothing was done


def test_out_that_is_a_file_and_missing_report_dir(tmp_path):
    (tmp_path / "f").write_text("x")
    assert_one_line_error(run_cli("recipe", "nano", "--quick", "--out", tmp_path / "f"), "exists and is not a directory")
    assert_one_line_error(run_cli("recipe", "report", tmp_path / "nothing"), "no such directory")
    proc = run_cli("recipe", "nano")
    assert_one_line_error(proc, "--out")


# ------------------------------------------------------------------------------------------------- end to end --
def _mtimes(paths) -> dict:
    return {p: os.stat(p).st_mtime_ns for p in paths}


def _state(path) -> dict:
    with open(path) as fh:
        return json.load(fh)


def test_quick_recipe_end_to_end_stops_resumes_and_shares_data(tmp_path):
    """The --quick recipe: stopped after joint, continued (finished steps are not redone), a complete report, a model
    directory `infer` runs, then a dense run in the same directory reusing the corpus and DataFlux output."""
    out = tmp_path / "nano"
    first = run_cli("recipe", "nano", "--quick", "--out", out, "--workers", "2", "--stop-after", "joint",
                    timeout=400)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "stopped after joint" in first.stdout
    for n, step in enumerate(["corpus", "dataflux", "manifests", "align", "joint"], 1):
        assert f"[{n}/8] {step}: finished in" in first.stdout, first.stdout
    data_state = _state(out / "data" / "state.json")
    run_dir = out / "runs" / "moe-seed0"
    assert list(_state(run_dir / "state.json")["steps"]) == ["align", "joint"]
    manifests = data_state["steps"]["manifests"]["paths"]
    kept = [out / "data" / "state.json", *manifests.values(), run_dir / "align" / "final" / "config.json",
            run_dir / "joint" / "final" / "config.json", run_dir / "align" / "metrics.jsonl"]
    before = _mtimes(kept)

    # a --quick directory is not reused for a full-size run
    assert_one_line_error(run_cli("recipe", "nano", "--out", out), "built with --quick")

    second = run_cli("recipe", "nano", "--quick", "--out", out, "--workers", "2", timeout=400)
    assert second.returncode == 0, second.stderr[-3000:]
    for n, step in enumerate(["corpus", "dataflux", "manifests", "align", "joint"], 1):
        assert f"[{n}/8] {step}: done earlier" in second.stdout, second.stdout
    for n, step in enumerate(["sft", "eval", "report"], 6):
        assert f"[{n}/8] {step}: finished in" in second.stdout, second.stdout
    assert _mtimes(kept) == before  # finished steps were not redone

    report = json.loads((run_dir / "report.json").read_text())
    metrics = report["metrics"]
    for key in ("asr_wer", "asr_exact_match", "mc_accuracy", "mc_accuracy_overall", "caption_agreement",
                "caption_coverage", "caption_agreement_overall"):
        assert key in metrics, key
    assert 0 <= metrics["asr_wer"] and metrics["asr_clips"] > 0
    for attribute in ("gender", "pitch_level", "speaking_rate", "noise"):
        assert attribute in metrics["mc_accuracy"], attribute
    assert set(report["steps"]) == {"corpus", "dataflux", "manifests", "align", "joint", "sft", "eval", "report"}
    assert len(report["router_load"]) == 8 and sum(report["router_load"]) == pytest.approx(1.0, abs=1e-3)
    assert report["router_tokens"] > 0
    assert {t["metric"] for t in report["targets"]} >= {"asr_wer", "mc_accuracy.gender", "total_seconds"}
    assert (run_dir / "report.md").read_text().startswith("# recipe nano: moe-seed0")
    assert (run_dir / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert [c["stage"] for c in report["curve"]] == ["align", "joint", "sft"]
    aggregate = json.loads((out / "report.json").read_text())
    assert [r["run"] for r in aggregate["runs"]] == ["moe-seed0"]
    assert not (run_dir / "sft" / "checkpoints").exists()  # finished stages keep final/, not optimizer states

    # the result is a model directory `eureka-audio infer` runs as it is
    with open(manifests["eval_asr"]) as fh:
        clip = json.loads(fh.readline())["messages"][-2]["content"][0]["audio_url"]["url"]
    clip = clip if os.path.isabs(clip) else os.path.join(os.path.dirname(manifests["eval_asr"]), clip)
    infer = run_cli("infer", "--model", run_dir / "model", "--audio", clip, "--greedy", "--max-new-tokens", "8",
                    timeout=120)
    assert infer.returncode == 0, infer.stderr[-2000:]
    assert "Traceback" not in infer.stderr

    # a dense run in the same directory reuses DIR/data
    data_files = _mtimes([out / "data" / "state.json", *manifests.values()])
    dense = run_cli("recipe", "nano", "--quick", "--out", out, "--adapter", "dense", "--seed", "1",
                    "--stop-after", "align", timeout=300)
    assert dense.returncode == 0, dense.stderr[-3000:]
    for n, step in enumerate(["corpus", "dataflux", "manifests"], 1):
        assert f"[{n}/8] {step}: done earlier" in dense.stdout
    assert _mtimes(data_files) == data_files
    saved = json.loads((out / "runs" / "dense-seed1" / "align" / "final" / "config.json").read_text())
    assert saved["adapter_config"]["adapter_type"] == "dense"


# -------------------------------------------------------------------------------------------- scoring helpers --
def test_multiple_choice_accuracy_per_attribute():
    from eureka_fast.recipe.nano import mc_accuracy_by_attribute

    question = "What is the speaker's gender?\nA. male\nB. female"
    rows = [{"id": "a", "gold": "B", "prediction": "B", "question": question},
            {"id": "b", "gold": "A", "prediction": "The answer is B", "question": question},
            {"id": "c", "gold": "A", "prediction": "A.", "question": question},
            {"id": "d", "gold": "A", "prediction": "no idea", "question": "Is it noisy?\nA. noisy\nB. clean"}]
    raw = {"a": {"attribute": "gender"}, "b": {"attribute": "gender"}, "c": {"meta": {"attribute": "gender"}},
           "d": {"attribute": "noise"}}
    out = mc_accuracy_by_attribute(rows, raw)
    assert out["gender"] == {"correct": 2, "n": 3, "unparsed": 0, "accuracy": pytest.approx(2 / 3)}
    assert out["noise"] == {"correct": 0, "n": 1, "unparsed": 1, "accuracy": 0.0}


def test_caption_agreement_counts_stated_facts_only():
    from eureka_fast.recipe.nano import caption_agreement

    def facts(text):  # a stand-in reader: "gender=female pitch_level=low" -> facts
        return dict(part.split("=") for part in text.split())

    rows = [{"id": "1", "prediction": "gender=female pitch_level=low"},
            {"id": "2", "prediction": "gender=male"},
            {"id": "3", "prediction": ""}]
    labels = {"gender": "female", "pitch_level": "high"}
    raw = {i: {"labels": labels} for i in ("1", "2", "3")}
    out = caption_agreement(rows, raw, facts)
    gender, pitch = out["by_attribute"]["gender"], out["by_attribute"]["pitch_level"]
    assert (gender["stated"], gender["agree"], gender["agreement"], gender["coverage"]) == (2, 1, 0.5, 2 / 3)
    assert (pitch["stated"], pitch["agree"], pitch["agreement"]) == (1, 0, 0.0)
    assert out["agreement"] == pytest.approx(1 / 3) and out["facts_stated"] == 3 and out["captions"] == 3


# ----------------------------------------------------------------------------------------------- aggregation --
def _fake_run(out, adapter, seed, wer, gender, load=None):
    run = out / "runs" / f"{adapter}-seed{seed}"
    run.mkdir(parents=True)
    report = {"run": run.name, "adapter": adapter, "seed": seed, "quick": False, "total_seconds": 100.0 + seed,
              "metrics": {"asr_wer": wer, "mc_accuracy": {"gender": gender, "noise": None}},
              "router_load": load}
    (run / "report.json").write_text(json.dumps(report))


def test_report_aggregates_mean_and_spread_per_adapter(tmp_path):
    moe = [(0.30, 0.90, [0.5, 0.5]), (0.20, 0.80, [0.25, 0.75]), (0.10, 0.85, [0.4, 0.6])]
    dense = [(0.40, 0.70), (0.35, 0.60)]
    for seed, (wer, gender, load) in enumerate(moe):
        _fake_run(tmp_path, "moe", seed, wer, gender, load)
    for seed, (wer, gender) in enumerate(dense):
        _fake_run(tmp_path, "dense", seed, wer, gender)
    proc = run_cli("recipe", "report", tmp_path)
    assert proc.returncode == 0, proc.stderr
    agg = json.loads((tmp_path / "report.json").read_text())
    m, d = agg["by_adapter"]["moe"], agg["by_adapter"]["dense"]
    assert m["asr_wer"]["mean"] == pytest.approx(statistics.mean([0.3, 0.2, 0.1]))
    assert m["asr_wer"]["std"] == pytest.approx(statistics.stdev([0.3, 0.2, 0.1]))
    assert (m["asr_wer"]["min"], m["asr_wer"]["max"], m["asr_wer"]["n"]) == (0.1, 0.3, 3)
    assert d["mc_accuracy.gender"]["mean"] == pytest.approx(0.65)
    assert d["mc_accuracy.gender"]["std"] == pytest.approx(statistics.stdev([0.7, 0.6]))
    assert "mc_accuracy.noise" not in m  # no value in any run
    assert [s["mean"] for s in m["router_load"]] == pytest.approx([0.3833333, 0.6166667])
    assert "router_load" not in d
    table = (tmp_path / "report.md").read_text()
    assert "| metric | moe | dense |" in table
    assert "| asr_wer | 20.0% ± 10.0 (n=3) | 37.5% ± 3.5 (n=2) |" in table
    assert table in proc.stdout


def test_report_of_a_directory_without_runs_fails(tmp_path):
    proc = run_cli("recipe", "report", tmp_path)
    assert_one_line_error(proc, "no finished run")
    assert not (tmp_path / "report.json").exists()
