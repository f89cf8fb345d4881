"""Stage freezing, AdamW parameter groups and learning-rate schedules."""
from __future__ import annotations

import math

import torch

from .config import OptimConfig

# Which top-level modules of EurekaAudioForCausalLM train in each stage (docs/training.md#stages).
STAGE_TRAINABLE = {
    "align": ("adapter",),  # encoder and LLM frozen, only the adapter learns
    "joint": None,  # everything
    "sft": None,  # everything
}


def apply_stage(model: torch.nn.Module, stage: str, extra_frozen=()) -> dict:
    """Set requires_grad for `stage` (+ modules named in `extra_frozen`); returns counts of trainable/frozen params.

    Frozen modules are also put in eval mode by the trainer (`frozen_modules`) so dropout does not run in them.
    """
    if stage not in STAGE_TRAINABLE:
        raise ValueError(f"unknown stage {stage!r}; expected one of {sorted(STAGE_TRAINABLE)}")
    trainable = STAGE_TRAINABLE[stage]
    for name in extra_frozen:
        if not hasattr(model, name):
            raise ValueError(f"train.freeze: the model has no module {name!r}")
    if trainable is not None:
        for name in trainable:
            if not hasattr(model, name):
                raise ValueError(f"stage {stage}: the model has no module {name!r}")
    for pname, p in model.named_parameters():
        top = pname.split(".", 1)[0]
        train = trainable is None or top in trainable
        if top in extra_frozen:
            train = False
        p.requires_grad_(train)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in model.parameters())
    if n_train == 0:
        raise ValueError(f"stage {stage} with freeze={list(extra_frozen)} leaves nothing to train")
    return {"trainable": n_train, "frozen": n_all - n_train}


def frozen_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Top-level children with no trainable parameter (kept in eval mode during training)."""
    return [m for m in model.children() if any(True for _ in m.parameters()) and
            not any(p.requires_grad for p in m.parameters())]


def _no_decay(name: str, p: torch.Tensor) -> bool:
    # Biases, norm gains and other vectors/scalars are not decayed (standard practice for transformers).
    lowered = name.lower()
    return p.ndim < 2 or "norm" in lowered or lowered.endswith(".bias")


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if _no_decay(name, p) else decay).append(p)
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig, device_type: str = "cpu") -> torch.optim.AdamW:
    # torch picks the multi-tensor (foreach) AdamW only for CUDA parameters; it is also much faster on CPU.
    foreach = True if device_type == "cpu" else None
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
                             foreach=foreach)


def lr_multiplier(step: int, total_steps: int, cfg: OptimConfig) -> float:
    """Factor on the peak LR for optimizer step `step` (0-based).

    Linear warmup over `warmup_steps` (step 0 already gets 1/warmup), then
    - wsd: constant, and over the last `decay_fraction` of the steps linear decay to `min_lr_ratio`;
    - cosine: cosine from 1 to `min_lr_ratio` over the remaining steps;
    - constant: 1.
    """
    warmup = max(0, int(cfg.warmup_steps))
    if warmup and step < warmup:
        return (step + 1) / warmup
    if cfg.schedule == "constant":
        return 1.0
    floor = float(cfg.min_lr_ratio)
    if cfg.schedule == "cosine":
        span = max(1, total_steps - warmup)
        progress = min(1.0, (step - warmup) / span)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    # wsd
    decay_steps = int(round(float(cfg.decay_fraction) * total_steps))
    decay_start = total_steps - decay_steps
    if decay_steps <= 0 or step < decay_start:
        return 1.0
    progress = min(1.0, (step - decay_start + 1) / decay_steps)
    return 1.0 - (1.0 - floor) * progress


class Schedule:
    """Sets the learning rate of every param group from `lr_multiplier`; its state is just the step."""

    def __init__(self, optimizer: torch.optim.Optimizer, total_steps: int, cfg: OptimConfig):
        self.optimizer, self.total_steps, self.cfg = optimizer, total_steps, cfg
        self.step_count = 0
        self._apply()

    def _apply(self) -> None:
        lr = self.cfg.lr * lr_multiplier(self.step_count, self.total_steps, self.cfg)
        for g in self.optimizer.param_groups:
            g["lr"] = lr

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def step(self) -> None:
        self.step_count += 1
        self._apply()

    def state_dict(self) -> dict:
        return {"step_count": self.step_count, "total_steps": self.total_steps, "schedule": self.cfg.schedule}

    def load_state_dict(self, state: dict) -> None:
        self.step_count = int(state["step_count"])
        self._apply()
