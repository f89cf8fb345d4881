"""Setting up what a run trains: the model and processor a config names (with real Whisper encoder weights when it
asks), and the batch entries the model's forward takes."""
from __future__ import annotations

import inspect
import os

import torch

from .config import ModelConfig


def build_model_and_processor(cfg: ModelConfig):
    """`pretrained` directory (save_pretrained output) or a preset built from scratch, plus real Whisper weights for
    the encoder when `encoder_weights` is set."""
    from eureka_fast.models import EurekaAudioConfig, EurekaAudioForCausalLM, EurekaAudioProcessor

    if cfg.pretrained:
        model = EurekaAudioForCausalLM.from_pretrained(cfg.pretrained, dtype=torch.float32)
    else:
        config = EurekaAudioConfig.preset(cfg.preset, **dict(cfg.overrides or {}))
        model = EurekaAudioForCausalLM(config)
    if cfg.encoder_weights:
        load_encoder_weights(model, cfg.encoder_weights)
    return model, build_processor(cfg)


def build_processor(cfg: ModelConfig):
    from eureka_fast.models import EurekaAudioProcessor

    name = cfg.processor or cfg.pretrained or cfg.preset
    return EurekaAudioProcessor.from_pretrained(name) if _is_dir(name) else EurekaAudioProcessor.preset(name)


def _is_dir(path) -> bool:
    return isinstance(path, str) and os.path.isdir(path)


def load_encoder_weights(model, source: str) -> None:
    """Copy real Whisper encoder weights (anything `load_whisper_encoder` takes) into `model.audio_encoder`."""
    from eureka_fast.models.whisper import load_whisper_encoder

    encoder = load_whisper_encoder(source)
    missing, unexpected = model.audio_encoder.load_state_dict(encoder.state_dict(), strict=False)
    if missing or unexpected:
        raise ValueError(f"encoder weights {source!r} do not fit the model's encoder: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]} (check model.overrides.audio_config against the checkpoint)")


def forward_kwargs(model, batch: dict, device: torch.device) -> dict:
    """The batch entries the model's forward accepts, moved to `device`."""
    forward = getattr(model, "module", model).forward
    params = inspect.signature(forward).parameters
    accepts_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    out = {}
    for key in ("input_ids", "attention_mask", "token_type_ids", "input_features", "audio_token_counts",
                "windows_per_request"):
        if key in batch and (key in params or accepts_any):
            value = batch[key]
            out[key] = value.to(device) if torch.is_tensor(value) and key != "windows_per_request" else value
    return out
