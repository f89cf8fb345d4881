"""Training and evaluation for Eureka-Audio: stage-wise recipe (align / joint / sft), data pipeline over JSONL
conversation manifests, atomic checkpoints with exact resume, DDP / FSDP2 under torchrun, and scoring.

Entry points: `eureka-audio train|eval` (cli.py), `torchrun -m eureka_fast.train` (__main__.py), and in Python
`load_config` + `run_training` / `Trainer`, `evaluate_manifest`.
"""
from .config import Config, ConfigError, load_config

__all__ = ["Config", "ConfigError", "load_config", "run_training", "Trainer", "evaluate_manifest"]


def __getattr__(name):
    # torch-heavy parts load on first use so `eureka-audio --help` stays fast.
    if name in ("run_training", "Trainer"):
        from . import trainer

        return getattr(trainer, name)
    if name == "evaluate_manifest":
        from .evaluate import evaluate_manifest

        return evaluate_manifest
    raise AttributeError(f"module 'eureka_fast.train' has no attribute {name!r}")
