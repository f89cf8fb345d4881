"""The frozen-encoder output cache: a frozen audio encoder's output per mel window, reused across steps and runs."""
from __future__ import annotations

import hashlib
import io
import os

import torch

from ..fsutil import atomic_write


class FrozenEncoderCache:
    """Memoises a frozen audio encoder's output per mel window, in memory and optionally on disk.

    Installed in place of the model's `encode_windows(input_features, frames_needed)` (an instance attribute, so
    the module tree and state dict stay those of the model). Each window's entry holds only the frames the model
    reads (`frames_needed`, i.e. up to its last audio token: a 2 s clip keeps 100 of the 1500 frames of its 30 s
    window); frames past that are returned as zeros, which the model never reads.

    The key is (SHA-1 of the encoder's weights and buffers, SHA-1 of the window's bytes, shape, dtype): changing the
    encoder's weights (loading a checkpoint, an in-place edit) invalidates every entry, detected through the
    parameters' version counters; a disk cache (`directory`) keeps one sub-directory per encoder-weights hash, so
    several runs, processes or experiments with the same frozen encoder share it.

    Only valid while the encoder does not train: its output for a window then never changes, so reusing it trains
    exactly the same parameters with the same values as recomputing it (up to batched-vs-single float rounding).
    It refuses an encoder with trainable parameters, and while installed it falls back to the real encoder
    whenever an encoder parameter requires grad.
    """

    def __init__(self, model, directory: str | None = None, max_entries: int = 1_000_000):
        encoder = model.audio_encoder
        if any(p.requires_grad for p in encoder.parameters()):
            raise ValueError("FrozenEncoderCache needs a frozen encoder (it would hide the encoder's updates)")
        if not hasattr(model, "encode_windows"):
            raise TypeError(f"{type(model).__name__} has no encode_windows(input_features, frames_needed) to cache")
        self.model = model
        self.encoder = encoder
        self.original = model.encode_windows
        self.directory = directory
        self.max_entries = max_entries
        self._cache: dict[tuple, torch.Tensor] = {}
        self._weights_sig = None
        self._weights_hash = ""
        self.hits = self.misses = self.disk_hits = 0

    # --- keys ----------------------------------------------------------------------------------------------------
    def _tensors(self):
        return [t for _, t in sorted(self.encoder.state_dict(keep_vars=True).items())]

    def weights_hash(self) -> str:
        """SHA-1 of the encoder's state (names, shapes, dtypes, values), recomputed only after a weight changed."""
        sig = tuple((t.data_ptr(), t._version, tuple(t.shape), t.dtype) for t in self._tensors())
        if sig != self._weights_sig:
            h = hashlib.sha1()
            for name, t in sorted(self.encoder.state_dict().items()):
                t = t.detach().contiguous().cpu()
                h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
                h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
            self._weights_sig, self._weights_hash = sig, h.hexdigest()
        return self._weights_hash

    @staticmethod
    def window_key(window: torch.Tensor) -> str:
        t = window.detach().contiguous().cpu()
        return f"{hashlib.sha1(t.numpy().tobytes()).hexdigest()}-{'x'.join(map(str, t.shape))}-{str(t.dtype)[6:]}"

    def _path(self, weights: str, key: str) -> str:
        return os.path.join(self.directory, weights[:16], key + ".pt")

    # --- lookup --------------------------------------------------------------------------------------------------
    def _lookup(self, weights: str, key: str, needed: int):
        hit = self._cache.get((weights, key))
        if hit is not None and hit.shape[0] >= needed:
            return hit
        if self.directory:
            path = self._path(weights, key)
            if os.path.exists(path):
                try:
                    stored = torch.load(path, map_location="cpu", weights_only=True)
                except Exception:  # a torn or foreign file is a miss, never an error
                    stored = None
                if torch.is_tensor(stored) and stored.shape[0] >= needed:
                    self.disk_hits += 1
                    self._remember(weights, key, stored)
                    return stored
        return None

    def _remember(self, weights: str, key: str, rows: torch.Tensor) -> None:
        if len(self._cache) < self.max_entries or (weights, key) in self._cache:
            self._cache[(weights, key)] = rows

    def _store(self, weights: str, key: str, rows: torch.Tensor) -> None:
        self._remember(weights, key, rows)
        if self.directory:
            path = self._path(weights, key)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            buf = io.BytesIO()
            torch.save(rows, buf)
            atomic_write(path, buf.getvalue())

    def __call__(self, input_features: torch.Tensor, frames_needed) -> torch.Tensor:
        needed = [int(n) for n in frames_needed]
        if any(p.requires_grad for p in self.encoder.parameters()) or len(needed) != input_features.shape[0]:
            return self.original(input_features, needed)
        weights = self.weights_hash()
        keys = [self.window_key(w) for w in input_features]
        rows = [self._lookup(weights, k, n) for k, n in zip(keys, needed)]
        todo = [i for i, r in enumerate(rows) if r is None]
        self.hits += len(keys) - len(todo)
        self.misses += len(todo)
        if todo:
            with torch.no_grad():
                fresh = self.original(input_features[todo], [needed[i] for i in todo])
            for i, out in zip(todo, fresh):
                rows[i] = out[:needed[i]].detach().cpu().clone()
                self._store(weights, keys[i], rows[i])
        length = max(needed, default=0)
        dim = rows[0].shape[-1] if rows else 0
        out = torch.zeros(len(rows), length, dim, dtype=rows[0].dtype if rows else input_features.dtype)
        for i, r in enumerate(rows):
            out[i, :needed[i]] = r[:needed[i]]
        return out.to(input_features.device)


def install_encoder_cache(model, directory: str | None = None) -> FrozenEncoderCache:
    """Route `model.encode_windows` through a FrozenEncoderCache (the existing one when already installed; a
    directory given then becomes its disk cache)."""
    current = model.__dict__.get("encode_windows")
    if isinstance(current, FrozenEncoderCache):
        if directory:
            current.directory = directory
        return current
    cache = FrozenEncoderCache(model, directory)
    model.encode_windows = cache
    return cache


def remove_encoder_cache(model) -> None:
    if isinstance(model.__dict__.get("encode_windows"), FrozenEncoderCache):
        del model.encode_windows
