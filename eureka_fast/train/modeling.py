"""Building the model and processor a config names, and the frozen-encoder output cache."""
from __future__ import annotations

import hashlib
import inspect

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
    import os

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


class FrozenEncoderCache:
    """Memoises a frozen audio encoder's output per input window (keyed by the window's bytes).

    Only valid while the encoder does not train: its output for a window then never changes, so reusing it trains
    exactly the same parameters with the same values as recomputing it (up to batched-vs-single float rounding).
    It refuses an encoder with trainable parameters. Installed by replacing the encoder instance's `forward`, so the
    module tree and state dict stay exactly those of the model.
    """

    def __init__(self, encoder: torch.nn.Module, max_entries: int = 100_000):
        if any(p.requires_grad for p in encoder.parameters()):
            raise ValueError("FrozenEncoderCache needs a frozen encoder (it would hide the encoder's updates)")
        self.encoder = encoder
        self.original_forward = encoder.forward
        self._cache: dict[str, torch.Tensor] = {}
        self.max_entries = max_entries
        self.hits = self.misses = 0

    @staticmethod
    def _key(window: torch.Tensor) -> str:
        t = window.detach().contiguous().cpu()
        return hashlib.sha1(t.numpy().tobytes()).hexdigest() + str(tuple(t.shape)) + str(t.dtype)

    def __call__(self, mel: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if args or kwargs or any(p.requires_grad for p in self.encoder.parameters()):
            return self.original_forward(mel, *args, **kwargs)
        keys = [self._key(w) for w in mel]
        todo = [i for i, k in enumerate(keys) if k not in self._cache]
        self.hits += len(keys) - len(todo)
        self.misses += len(todo)
        computed = {}
        if todo:
            with torch.no_grad():
                fresh = self.original_forward(mel[todo])
            for i, out in zip(todo, fresh):
                computed[i] = out
                if len(self._cache) < self.max_entries:
                    self._cache[keys[i]] = out.detach().clone()
        rows = [computed[i] if i in computed else self._cache[keys[i]] for i in range(len(keys))]
        return torch.stack(rows, 0).to(mel.device)


def install_encoder_cache(model) -> FrozenEncoderCache:
    encoder = model.audio_encoder
    if isinstance(encoder.__dict__.get("forward"), FrozenEncoderCache):
        return encoder.__dict__["forward"]
    cache = FrozenEncoderCache(encoder)
    encoder.forward = cache
    return cache


def remove_encoder_cache(model) -> None:
    encoder = model.audio_encoder
    if isinstance(encoder.__dict__.get("forward"), FrozenEncoderCache):
        del encoder.forward
