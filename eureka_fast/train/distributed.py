"""Process-group setup and model wrapping (DistributedDataParallel or FSDP2 `fully_shard`) for torchrun launches."""
from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .config import DistributedConfig


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    strategy: str = "none"  # what the model is actually wrapped with

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(cfg: DistributedConfig, device_type: str) -> DistInfo:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1); a plain launch runs single-process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    backend = cfg.backend if cfg.backend != "auto" else ("nccl" if device_type == "cuda" else "gloo")
    if not dist.is_initialized():
        if device_type == "cuda":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=30))
    strategy = cfg.strategy if cfg.strategy != "none" else "none"
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, strategy=strategy)


def wrap_model(model: torch.nn.Module, info: DistInfo, cfg: DistributedConfig, device: torch.device):
    """DDP: one full replica per process, gradients all-reduced (averaged). FSDP2: every block of the language model,
    the adapter and the encoder layers are sharded with `fully_shard`, then the root; gradients are
    reduce-scattered (averaged). Both average over processes, so the trainer's loss scaling is the same."""
    if not info.enabled or info.strategy == "none":
        return model
    if info.strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index if device.index is not None else 0] if device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids, find_unused_parameters=cfg.find_unused_parameters)
    if info.strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in _shardable_blocks(model):
            fully_shard(block)
        fully_shard(model)
        return model
    raise ValueError(f"unknown distributed strategy {info.strategy!r}")


def _shardable_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated transformer layers of the encoder and the language model (any nn.ModuleList of >1 modules of one
    type). Each becomes its own FSDP2 unit, gathered in its forward pre-hook. Everything else (embeddings, the small
    adapter, norms) stays in the root unit, gathered when the model's forward starts; the adapter is not a unit of
    its own because the model calls its `fuse`/`mix` methods, which FSDP's forward hooks do not see."""
    blocks: list[torch.nn.Module] = []
    for name in ("audio_encoder", "language_model"):
        owner = getattr(model, name, None)
        if owner is None:
            continue
        for _, module in owner.named_modules():
            if isinstance(module, torch.nn.ModuleList) and len(module) > 1 and len({type(m) for m in module}) == 1:
                blocks.extend(m for m in module if any(True for _ in m.parameters()))
    return blocks


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") and isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def no_grad_sync(model: torch.nn.Module, info: DistInfo, last_micro_batch: bool):
    """Skip the gradient all-reduce on all but the last micro-batch of an accumulation step."""
    if last_micro_batch or not info.enabled:
        return contextlib.nullcontext()
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return model.no_sync()
    if info.strategy == "fsdp" and hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(False)

        @contextlib.contextmanager
        def resync():
            try:
                yield
            finally:
                model.set_requires_gradient_sync(True)

        return resync()
    return contextlib.nullcontext()


def all_reduce_sum(values: list[float], info: DistInfo, device: torch.device) -> list[float]:
    if not info.enabled:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def barrier(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.barrier()


def broadcast_object(obj, info: DistInfo):
    if not info.enabled:
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def cleanup(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
