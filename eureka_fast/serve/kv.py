"""The running batch's KV cache: per-layer buffers that grow by doubling and that decode steps write into in place.

Layout (docs/serving.md#engine): row r of every buffer is the r-th running sequence; the live columns are
``[begin, end)`` and right-aligned, i.e. every row's latest token is in column ``end - 1`` and shorter rows are padded
on the left (their padding columns hold zeros and are masked out by ``mask``). A decode step writes column ``end`` of
every row and then moves ``end`` one on; ``DynamicCache`` instead concatenates every layer's whole cache each step.
Rows leave by compaction (the rows kept are copied to the front), and columns that have become padding in every row
are given up by moving ``begin``.
"""
from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer

_COLUMNS = 64  # columns are allocated in multiples of this


class _LayerView(DynamicLayer):
    """One attention layer's part of a BatchKV, in the interface transformers' attention layers call."""

    def __init__(self, owner: "BatchKV", index: int):
        super().__init__()
        self.owner, self.index = owner, index
        self.is_initialized = True

    def lazy_initialization(self, key_states, value_states) -> None:  # the owner allocates
        pass

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        owner = self.owner
        start, stop = owner.end, owner.end + key_states.shape[2]
        if stop > owner.capacity:
            raise RuntimeError("BatchKV.reserve() was not called before the forward")
        keys, values = owner.keys[self.index], owner.values[self.index]
        keys[:owner.rows, :, start:stop] = key_states
        values[:owner.rows, :, start:stop] = value_states
        return keys[:owner.rows, :, owner.begin:stop], values[:owner.rows, :, owner.begin:stop]

    def get_seq_length(self) -> int:
        return self.owner.end - self.owner.begin

    def get_max_length(self) -> int:
        return -1


