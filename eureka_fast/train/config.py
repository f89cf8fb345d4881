"""Training configuration: a YAML file plus `--set a.b=value` overrides, validated into dataclasses.

Defaults follow the paper's recipe where it says something (docs/training.md: AdamW betas 0.9/0.95,
warmup-stable-decay, lambda 0.01 for the load-balancing loss); everything else is our choice and is configurable.
"""
from __future__ import annotations

import copy
import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

import yaml

STAGES = ("align", "joint", "sft")
SCHEDULES = ("wsd", "cosine", "constant")
STRATEGIES = ("none", "ddp", "fsdp")


class ConfigError(ValueError):
    """A configuration value is missing, misspelt or out of range; the message names the key."""


@dataclass
class ModelConfig:
    # Either a save_pretrained directory (`pretrained`) or a named preset built from scratch (`preset`).
    pretrained: str | None = None
    preset: str | None = "tiny"
    # Keys of EurekaAudioConfig to override when building from a preset (e.g. a smaller LM for a CPU run).
    overrides: dict = field(default_factory=dict)
    # Real Whisper encoder weights loaded into `audio_encoder` after building from a preset ("tiny.en", a .pt, ...).
    encoder_weights: str | None = None
    # Processor source; defaults to `pretrained` when that is set, else the preset of the same name.
    processor: str | None = None


@dataclass
class SourceConfig:
    path: str
    ratio: float = 1.0
    name: str | None = None


@dataclass
class DataConfig:
    train: list = field(default_factory=list)  # list[SourceConfig]
    eval: list = field(default_factory=list)  # list[SourceConfig] (ratio ignored)
    # Samples drawn per epoch over all sources by ratio. None: the sum of the source sizes.
    samples_per_epoch: int | None = None
    # Length bucketing: this many global micro-batches are sorted by length together, then shuffled as batches.
    bucket_batches: int = 50
    num_workers: int = 0
    # Loss targets: "assistant" (the assistant turns only) or "text" (every text token; audio pads never).
    loss_on: str = "assistant"
    check_audio: bool = True  # open every audio file's header while reading the manifest


@dataclass
class OptimConfig:
    lr: float = 1e-4
    betas: tuple = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1
    schedule: str = "wsd"
    warmup_steps: int = 100
    decay_fraction: float = 0.2  # wsd: last fraction of the steps decays; cosine ignores it
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0  # 0 disables


@dataclass
class TrainConfig:
    stage: str = "sft"
    # Module names (attributes of the model) kept frozen on top of what the stage freezes, e.g. ["audio_encoder"].
    freeze: list = field(default_factory=list)
    micro_batch_size: int = 4  # per process
    grad_accum: int = 1
    max_steps: int = 1000
    aux_loss_weight: float = 0.01
    precision: str = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU; or "bf16" / "fp32"
    gradient_checkpointing: bool = False
    seed: int = 0
    device: str = "auto"
    # Memoise the audio encoder's outputs per mel window (only allowed while the encoder is frozen: the stage or
    # `freeze` keeps it fixed); training is unchanged, only recomputation is skipped. `encoder_cache_dir` also
    # keeps them on disk, keyed by the encoder weights' hash, so later runs and stages reuse them.
    cache_frozen_encoder: bool = False
    encoder_cache_dir: str | None = None


@dataclass
class DistributedConfig:
    strategy: str = "ddp"  # used when launched with torchrun (WORLD_SIZE > 1): ddp | fsdp | none
    backend: str = "auto"  # auto: nccl on CUDA, gloo on CPU
    find_unused_parameters: bool = True  # MoE experts that got no token in a batch have no gradient


@dataclass
class OutputConfig:
    dir: str = "runs/eureka"
    log_every: int = 10
    save_every: int = 500  # 0: only at the end
    keep_last: int = 2
    eval_every: int = 0  # evaluation loss on data.eval; 0 disables
    tensorboard: bool = True  # used only when tensorboard is importable
    progress: bool = True
    save_pretrained: bool = True
    # Ctrl-C / SIGTERM: finish the current optimizer step and save a checkpoint before stopping.
    save_on_interrupt: bool = False


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _build(cls, values: Any, where: str):
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {type(values).__name__}")
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise ConfigError(f"{where or 'config'}: unknown key(s) {unknown}; known: {sorted(names)}")
    kwargs = {}
    for key, value in values.items():
        sub = _NESTED.get((cls, key))
        path = f"{where}.{key}" if where else key
        if sub is not None:
            kwargs[key] = _build(sub, value, path)
        elif (cls, key) in _SOURCE_LISTS:
            kwargs[key] = [_source(v, f"{path}[{i}]") for i, v in enumerate(value or [])]
        else:
            kwargs[key] = value
    return cls(**kwargs)


def _source(value: Any, where: str) -> SourceConfig:
    if isinstance(value, str):
        return SourceConfig(path=value)
    return _build(SourceConfig, value, where)


_NESTED = {
    (Config, "model"): ModelConfig,
    (Config, "data"): DataConfig,
    (Config, "optim"): OptimConfig,
    (Config, "train"): TrainConfig,
    (Config, "distributed"): DistributedConfig,
    (Config, "output"): OutputConfig,
}
_SOURCE_LISTS = {(DataConfig, "train"), (DataConfig, "eval")}


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (["a", "b", "c"], value parsed as YAML, so 3e-4, true, [1, 2] and strings all work)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected KEY=VALUE, e.g. optim.lr=3e-4")
    key, raw = text.split("=", 1)
    keys = [k for k in key.strip().split(".") if k]
    if not keys:
        raise ConfigError(f"override {text!r}: empty key")
    value = yaml.safe_load(raw) if raw.strip() else None
    # YAML 1.1 reads "3e-4" as a string (no dot); numbers are what people mean here.
    if isinstance(value, str):
        try:
            value = float(value) if any(c in value.lower() for c in ".e") else int(value)
        except ValueError:
            pass
    return keys, value


