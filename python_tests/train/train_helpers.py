"""Helpers for the training tests: synthetic audio clips, manifests, configs and a shrunken real Eureka model."""
from __future__ import annotations

import json

import numpy as np
import soundfile

SYSTEM_ASR = "You are an advanced ASR (Automatic Speech Recognition) AI assistant."

# The real EurekaAudioForCausalLM with the "tiny" preset, its encoder shrunk further so CPU tests stay fast (the
# encoder still sees full 3000-frame windows).
TEST_MODEL_OVERRIDES = {"audio_config": {"n_audio_state": 32, "n_audio_head": 2, "n_audio_layer": 1},
                        "adapter_config": {"expert_intermediate_size": 32}}


def write_clip(path: str, seconds: float, freq: float, sr: int = 16000) -> str:
    t = np.arange(int(seconds * sr)) / sr
    wave = 0.3 * np.sin(2 * np.pi * freq * t) + 0.01 * np.random.default_rng(int(freq)).standard_normal(t.size)
    soundfile.write(path, wave.astype(np.float32), sr)
    return path


def asr_record(record_id: str, audio: str, text: str, task: str = "asr") -> dict:
    return {"id": record_id, "task": task, "answer": text,
            "messages": [{"role": "system", "content": SYSTEM_ASR},
                         {"role": "user", "content": [{"type": "audio_url", "audio_url": {"url": audio}}]},
                         {"role": "assistant", "content": [{"type": "text", "text": text}]}]}


def write_manifest(path: str, records: list) -> str:
    with open(path, "w", encoding="utf-8") as fh:
        for r in records:
            fh.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return path


WORDS = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "zero"]


def tiny_model(seed: int = 0):
    import torch

    from eureka_fast.models import EurekaAudioConfig, EurekaAudioForCausalLM

    torch.manual_seed(seed)
    return EurekaAudioForCausalLM(EurekaAudioConfig.preset("tiny", **TEST_MODEL_OVERRIDES))


def base_config(manifest: str, out_dir: str, **train) -> dict:
    """A raw config dict for a few-step CPU run of the test model."""
    return {
        "model": {"preset": "tiny", "overrides": TEST_MODEL_OVERRIDES},
        "data": {"train": [{"path": manifest}], "bucket_batches": 4},
        "train": {"stage": "sft", "micro_batch_size": 2, "max_steps": 4, "seed": 0, **train},
        "optim": {"lr": 3e-3, "warmup_steps": 1, "schedule": "wsd", "decay_fraction": 0.5},
        "output": {"dir": out_dir, "log_every": 1, "save_every": 0, "progress": False, "tensorboard": False},
    }