class BatchKV:
    """Keys, values and attention mask of the running rows (see the module docstring)."""

    def __init__(self, num_layers: int, max_rows: int):
        self.num_layers = int(num_layers)
        self.max_rows = int(max_rows)
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.mask: torch.Tensor | None = None  # [row capacity, column capacity], 1 = a real token
        self.rows = 0
        self.begin = self.end = 0
        self.cache = Cache(layers=[_LayerView(self, i) for i in range(self.num_layers)])

    # --- sizes ----------------------------------------------------------------------------------------------------
    @property
    def capacity(self) -> int:
        return 0 if self.mask is None else self.mask.shape[1]

    @property
    def length(self) -> int:
        return self.end - self.begin

    def live_mask(self) -> torch.Tensor:
        return self.mask[:self.rows, self.begin:self.end]

    def _shape(self) -> tuple[list[int], list[int]]:
        return [k.shape[1] for k in self.keys], [k.shape[3] for k in self.keys]

    def _allocate(self, rows: int, columns: int, like: torch.Tensor, heads: list[int], dims: list[int]) -> None:
        """New buffers of rows x columns; the live columns of the current rows move to [0, length)."""
        length = self.length if self.rows else 0
        keys = [like.new_zeros(rows, h, columns, d) for h, d in zip(heads, dims)]
        values = [like.new_zeros(rows, h, columns, d) for h, d in zip(heads, dims)]
        mask = torch.zeros(rows, columns, dtype=torch.long, device=like.device)
        if self.rows:
            for new, old in zip(keys + values, self.keys + self.values):
                new[:self.rows, :, :length] = old[:self.rows, :, self.begin:self.end]
            mask[:self.rows, :length] = self.mask[:self.rows, self.begin:self.end]
        self.keys, self.values, self.mask = keys, values, mask
        self.begin, self.end = 0, length

    def _move_live(self, to: int) -> None:
        """Move the live columns of the current rows to start at column `to` (zeros in front of them)."""
        length = self.length
        for buffer in self.keys + self.values + [self.mask]:
            view = buffer[:self.rows]
            live = view[..., self.begin:self.end, :] if buffer.dim() == 4 else view[:, self.begin:self.end]
            live = live.clone()
            if buffer.dim() == 4:
                view[:, :, to:to + length] = live
                view[:, :, :to] = 0
            else:
                view[:, to:to + length] = live
                view[:, :to] = 0
        self.begin, self.end = to, to + length

    def reserve(self, columns: int) -> None:
        """Room for `columns` more columns after `end`: the live columns move to the front, or the buffers grow."""
        if self.end + columns <= self.capacity:
            return
        need = self.length + columns
        if need <= self.capacity // 2:
            self._move_live(0)
            return
        heads, dims = self._shape()
        self._allocate(self.mask.shape[0], _round_up(max(need, 2 * self.capacity)), self.keys[0], heads, dims)

    # --- rows -----------------------------------------------------------------------------------------------------
    def append(self, layers: list[tuple[torch.Tensor, torch.Tensor]], mask: torch.Tensor) -> None:
        """Add prefilled rows: per layer (keys, values) [n, heads, T, dim], right-aligned, and their mask [n, T]."""
        n, t = mask.shape
        if len(layers) != self.num_layers:
            raise ValueError(f"{len(layers)} prefilled layers for a {self.num_layers}-layer cache")
        if self.rows + n > self.max_rows:
            raise ValueError(f"{self.rows + n} rows exceed the cache's {self.max_rows}")
        heads, dims = [k.shape[1] for k, _ in layers], [k.shape[3] for k, _ in layers]
        if self.rows == 0:
            self.begin = self.end = 0
        row_capacity = 0 if self.mask is None else self.mask.shape[0]
        if self.mask is None or self.rows + n > row_capacity or max(t, self.length) + 1 > self.capacity:
            rows = min(self.max_rows, max(self.rows + n, 2 * row_capacity))
            self._allocate(rows, _round_up(max(t, self.length) + 1, self.capacity), layers[0][0], heads, dims)
        if t > self.length:  # the current rows get more padding on the left
            grow = t - self.length
            if self.begin >= grow:
                for buffer in self.keys + self.values:
                    buffer[:self.rows, :, self.begin - grow:self.begin] = 0
                self.mask[:self.rows, self.begin - grow:self.begin] = 0
                self.begin -= grow
            else:
                self._move_live(grow)  # zeros in front of the live columns: the padding the current rows gain
                self.begin = 0
        first = self.end - t
        new = slice(self.rows, self.rows + n)
        real = mask.bool()[:, None, :, None]  # the prefill's own padding columns hold zeros too, never stale values
        for (k, v), kb, vb in zip(layers, self.keys, self.values):
            kb[new, :, self.begin:first] = 0
            vb[new, :, self.begin:first] = 0
            kb[new, :, first:self.end] = k.masked_fill(~real, 0)
            vb[new, :, first:self.end] = v.masked_fill(~real, 0)
        self.mask[new, self.begin:first] = 0
        self.mask[new, first:self.end] = mask
        self.rows += n

    def keep(self, index: list[int]) -> None:
        """Keep only these rows (in this order), then give up the columns that are padding in all of them."""
        if not index:
            self.rows = 0
            self.begin = self.end = 0
            return
        if index != list(range(len(index))):
            picked = torch.tensor(index, dtype=torch.long, device=self.mask.device)
            for buffer in self.keys + self.values:
                buffer[:len(index), :, self.begin:self.end] = buffer[picked, :, self.begin:self.end]
            self.mask[:len(index), self.begin:self.end] = self.mask[picked, self.begin:self.end]
        self.rows = len(index)
        used = self.live_mask().any(0)
        self.begin += int(used.long().argmax()) if bool(used.any()) else self.length

    def step(self) -> torch.Tensor:
        """Before a decode step: room for one column; returns the step's attention mask [rows, length + 1]."""
        self.reserve(1)
        self.mask[:self.rows, self.end] = 1
        return self.mask[:self.rows, self.begin:self.end + 1]

    def advance(self) -> None:
        """After a decode step: its column is part of the cache."""
        self.end += 1

    def clear(self) -> None:
        """Forget every row and free the buffers."""
        self.keys, self.values, self.mask = [], [], None
        self.rows = self.begin = self.end = 0


def _round_up(columns: int, at_least: int = 0) -> int:
    columns = max(columns, at_least)
    return -(-columns // _COLUMNS) * _COLUMNS