def _list_index(node: list, key: str, text: str, allow_append: bool = False) -> int:
    if not key.isdigit():
        raise ConfigError(f"override {text!r}: {key!r} indexes a list, use a number")
    index = int(key)
    if index > len(node) or (index == len(node) and not allow_append):
        raise ConfigError(f"override {text!r}: index {index} is past the end of a list of {len(node)}")
    return index


def _child(node, key: str, text: str, create):
    """Descend one level of an override path; list items are addressed by number (data.train.0.ratio)."""
    if isinstance(node, list):
        index = _list_index(node, key, text, allow_append=True)
        if index == len(node):
            node.append(create)
        if isinstance(node[index], str):  # a bare path entry of data.train becomes a mapping
            node[index] = {"path": node[index]}
        return node[index]
    if not isinstance(node, dict):
        raise ConfigError(f"override {text!r}: cannot descend into {key!r}")
    child = node.setdefault(key, create)
    if not isinstance(child, (dict, list)):
        raise ConfigError(f"override {text!r}: {key} is a value, not a mapping or list")
    return child


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply `a.b=value` overrides to a raw config mapping; numbers index lists (data.train.0.path=x.jsonl)."""
    raw = copy.deepcopy(raw)
    for text in overrides or []:
        keys, value = parse_override(text)
        node = raw
        for k, nxt in zip(keys[:-1], keys[1:]):
            node = _child(node, k, text, create=[] if nxt.isdigit() else {})
        last = keys[-1]
        if isinstance(node, list):
            index = _list_index(node, last, text, allow_append=True)
            if index == len(node):
                node.append(value)
            else:
                node[index] = value
        else:
            node[last] = value
    return raw


def _fix_numbers(cfg: Config) -> None:
    # YAML 1.1 loads "1e-4" as a string; accept it for every float field.
    for section in (cfg.optim, cfg.train, cfg.data, cfg.output, cfg.distributed):
        for f in dataclasses.fields(section):
            value = getattr(section, f.name)
            if f.type in ("float", float) and isinstance(value, (str, int)) and not isinstance(value, bool):
                try:
                    setattr(section, f.name, float(value))
                except ValueError as exc:
                    raise ConfigError(f"{f.name}: expected a number, got {value!r}") from exc


def validate(cfg: Config) -> Config:
    _fix_numbers(cfg)
    if cfg.train.stage not in STAGES:
        raise ConfigError(f"train.stage: {cfg.train.stage!r} is not one of {STAGES}")
    if cfg.optim.schedule not in SCHEDULES:
        raise ConfigError(f"optim.schedule: {cfg.optim.schedule!r} is not one of {SCHEDULES}")
    if cfg.distributed.strategy not in STRATEGIES:
        raise ConfigError(f"distributed.strategy: {cfg.distributed.strategy!r} is not one of {STRATEGIES}")
    if cfg.data.loss_on not in ("assistant", "text"):
        raise ConfigError(f"data.loss_on: {cfg.data.loss_on!r} is not 'assistant' or 'text'")
    if cfg.train.precision not in ("auto", "bf16", "fp32"):
        raise ConfigError(f"train.precision: {cfg.train.precision!r} is not auto, bf16 or fp32")
    for name in ("micro_batch_size", "grad_accum", "max_steps"):
        if int(getattr(cfg.train, name)) < 1:
            raise ConfigError(f"train.{name} must be >= 1")
    if not cfg.model.pretrained and not cfg.model.preset:
        raise ConfigError("model: set model.pretrained (a save_pretrained directory) or model.preset")
    cfg.optim.betas = tuple(float(b) for b in cfg.optim.betas)
    if len(cfg.optim.betas) != 2:
        raise ConfigError("optim.betas: expected two numbers")
    for src in cfg.data.train:
        if float(src.ratio) <= 0:
            raise ConfigError(f"data.train {src.path}: ratio must be > 0")
    return cfg


def load_config(path: str | None = None, overrides: list[str] | None = None, base: dict | None = None) -> Config:
    """Read a YAML config (relative data/model paths are resolved against the file's directory), apply overrides."""
    raw: dict = copy.deepcopy(base) if base else {}
    if path:
        with open(path, encoding="utf-8") as fh:
            loaded = yaml.safe_load(fh) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping")
        raw.update(loaded)
    raw = apply_overrides(raw, overrides or [])
    cfg = validate(_build(Config, raw, ""))
    if path:
        _resolve_paths(cfg, os.path.dirname(os.path.abspath(path)))
    return cfg


def _resolve_paths(cfg: Config, base_dir: str) -> None:
    def resolve(p):
        if p is None or os.path.isabs(p) or "://" in p:
            return p
        candidate = os.path.join(base_dir, p)
        # Paths are relative to the config file when they exist there, else to the working directory.
        return candidate if os.path.exists(candidate) else p

    for src in cfg.data.train + cfg.data.eval:
        src.path = resolve(src.path)
    if cfg.model.pretrained:
        cfg.model.pretrained = resolve(cfg.model.pretrained)


def config_from_dict(raw: dict) -> Config:
    return validate(_build(Config, copy.deepcopy(raw), ""))
