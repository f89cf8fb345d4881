"""The training loop: stages, accumulation, clipping, schedules, logging, atomic checkpoints and exact resume.

Loss normalisation (what makes N processes equal one): every optimizer step sums the token cross-entropy over all
its micro-batches on all processes and divides by the step's total number of target tokens (all-reduced before the
first backward). DDP/FSDP average gradients over processes, so each process scales its part by the world size. The
load-balancing term is lambda times the mean of the per-micro-batch aux losses. So a step's gradient depends only on
which samples form the global batch, not on how they are split over processes or micro-batches (aux aside:
it is a per-batch statistic).
"""
from __future__ import annotations

import contextlib
import inspect
import json
import os
import random
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from . import checkpoint as ckpt
from .config import Config
from .data import (IGNORE_INDEX, BucketBatchSampler, ConversationCollator, SkipCounter, count_targets,
                   load_sources)
from .distributed import (DistInfo, all_reduce_sum, barrier, cleanup, init_distributed, no_grad_sync, unwrap,
                          wrap_model)
from .encoder_cache import install_encoder_cache
from .metrics import MetricsWriter, Progress
from .model_setup import build_model_and_processor, build_processor, forward_kwargs
from .optim import Schedule, apply_stage, build_optimizer, frozen_modules


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


def pick_device(name: str, info: DistInfo) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", info.local_rank)
        return torch.device("cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", info.local_rank)
    return dev


def autocast_context(precision: str, device: torch.device):
    """bf16 autocast on CUDA (auto or bf16); fp32 on CPU unless bf16 is asked for explicitly."""
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def logit_positions(labels: torch.Tensor) -> torch.Tensor:
    """Sequence positions whose logits predict a target (position t predicts the token at t + 1), over the batch.
    Asking the model for logits only there (transformers' `logits_to_keep` with an index tensor) keeps the
    vocabulary projection off the audio and prompt positions, which dominate the sequence."""
    return (labels[:, 1:] != IGNORE_INDEX).any(0).nonzero().flatten()


def token_cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor,
                            positions: torch.Tensor | None = None) -> torch.Tensor:
    """Sum over target positions of -log p(label), with the usual shift (logits at t predict the token at t+1).
    `positions`: the logits hold only these sequence positions (see `logit_positions`). Only target rows are
    gathered before the fp32 log-softmax, so memory grows with targets, not sequence length."""
    if positions is None:
        logits, targets = logits[:, :-1], labels[:, 1:]
    else:
        targets = labels[:, positions.to(labels.device) + 1]
    mask = targets != IGNORE_INDEX
    if not bool(mask.any()):
        return logits.sum() * 0.0
    rows = logits[mask].float()
    return F.cross_entropy(rows, targets[mask], reduction="sum")


def enable_gradient_checkpointing(model) -> None:
    lm = getattr(model, "language_model", None)
    if lm is not None and hasattr(lm, "gradient_checkpointing_enable"):
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    encoder = getattr(model, "audio_encoder", None)
    if encoder is not None and hasattr(encoder, "gradient_checkpointing"):
        encoder.gradient_checkpointing = True


@dataclass
class TrainResult:
    steps: int
    losses: list = field(default_factory=list)  # token-mean NTP loss of every optimizer step
    skips: dict = field(default_factory=dict)
    output_dir: str = ""
    final_dir: str | None = None
    elapsed_s: float = 0.0


