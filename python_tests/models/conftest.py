"""Shared tiny Eureka-Audio fixtures (random weights, built once per session)."""
import subprocess

import numpy as np
import pytest
import soundfile as sf
import torch


@pytest.fixture(scope="session")
def tiny_eureka_processor():
    from eureka_fast.models import EurekaAudioProcessor

    return EurekaAudioProcessor.preset("tiny")


@pytest.fixture(scope="session")
def tiny_eureka_model():
    from eureka_fast.models import EurekaAudioConfig, EurekaAudioForCausalLM

    torch.manual_seed(1234)
    # The tiny preset with a narrower one-layer encoder: these tests check how audio is merged, batched, cached and
    # saved, and a full Whisper-tiny encoder costs seconds per 30 s window on a busy 2-core box. The end-to-end test
    # (test_inference.py) runs the real tiny preset.
    config = EurekaAudioConfig.preset("tiny", audio_config={"n_audio_state": 64, "n_audio_head": 2,
                                                            "n_audio_layer": 1})
    model = EurekaAudioForCausalLM(config).eval()
    # Random init leaves the LM's logits nearly flat; spread the embeddings so greedy choices are well separated
    # and comparisons between code paths are not decided by float noise.
    with torch.no_grad():
        model.language_model.get_input_embeddings().weight.mul_(25.0)
    return model


@pytest.fixture(scope="session")
def wav_dir(tmp_path_factory):
    """Three clips: 2.0 s noise, 0.77 s tone (not a multiple of 1280 samples), and espeak-ng speech."""
    d = tmp_path_factory.mktemp("wavs")
    rng = np.random.default_rng(0)
    sf.write(d / "noise.wav", (rng.standard_normal(32000) * 0.1).astype(np.float32), 16000)
    t = np.arange(int(0.77 * 16000)) / 16000
    sf.write(d / "tone.wav", (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), 16000)
    subprocess.run(["espeak-ng", "-w", str(d / "speech.wav"), "hello world, this is a test"], check=True,
                   capture_output=True)
    return d
