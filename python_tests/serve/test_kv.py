"""The engine's batch KV cache (eureka_fast.serve.kv.BatchKV) against a plain per-row list of what each row holds,
through random joins (shorter and longer than the batch), decode steps and departures (any subset, any order)."""
import random

import pytest
import torch

from eureka_fast.serve.kv import BatchKV

HEADS, DIM, LAYERS = 2, 4, 2


def check(kv: BatchKV, rows: list[list[torch.Tensor]]):
    """Row j's live columns: zeros and mask 0 on the left, then its own tokens' keys (values = -keys), mask 1."""
    assert kv.rows == len(rows)
    assert kv.cache.get_seq_length() == kv.length == max(len(r) for r in rows)
    mask = kv.live_mask()
    for layer in range(LAYERS):
        keys = kv.keys[layer][:kv.rows, :, kv.begin:kv.end]
        values = kv.values[layer][:kv.rows, :, kv.begin:kv.end]
        for j, tokens in enumerate(rows):
            pad = kv.length - len(tokens)
            assert mask[j].tolist() == [0] * pad + [1] * len(tokens)
            expected = torch.stack([t[layer] for t in tokens], 1)  # [H, T, D]
            assert torch.equal(keys[j, :, pad:], expected) and torch.equal(values[j, :, pad:], -expected)
            assert not keys[j, :, :pad].any() and not values[j, :, :pad].any()


def token(gen):
    return [torch.randn(HEADS, DIM, generator=gen) for _ in range(LAYERS)]


def prefill(rows_tokens):
    """A left-padded prefill of these rows, as the model's cache holds it: per layer (keys, values), and the mask."""
    t = max(len(r) for r in rows_tokens)
    mask = torch.zeros(len(rows_tokens), t, dtype=torch.long)
    layers = []
    for layer in range(LAYERS):
        keys = torch.full((len(rows_tokens), HEADS, t, DIM), 7.0)  # padding columns hold garbage, as a model's do
        for j, tokens in enumerate(rows_tokens):
            if tokens:
                keys[j, :, t - len(tokens):] = torch.stack([tok[layer] for tok in tokens], 1)
        layers.append((keys, -keys))
    for j, tokens in enumerate(rows_tokens):
        mask[j, t - len(tokens):] = 1
    return layers, mask


@pytest.mark.parametrize("seed", range(6))
def test_random_joins_steps_and_departures(seed):
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    kv = BatchKV(LAYERS, max_rows=8)
    rows: list[list[torch.Tensor]] = []
    reallocations = set()
    for _ in range(120):
        action = rng.random()
        if rows and action < 0.6:  # a decode step through the interface transformers' attention layers call
            step_mask = kv.step()
            assert step_mask.shape == (kv.rows, kv.length + 1) and step_mask[:, -1].all()
            new = [token(gen) for _ in rows]
            for layer in range(LAYERS):
                k = torch.stack([n[layer] for n in new])[:, :, None]  # [B, H, 1, D]
                keys, values = kv.cache.update(k, -k, layer)
                assert keys.shape == (kv.rows, HEADS, kv.length + 1, DIM)
                assert torch.equal(keys[:, :, -1:], k) and torch.equal(values[:, :, -1:], -k)
            kv.advance()
            for r, n in zip(rows, new):
                r.append(n)
        elif rows and action < 0.75:  # departures
            keep = sorted(rng.sample(range(len(rows)), rng.randint(0, len(rows))))
            if rng.random() < 0.3:
                rng.shuffle(keep)
            kv.keep(keep)
            rows = [rows[i] for i in keep]
            if not rows:
                assert kv.rows == 0
                continue
        elif len(rows) < 8:  # joins: prompts shorter or longer than the batch
            n = rng.randint(1, 8 - len(rows))
            group = [[token(gen) for _ in range(rng.randint(1, 150))] for _ in range(n)]
            kv.append(*prefill(group))
            rows.extend(group)
        if rows:
            check(kv, rows)
            reallocations.add(tuple(kv.mask.shape))
    assert len(reallocations) > 1  # the buffers grew on the way


def test_columns_are_reused_rather_than_grown_forever():
    """A long-running batch whose rows come and go keeps a bounded buffer: dead columns in front are reclaimed."""
    gen = torch.Generator().manual_seed(0)
    kv = BatchKV(LAYERS, max_rows=2)
    rows = []
    for step in range(600):
        if len(rows) < 2:
            group = [[token(gen) for _ in range(5)]]
            kv.append(*prefill(group))
            rows.extend(group)
        kv.step()
        new = [token(gen) for _ in rows]
        for layer in range(LAYERS):
            k = torch.stack([n[layer] for n in new])[:, :, None]
            kv.cache.update(k, -k, layer)
        kv.advance()
        for r, n in zip(rows, new):
            r.append(n)
        if len(rows[0]) >= 40:  # the oldest row leaves after 40 tokens
            kv.keep(list(range(1, len(rows))))
            rows = rows[1:]
        check(kv, rows)
    assert kv.capacity <= 256


def test_a_growing_row_reallocates_and_keeps_its_columns():
    gen = torch.Generator().manual_seed(1)
    kv = BatchKV(LAYERS, max_rows=4)
    rows = [[token(gen) for _ in range(3)]]
    kv.append(*prefill(rows))
    capacities = {kv.capacity}
    for _ in range(300):
        kv.step()
        new = token(gen)
        for layer in range(LAYERS):
            k = new[layer][None, :, None]
            kv.cache.update(k, -k, layer)
        kv.advance()
        rows[0].append(new)
        capacities.add(kv.capacity)
    check(kv, rows)
    assert len(capacities) >= 3 and kv.capacity >= 304
