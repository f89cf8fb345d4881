"""Atomic training checkpoints with everything needed to resume exactly.

Layout: `<output>/checkpoints/step-00000100/` holding `model.pt`, `optimizer.pt`, `trainer_state.json` (step, data
position, schedule, skip counts, config) and `rng-rank{r}.pt` (Python, NumPy, torch CPU and CUDA generators of every
process). A checkpoint is written into a hidden `.step-00000100.tmp` directory and renamed into place only when
every file is on disk, then `latest` is replaced atomically; a crash midway leaves the previous checkpoint and the
`latest` pointer untouched (the stale temporary directory is ignored and cleaned by the next save).
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil

import numpy as np
import torch

from ..fsutil import fsync_dir as _fsync_dir
from .distributed import DistInfo, barrier, broadcast_object

STEP_DIR = re.compile(r"^step-(\d+)$")


def _save(obj, path: str) -> None:
    with open(path, "wb") as fh:
        torch.save(obj, fh)
        fh.flush()
        os.fsync(fh.fileno())


def _write_text(path: str, text: str) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def model_state(model: torch.nn.Module, info: DistInfo) -> dict:
    """Full (unsharded) CPU state dict on rank 0; a collective under FSDP, so every rank must call it."""
    if info.strategy == "fsdp" and info.enabled:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    from .distributed import unwrap

    return {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()}


def optimizer_state(model, optimizer, info: DistInfo) -> dict:
    if info.strategy == "fsdp" and info.enabled:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(model, optimizer,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return optimizer.state_dict()


def load_model_state(model, state: dict, info: DistInfo) -> None:
    if info.strategy == "fsdp" and info.enabled:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True))
        return
    from .distributed import unwrap

    missing, unexpected = unwrap(model).load_state_dict(state, strict=False)
    # Tied weights may be stored once; anything else missing means the checkpoint is for another model.
    real_missing = [k for k in missing if "lm_head" not in k]
    if real_missing or unexpected:
        raise RuntimeError(f"checkpoint does not match the model: missing {real_missing[:5]}, "
                           f"unexpected {list(unexpected)[:5]}")


def load_optimizer_state(model, optimizer, state: dict, info: DistInfo) -> None:
    if info.strategy == "fsdp" and info.enabled:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
        return
    optimizer.load_state_dict(state)


def checkpoint_root(output_dir: str) -> str:
    return os.path.join(output_dir, "checkpoints")


def list_checkpoints(output_dir: str) -> list[tuple[int, str]]:
    root = checkpoint_root(output_dir)
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        m = STEP_DIR.match(name)
        if m and os.path.isfile(os.path.join(root, name, "trainer_state.json")):
            found.append((int(m.group(1)), os.path.join(root, name)))
    return sorted(found)


def latest_checkpoint(output_dir: str) -> str | None:
    """The directory named by `latest` if it is complete, else the highest complete step directory."""
    root = checkpoint_root(output_dir)
    pointer = os.path.join(root, "latest")
    if os.path.isfile(pointer):
        with open(pointer, encoding="utf-8") as fh:
            name = fh.read().strip()
        path = os.path.join(root, name)
        if STEP_DIR.match(name) and os.path.isfile(os.path.join(path, "trainer_state.json")):
            return path
    found = list_checkpoints(output_dir)
    return found[-1][1] if found else None


def save_checkpoint(output_dir: str, step: int, model, optimizer, trainer_state: dict, info: DistInfo,
                    keep_last: int = 2) -> str:
    """Write a checkpoint atomically (collective: every rank calls it). Returns the final directory."""
    root = checkpoint_root(output_dir)
    name = f"step-{step:08d}"
    final = os.path.join(root, name)
    tmp = os.path.join(root, f".{name}.tmp")
    if info.is_main:
        os.makedirs(root, exist_ok=True)
        if os.path.exists(tmp):
            shutil.rmtree(tmp)
        os.makedirs(tmp)
    barrier(info)
    # Gathering full state dicts is collective under FSDP; only rank 0 keeps and writes them.
    model_sd = model_state(model, info)
    optim_sd = optimizer_state(model, optimizer, info)
    _save(rng_state(), os.path.join(tmp, f"rng-rank{info.rank}.pt"))
    barrier(info)
    error = None
    if info.is_main:
        try:
            _save(model_sd, os.path.join(tmp, "model.pt"))
            _save(optim_sd, os.path.join(tmp, "optimizer.pt"))
            # trainer_state.json is written last: its presence marks a complete checkpoint.
            _write_text(os.path.join(tmp, "trainer_state.json"), json.dumps(trainer_state, indent=1, default=str))
            _fsync_dir(tmp)
            if os.path.exists(final):  # same step saved again (e.g. final save right after a periodic one)
                shutil.rmtree(final)
            os.rename(tmp, final)
            _fsync_dir(root)
            pointer_tmp = os.path.join(root, ".latest.tmp")
            _write_text(pointer_tmp, name)
            os.replace(pointer_tmp, os.path.join(root, "latest"))
            _fsync_dir(root)
            _prune(output_dir, keep_last, keep=final)
        except BaseException as exc:  # report to the other ranks before re-raising
            error = f"{type(exc).__name__}: {exc}"
            if info.enabled:
                broadcast_object(error, info)
            raise
    error = broadcast_object(error, info)
    if error:
        raise RuntimeError(f"checkpoint save failed on rank 0: {error}")
    return final


def _prune(output_dir: str, keep_last: int, keep: str) -> None:
    if keep_last <= 0:
        return
    found = list_checkpoints(output_dir)
    for _, path in found[:-keep_last]:
        if os.path.abspath(path) != os.path.abspath(keep):
            shutil.rmtree(path, ignore_errors=True)


def load_checkpoint(path: str, model, optimizer, info: DistInfo) -> dict:
    """Restore model, optimizer and this rank's RNG; returns the trainer state (step, data position, ...)."""
    with open(os.path.join(path, "trainer_state.json"), encoding="utf-8") as fh:
        state = json.load(fh)
    load_model_state(model, torch.load(os.path.join(path, "model.pt"), map_location="cpu", weights_only=False), info)
    if optimizer is not None:
        load_optimizer_state(model, optimizer,
                             torch.load(os.path.join(path, "optimizer.pt"), map_location="cpu", weights_only=False),
                             info)
    rng_file = os.path.join(path, f"rng-rank{info.rank}.pt")
    if not os.path.exists(rng_file):  # resumed with more processes than were saved
        rng_file = os.path.join(path, "rng-rank0.pt")
    set_rng_state(torch.load(rng_file, weights_only=False))
    return state