class Trainer:
    """Runs one stage described by a `Config`. `model`/`processor` may be passed in (tests, benches); otherwise they
    are built from `cfg.model`. `callbacks` are called as fn(trainer, step, record) after every logged step
    (record = the metrics dict) on every rank."""

    def __init__(self, cfg: Config, model=None, processor=None, callbacks: list[Callable] | None = None,
                 cache_frozen_encoder: bool = False):
        self.cfg = cfg
        self.callbacks = list(callbacks or [])
        self.device = None
        self.info = init_distributed(cfg.distributed, "cuda" if pick_device(cfg.train.device, DistInfo()).type
                                     == "cuda" else "cpu")
        self.device = pick_device(cfg.train.device, self.info)
        # Same seed on every process before building: FSDP2 shards each process's own initial weights.
        seed_everything(cfg.train.seed)
        if model is None:
            model, built_processor = build_model_and_processor(cfg.model)
            processor = processor or built_processor
        if processor is None:
            processor = build_processor(cfg.model)
        self.processor = processor
        self.param_counts = apply_stage(model, cfg.train.stage, tuple(cfg.train.freeze))
        self.encoder_cache = None
        if cache_frozen_encoder or cfg.train.cache_frozen_encoder or cfg.train.encoder_cache_dir:
            # raises if the encoder trains in this stage
            self.encoder_cache = install_encoder_cache(model, cfg.train.encoder_cache_dir)
        if cfg.train.gradient_checkpointing:
            enable_gradient_checkpointing(model)
        if hasattr(getattr(model, "language_model", None), "config"):
            model.language_model.config.use_cache = False
        self.base_model = model.to(self.device)
        self.model = wrap_model(self.base_model, self.info, cfg.distributed, self.device)
        self.optimizer = build_optimizer(self.model, cfg.optim, self.device.type)
        self._logits_to_keep = "logits_to_keep" in inspect.signature(self.base_model.forward).parameters
        self.schedule = Schedule(self.optimizer, cfg.train.max_steps, cfg.optim)
        seed_everything(cfg.train.seed + self.info.rank)

        paths = [s.path for s in cfg.data.train]
        if not paths:
            raise ValueError("data.train is empty: give at least one manifest")
        self.dataset, self.manifest_skips = load_sources(paths, check_audio=cfg.data.check_audio)
        if len(self.dataset) == 0:
            raise ValueError(f"no usable training record in {paths}; {self.manifest_skips.report()}")
        self.sampler = BucketBatchSampler(
            self.dataset.lengths, self.dataset.sources, cfg.train.micro_batch_size,
            ratios=[s.ratio for s in cfg.data.train], samples_per_epoch=cfg.data.samples_per_epoch,
            bucket_batches=cfg.data.bucket_batches, rank=self.info.rank, world_size=self.info.world_size,
            seed=cfg.train.seed)
        self.collator = ConversationCollator(processor, loss_on=cfg.data.loss_on)
        self.runtime_skips = SkipCounter()
        self.step = 0
        self.epoch = 0
        self.batch_in_epoch = 0
        self.losses: list[float] = []
        self._fallback_batch = None
        self.writer = MetricsWriter(cfg.output.dir, enabled=self.info.is_main, tensorboard=cfg.output.tensorboard)

    # ---------------------------------------------------------------------------------------------------- data --
    def _loader(self):
        # A private generator: creating the iterator must not draw from the global RNG, or a resumed run
        # (which creates it at a different point) would diverge from an uninterrupted one.
        return torch.utils.data.DataLoader(
            self.dataset, batch_sampler=self.sampler, collate_fn=self.collator,
            num_workers=self.cfg.data.num_workers, generator=torch.Generator().manual_seed(0),
            persistent_workers=False)

    def _micro_batches(self):
        if len(self.sampler) == 0:
            raise ValueError("the sampler yields no batch: fewer samples than one global batch")
        while True:
            self.sampler.set_epoch(self.epoch, self.batch_in_epoch)
            for batch in self._loader():
                self.batch_in_epoch += 1
                yield batch
            self.epoch += 1
            self.batch_in_epoch = 0

    # --------------------------------------------------------------------------------------------------- state --
    def skip_counter(self) -> SkipCounter:
        """Manifest skips (identical on every rank) plus the runtime skips of all ranks."""
        total = SkipCounter().merge(self.manifest_skips)
        runtime = [self.runtime_skips]
        if self.info.enabled:
            import torch.distributed as dist

            gathered = [None] * self.info.world_size
            dist.all_gather_object(gathered, self.runtime_skips)
            runtime = gathered
        for c in runtime:
            total.merge(c)
        return total

    def trainer_state(self) -> dict:
        return {
            "step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
            "schedule": self.schedule.state_dict(), "losses": self.losses,
            "runtime_skips": self.skip_counter().as_dict(), "world_size": self.info.world_size,
            "micro_batch_size": self.cfg.train.micro_batch_size, "config": self.cfg.to_dict(),
        }

    def save(self) -> str:
        state = self.trainer_state()
        path = ckpt.save_checkpoint(self.cfg.output.dir, self.step, self.model, self.optimizer, state, self.info,
                                    keep_last=self.cfg.output.keep_last)
        return path

    def resume(self, where: str) -> bool:
        """`where`: "auto" (latest checkpoint of the output dir, if any), an output dir, or a checkpoint dir."""
        if where == "auto":
            path = ckpt.latest_checkpoint(self.cfg.output.dir)
            if path is None:
                return False
        elif os.path.isfile(os.path.join(where, "trainer_state.json")):
            path = where
        else:
            path = ckpt.latest_checkpoint(where)
            if path is None:
                raise FileNotFoundError(f"--resume {where}: no complete checkpoint there")
        state = ckpt.load_checkpoint(path, self.model, self.optimizer, self.info)
        if state.get("world_size", 1) * state.get("micro_batch_size", 0) != \
                self.info.world_size * self.cfg.train.micro_batch_size:
            raise ValueError("resume needs the same global micro-batch (processes x micro_batch_size) as the run "
                             f"that saved {path}, or the data position would not match")
        self.step = int(state["step"])
        self.epoch = int(state["epoch"])
        self.batch_in_epoch = int(state["batch_in_epoch"])
        self.schedule.load_state_dict(state["schedule"])
        self.losses = list(state.get("losses", []))
        if self.info.is_main:  # the saved counts already include every rank's; keep them once
            saved = state.get("runtime_skips", {})
            for reason, n in saved.get("by_reason", {}).items():
                n_manifest = self.manifest_skips.counts.get(reason, 0)
                for _ in range(max(0, n - n_manifest)):
                    self.runtime_skips.add(reason, "(before resume)")
        self._log_text(f"resumed from {path} at step {self.step} (epoch {self.epoch}, batch {self.batch_in_epoch})")
        return True

    def _log_text(self, text: str) -> None:
        if self.info.is_main:
            print(text, flush=True)

    # ---------------------------------------------------------------------------------------------------- step --
    def _prepare(self, batch):
        for bad_id, reason, detail in batch.get("skipped", []):
            self.runtime_skips.add(reason, bad_id, detail)
        if batch.get("empty"):
            if self._fallback_batch is None:
                raise RuntimeError("every record of the first micro-batch failed to load; "
                                   f"{self.runtime_skips.report()}")
            return self._fallback_batch, 0.0  # keeps processes in step; contributes nothing
        self._fallback_batch = batch
        return batch, 1.0

    def train_step(self, micro: list[dict]) -> dict:
        cfg = self.cfg
        prepared = [self._prepare(b) for b in micro]
        local_targets = sum(count_targets(b["labels"]) * w for b, w in prepared)
        local_tokens = sum(int(b["attention_mask"].sum()) * w for b, w in prepared)
        global_targets, global_tokens = all_reduce_sum([local_targets, local_tokens], self.info, self.device)
        denom = max(global_targets, 1.0)
        world = self.info.world_size
        n_micro = len(prepared)
        ce_total = 0.0
        aux_total = 0.0
        router_loads = []
        self.model.train()
        for m in frozen_modules(self.base_model):
            m.eval()
        for i, (batch, weight) in enumerate(prepared):
            inputs = forward_kwargs(self.model, batch, self.device)
            labels = batch["labels"].to(self.device)
            positions = None
            if self._logits_to_keep:
                positions = logit_positions(labels)
                inputs["logits_to_keep"] = positions
            with no_grad_sync(self.model, self.info, last_micro_batch=i == n_micro - 1):
                with autocast_context(cfg.train.precision, self.device):
                    out = self.model(**inputs)
                ce_sum = token_cross_entropy_sum(out.logits, labels, positions)
                aux = getattr(out, "aux_loss", None)
                loss = ce_sum * (world / denom)
                if aux is not None:
                    loss = loss + cfg.train.aux_loss_weight * aux.float() / n_micro
                (loss * weight).backward()
            ce_total += float(ce_sum.detach()) * weight
            if aux is not None:
                aux_total += float(aux.detach()) * weight / n_micro
            load = getattr(out, "router_load", None)
            if load is not None and weight:
                router_loads.append(load.detach().float().cpu())
        params = [p for p in self.model.parameters() if p.requires_grad]
        clip = cfg.optim.grad_clip if cfg.optim.grad_clip and cfg.optim.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(params, clip)
        grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
        lr = self.schedule.lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.schedule.step()
        ce_global, aux_global = all_reduce_sum([ce_total, aux_total], self.info, self.device)
        record = {"loss": ce_global / denom, "aux_loss": aux_global / world, "lr": lr, "grad_norm": grad_norm,
                  "target_tokens": int(global_targets), "tokens": int(global_tokens)}
        if router_loads:
            load = torch.stack(router_loads).mean(0)
            record["router_load"] = [round(float(x), 4) for x in load.flatten()]
            record["router_load_max"] = float(load.max())
        return record

    # ----------------------------------------------------------------------------------------------- training --
    def train(self, resume: str | None = None) -> TrainResult:
        cfg = self.cfg
        if resume:
            self.resume(resume)
        if self.info.is_main:
            os.makedirs(cfg.output.dir, exist_ok=True)
            with open(os.path.join(cfg.output.dir, "config.json"), "w", encoding="utf-8") as fh:
                json.dump(cfg.to_dict(), fh, indent=1, default=str)
            self._log_text(f"stage {cfg.train.stage}: {self.param_counts['trainable']:,} trainable / "
                           f"{self.param_counts['frozen']:,} frozen parameters; {len(self.dataset)} records "
                           f"({self.manifest_skips.report()}); {self.info.world_size} process(es), "
                           f"strategy {self.info.strategy}, device {self.device}")
        progress = Progress(cfg.train.max_steps, initial=self.step,
                            enabled=self.info.is_main and cfg.output.progress, desc=cfg.train.stage)
        batches = self._micro_batches()
        start = time.time()
        window_tokens, window_start = 0, time.time()
        stop = StopRequest() if cfg.output.save_on_interrupt else None
        try:
            while self.step < cfg.train.max_steps:
                if stop is not None and self._stop_agreed(stop):
                    from ..cli import Interrupted

                    path = self.save()
                    raise Interrupted(f"checkpoint of step {self.step} saved in {path}; continue with: "
                                      f"eureka-audio train --resume --output-dir {cfg.output.dir}", stop.signum)
                micro = [next(batches) for _ in range(cfg.train.grad_accum)]
                record = self.train_step(micro)
                self.step += 1
                self.losses.append(record["loss"])
                window_tokens += record["tokens"]
                now = time.time()
                tokens_per_s = window_tokens / max(now - window_start, 1e-9)
                progress.update(record["loss"], tokens_per_s, record["lr"])
                if self.step % cfg.output.log_every == 0 or self.step == cfg.train.max_steps:
                    record.update(step=self.step, epoch=self.epoch, tokens_per_s=tokens_per_s,
                                  elapsed_s=now - start, split="train")
                    self.writer.write(record)
                    window_tokens, window_start = 0, time.time()
                    for fn in self.callbacks:
                        fn(self, self.step, record)
                if cfg.output.eval_every and self.step % cfg.output.eval_every == 0 and cfg.data.eval:
                    self.writer.write({"step": self.step, "split": "eval", **self.evaluate_loss()})
                if cfg.output.save_every and self.step % cfg.output.save_every == 0 \
                        and self.step < cfg.train.max_steps:
                    self.save()
        finally:
            if stop is not None:
                stop.restore()
            progress.close()
        final_ckpt = self.save()
        final_dir = self.save_pretrained() if cfg.output.save_pretrained else None
        skips = self.skip_counter()
        if self.info.is_main:
            with open(os.path.join(cfg.output.dir, "data_report.json"), "w", encoding="utf-8") as fh:
                json.dump(skips.as_dict(), fh, indent=1)
            cache = self.encoder_cache
            cached = f"; encoder cache: {cache.hits} hits ({cache.disk_hits} from disk), {cache.misses} misses" \
                if cache is not None else ""
            self._log_text(f"done: {self.step} steps in {time.time() - start:.1f}s; checkpoint {final_ckpt}; "
                           f"model {final_dir}; {skips.report()}{cached}")
        self.writer.close()
        return TrainResult(steps=self.step, losses=list(self.losses), skips=skips.as_dict(),
                           output_dir=cfg.output.dir, final_dir=final_dir, elapsed_s=time.time() - start)

    def _stop_agreed(self, stop: "StopRequest") -> bool:
        """Whether any process was asked to stop (every process stops at the same step)."""
        if not self.info.enabled:
            return stop.requested
        return all_reduce_sum([float(stop.requested)], self.info, self.device)[0] > 0

    def save_pretrained(self) -> str:
        """`<output>/final`: model (save_pretrained) + processor, loadable by `eureka-audio infer` / `eval`."""
        final_dir = os.path.join(self.cfg.output.dir, "final")
        state = ckpt.model_state(self.model, self.info)  # collective under FSDP
        if self.info.is_main:
            model = self.base_model if not (self.info.enabled and self.info.strategy == "fsdp") else None
            if model is None:
                model = _rebuild_unsharded(self.base_model, state)
            model.save_pretrained(final_dir, state_dict=state)
            if hasattr(self.processor, "save_pretrained"):
                self.processor.save_pretrained(final_dir)
        barrier(self.info)
        return final_dir

    @torch.no_grad()
    def evaluate_loss(self) -> dict:
        """Token-mean NTP loss over data.eval (this rank's share; summed over ranks)."""
        dataset, _ = load_sources([s.path for s in self.cfg.data.eval], check_audio=self.cfg.data.check_audio)
        self.model.eval()
        ce, targets = 0.0, 0
        mb = self.cfg.train.micro_batch_size
        indices = list(range(self.info.rank, len(dataset), self.info.world_size))
        for start in range(0, len(indices), mb):
            batch = self.collator([dataset[i] for i in indices[start:start + mb]])
            if batch.get("empty"):
                continue
            with autocast_context(self.cfg.train.precision, self.device):
                out = unwrap(self.model)(**forward_kwargs(self.model, batch, self.device))
            ce += float(token_cross_entropy_sum(out.logits, batch["labels"].to(self.device)))
            targets += count_targets(batch["labels"])
        ce, targets = all_reduce_sum([ce, targets], self.info, self.device)
        return {"loss": ce / max(targets, 1), "target_tokens": int(targets)}

    def close(self) -> None:
        cleanup(self.info)


class StopRequest:
    """Turns the first Ctrl-C / SIGTERM into a request the training loop honours between optimizer steps (so the
    checkpoint it saves is of a whole step); a second one stops at once."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.requested = False
        self.signum = None
        self._previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested, self.signum = True, signum
        print(f"\n{signal.Signals(signum).name}: saving a checkpoint after this step (again to stop at once)",
              file=sys.stderr, flush=True)

    def restore(self):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


def _rebuild_unsharded(sharded_model, state: dict):
    """A plain (unsharded) copy of an FSDP2 model to call save_pretrained on, built from its config."""
    model = type(sharded_model)(sharded_model.config)
    model.load_state_dict(state, strict=False)
    return model


def run_training(cfg: Config, resume: str | None = None, **kwargs) -> TrainResult:
    trainer = Trainer(cfg, **kwargs)
    try:
        return trainer.train(resume=resume)
    finally:
        trainer.close()
