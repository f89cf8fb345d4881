"""Helpers of the serving tests: a small random Eureka-Audio model whose greedy answers are varied and depend on the
whole context (so a batching bug that mixes rows or drops positions changes the text), test audio, a server runner."""
import io

import numpy as np
import soundfile as sf
import torch

LIGHT_AUDIO = {"n_audio_state": 64, "n_audio_head": 2, "n_audio_layer": 1}


def build_model():
    from eureka_fast.models import EurekaAudioConfig, EurekaAudioForCausalLM, EurekaAudioProcessor

    torch.manual_seed(7)
    config = EurekaAudioConfig.preset("tiny", audio_config=LIGHT_AUDIO, text_config={"tie_word_embeddings": False})
    model = EurekaAudioForCausalLM(config).eval()
    with torch.no_grad():
        # Random init at the default scale makes every answer one repeated token. Larger attention / MLP weights
        # make the next token depend on the context, and a larger output head puts the top logits far apart
        # (greedy picks are then far from ties).
        for name, param in model.language_model.named_parameters():
            if param.dim() == 2 and "embed" not in name and "lm_head" not in name:
                param.mul_(4.0)
        model.language_model.lm_head.weight.mul_(20.0)
    return model, EurekaAudioProcessor.preset("tiny")


def noise(seconds: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(int(16000 * seconds)) * 0.1).astype(np.float32)


def wav_bytes(samples: np.ndarray, rate: int = 16000, fmt: str = "WAV") -> bytes:
    buf = io.BytesIO()
    sf.write(buf, samples, rate, format=fmt)
    return buf.getvalue()
