"""Per-thread scratch buffers for the inference paths' large transients (the Whisper encoder's activations, the log-mel
front end's frames).

Why: fresh multi-MB tensors are page-faulted in on every call whenever glibc has handed the freed blocks back to the
kernel, which it does often at these sizes.
"""
from __future__ import annotations

import math
import threading

import torch

_POOL = threading.local()


def scratch(name: str, shape: tuple, dtype: torch.dtype, device: torch.device | str, max_bytes: int) -> torch.Tensor:
    """A [shape] view of this thread's buffer called `name` (grown as needed, never shrunk): its contents belong to
    the caller until the next request for `name` on this thread. Above `max_bytes` a plain new tensor, so a rare huge
    request does not stay allocated. The buffer is a normal tensor, usable in and outside inference mode."""
    numel = math.prod(shape)
    device = torch.device(device)
    if numel * dtype.itemsize > max_bytes:
        return torch.empty(shape, dtype=dtype, device=device)
    pool = _POOL.__dict__.setdefault("pool", {})
    key = (name, dtype, device)
    buf = pool.get(key)
    if buf is None or buf.numel() < numel:
        with torch.inference_mode(False):
            pool[key] = buf = torch.empty(numel, dtype=dtype, device=device)
    return buf[:numel].view(shape)
