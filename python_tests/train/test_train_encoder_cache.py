"""The frozen-encoder feature cache (keyed on window bytes + encoder weights, trimmed to the frames the model reads,
optionally on disk) and the model's adapter slicing it relies on."""
from __future__ import annotations

import os

import pytest
import torch

from eureka_fast.train.config import config_from_dict
from eureka_fast.train.data import ConversationCollator, load_sources
from eureka_fast.train.encoder_cache import FrozenEncoderCache, install_encoder_cache, remove_encoder_cache
from eureka_fast.train.trainer import Trainer
from train_helpers import base_config, tiny_model

INPUTS = ("input_ids", "attention_mask", "token_type_ids", "input_features", "audio_token_counts",
          "windows_per_request")


def _batch(train_manifest, processor, rows=(0, 5, 11)):
    ds, _ = load_sources([train_manifest])
    batch = ConversationCollator(processor)([ds[i] for i in rows])
    return {k: batch[k] for k in INPUTS}


def _whole_window_embeddings(model, batch):
    """The pre-slicing computation: fuse all 375 tokens of every window, then keep each request's first tokens."""
    frames = model.audio_encoder(batch["input_features"])
    fused = model.adapter.fuse(frames)
    mask = model.audio_positions(batch["input_ids"], batch["token_type_ids"])
    rows, start = [], 0
    for tokens, windows in zip(mask.sum(1).tolist(), batch["windows_per_request"]):
        rows.append(fused[start:start + int(windows)].reshape(-1, fused.shape[-1])[:tokens])
        start += int(windows)
    return model.adapter.mix(torch.cat(rows, 0)).embeddings


def test_adapter_runs_only_on_kept_tokens_with_unchanged_output(train_manifest, processor, monkeypatch):
    model = tiny_model().eval()
    batch = _batch(train_manifest, processor)
    seen = []
    fuse = model.adapter.fuse
    monkeypatch.setattr(model.adapter, "fuse", lambda frames, *a, **k: seen.append(frames.shape) or fuse(frames))
    with torch.no_grad():
        mask = model.audio_positions(batch["input_ids"], batch["token_type_ids"])
        sliced = model.encode_audio(batch["input_features"], mask.sum(1).tolist(), batch["windows_per_request"],
                                    batch["audio_token_counts"]).embeddings
        monkeypatch.setattr(model.adapter, "fuse", fuse)
        whole = _whole_window_embeddings(model, batch)
    longest = int(mask.sum(1).max())
    assert [tuple(s[:2]) for s in seen] == [(batch["input_features"].shape[0], 4 * longest)]
    assert longest < 375
    torch.testing.assert_close(sliced, whole, rtol=1e-5, atol=1e-5)


def test_cache_gives_the_model_output_and_stores_only_read_frames(train_manifest, processor, tmp_path):
    model = tiny_model().eval().requires_grad_(False)
    batch = _batch(train_manifest, processor)
    with torch.no_grad():
        plain = model(**batch).logits
    cache = install_encoder_cache(model, str(tmp_path / "feats"))
    with torch.no_grad():
        first = model(**batch).logits
        second = model(**batch).logits
    torch.testing.assert_close(first, plain)
    torch.testing.assert_close(second, plain)
    windows = batch["input_features"].shape[0]
    assert (cache.misses, cache.hits) == (windows, windows)
    mask = model.audio_positions(batch["input_ids"], batch["token_type_ids"])
    stored = sorted(int(t.shape[0]) for t in cache._cache.values())
    assert stored == sorted(4 * int(n) for n in mask.sum(1))  # one window per clip, its audio frames only
    assert install_encoder_cache(model) is cache
    remove_encoder_cache(model)
    assert "encode_windows" not in model.__dict__

    # a fresh process (new cache object) with the same weights reads the disk cache and computes nothing
    again = install_encoder_cache(tiny_model().eval().requires_grad_(False), str(tmp_path / "feats"))
    with torch.no_grad():
        torch.testing.assert_close(again.model(**batch).logits, plain)
    assert again.misses == 0 and again.disk_hits == windows


def test_cache_is_keyed_on_encoder_weights(train_manifest, processor, tmp_path):
    model = tiny_model().eval().requires_grad_(False)
    batch = _batch(train_manifest, processor, rows=(1, 2))
    cache = install_encoder_cache(model, str(tmp_path / "feats"))
    with torch.no_grad():
        before = model(**batch).logits
        h0 = cache.weights_hash()
        model.audio_encoder.load_state_dict(tiny_model(seed=1).audio_encoder.state_dict())  # in-place copies
        assert cache.weights_hash() != h0
        after = model(**batch).logits
        remove_encoder_cache(model)
        expected = model(**batch).logits
    assert cache.misses == 4  # recomputed for the new weights
    torch.testing.assert_close(after, expected)
    assert not torch.allclose(after, before)
    assert len(os.listdir(tmp_path / "feats")) == 2  # one sub-directory per encoder-weights hash


def test_cache_refuses_or_bypasses_a_training_encoder(train_manifest, processor):
    with pytest.raises(ValueError, match="frozen"):
        FrozenEncoderCache(tiny_model())
    model = tiny_model().requires_grad_(False)
    cache = install_encoder_cache(model)
    model.audio_encoder.requires_grad_(True)  # unfrozen later: the real encoder runs, with gradients
    out = model(**_batch(train_manifest, processor, rows=(3,)))
    out.logits.sum().backward()
    assert cache.misses == cache.hits == 0
    assert model.audio_encoder.conv1.weight.grad is not None


def test_config_switch_trains_identically_and_reuses_the_disk_cache(train_manifest, tmp_path, processor):
    def run(name, **train):
        cfg = base_config(train_manifest, str(tmp_path / name), max_steps=3, freeze=["audio_encoder"], **train)
        trainer = Trainer(config_from_dict(cfg), model=tiny_model(), processor=processor)
        return trainer, trainer.train().losses

    _, plain = run("plain")
    first, cached = run("a", encoder_cache_dir=str(tmp_path / "feats"))
    second, reused = run("b", cache_frozen_encoder=True, encoder_cache_dir=str(tmp_path / "feats"))
    assert cached == pytest.approx(plain, rel=1e-5)
    assert reused == pytest.approx(plain, rel=1e-5)
    assert first.encoder_cache.misses > 0 and second.encoder_cache.misses == 0
    assert second.encoder_cache.disk_hits > 0
