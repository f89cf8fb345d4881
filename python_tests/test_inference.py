"""EurekaAudio API and `eureka-audio infer`: a tiny random model end to end from an espeak-ng wav."""
import os
import subprocess
import sys

import pytest
import torch

from eureka_fast.cli import main
from eureka_fast.inference import (ASR_SYSTEM_PROMPT, CAPTION_PROMPT, OFFICIAL_DECODING, EurekaAudio,
                                   task_messages)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _save_model(directory, **overrides):
    from eureka_fast.models import EurekaAudioConfig, EurekaAudioForCausalLM, EurekaAudioProcessor

    torch.manual_seed(7)
    model = EurekaAudioForCausalLM(EurekaAudioConfig.preset("tiny", **overrides)).eval()
    with torch.no_grad():  # spread the random embeddings so greedy picks are far from ties
        model.language_model.get_input_embeddings().weight.mul_(25.0)
    model.save_pretrained(directory)
    EurekaAudioProcessor.preset("tiny").save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """The real tiny preset (Whisper-tiny encoder dims + 2-layer Qwen3), random weights."""
    return _save_model(tmp_path_factory.mktemp("tiny_eureka"))


@pytest.fixture(scope="module")
def light_model_dir(tmp_path_factory):
    """Tiny preset with a 1-layer, 64-wide encoder: for the API tests that run many generate() calls."""
    return _save_model(tmp_path_factory.mktemp("light_eureka"),
                       audio_config={"n_audio_state": 64, "n_audio_head": 2, "n_audio_layer": 1})


@pytest.fixture(scope="module")
def speech_wav(tmp_path_factory):
    d = tmp_path_factory.mktemp("speech")
    path = d / "speech.wav"
    subprocess.run(["espeak-ng", "-w", str(path), "the quick brown fox jumps over the lazy dog"], check=True,
                   capture_output=True)
    return path


@pytest.fixture(scope="module")
def engine(light_model_dir):
    return EurekaAudio(str(light_model_dir))


def test_task_prompts_are_the_official_ones():
    asr = task_messages("asr", "a.wav")
    assert asr == [{"role": "system", "content": ASR_SYSTEM_PROMPT},
                   {"role": "user", "content": [{"type": "audio_url", "audio_url": {"url": "a.wav"}}]}]
    cap = task_messages("caption", "a.wav")
    assert [m["role"] for m in cap] == ["user"] and cap[0]["content"][1]["text"] == CAPTION_PROMPT
    qa = task_messages("qa", "a.wav", "Which?\nA. x\nB. y")
    assert [m["role"] for m in qa] == ["user"] and qa[0]["content"][1]["text"] == "Which?\nA. x\nB. y"
    with pytest.raises(ValueError, match="needs a question"):
        task_messages("qa", "a.wav")
    assert OFFICIAL_DECODING == dict(do_sample=True, temperature=0.7, top_p=0.8, top_k=20, repetition_penalty=1.05,
                                     max_new_tokens=512)


def test_cli_end_to_end_from_a_wav(tiny_model_dir, speech_wav, capsys):
    engine = EurekaAudio(str(tiny_model_dir))
    expected = engine.generate(task_messages("asr", str(speech_wav)), greedy=True, max_new_tokens=6)
    assert isinstance(expected, str)
    rc = main(["infer", "--model", str(tiny_model_dir), "--audio", str(speech_wav), "--greedy",
               "--max-new-tokens", "6"])
    assert rc == 0
    assert capsys.readouterr().out == expected + "\n"
    rc = main(["infer", "--model", str(tiny_model_dir), "--audio", str(speech_wav), "--greedy", "--stream",
               "--max-new-tokens", "6"])
    assert rc == 0
    assert capsys.readouterr().out == expected + "\n"


def test_batch_generation_equals_single_runs(engine, speech_wav, tmp_path):
    import numpy as np
    import soundfile as sf

    short = tmp_path / "short.wav"
    sf.write(short, (0.2 * np.sin(np.arange(9000) / 7.0)).astype(np.float32), 16000)
    convs = [task_messages("asr", str(speech_wav)), task_messages("qa", str(short), "Is it a tone?\nA. yes\nB. no"),
             task_messages("caption", str(speech_wav))]
    batched = engine.generate(convs, greedy=True, max_new_tokens=5)
    singles = [engine.generate(c, greedy=True, max_new_tokens=5) for c in convs]
    assert batched == singles
    assert engine.generate(convs, greedy=True, max_new_tokens=5, batch_size=2) == singles


def test_sampling_defaults_and_seed(engine, speech_wav):
    settings = engine.decoding_settings()
    assert settings["do_sample"] and settings["temperature"] == 0.7 and settings["top_k"] == 20
    assert engine.decoding_settings(greedy=True)["do_sample"] is False
    conv = task_messages("asr", str(speech_wav))
    torch.manual_seed(3)
    a = engine.generate(conv, max_new_tokens=4)
    torch.manual_seed(3)
    b = engine.generate(conv, max_new_tokens=4)
    assert a == b


def test_cli_usage_errors(tiny_model_dir, speech_wav, capsys):
    assert main(["infer", "--model", str(tiny_model_dir), "--audio", str(speech_wav), "--task", "qa"]) == 2
    assert "needs --question" in capsys.readouterr().err
    assert main(["infer", "--model", str(tiny_model_dir), "--audio", "/nonexistent.wav"]) == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="model directory"):
        EurekaAudio("/nonexistent_model_dir")


@pytest.mark.slow
def test_console_script(tiny_model_dir, speech_wav):
    engine = EurekaAudio(str(tiny_model_dir))
    expected = engine.generate(task_messages("caption", str(speech_wav)), greedy=True, max_new_tokens=4)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-m", "eureka_fast.cli", "infer", "--model", str(tiny_model_dir),
                          "--audio", str(speech_wav), "--task", "caption", "--greedy", "--max-new-tokens", "4"],
                         capture_output=True, text=True, env=env, check=True)
    assert out.stdout == expected + "\n"
