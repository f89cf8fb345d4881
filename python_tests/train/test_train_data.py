"""Manifest validation and skip counting, ratio mixing, length bucketing, distributed slicing, label masking."""
from __future__ import annotations

import base64
import collections
import json
import os

import numpy as np
import pytest
import torch

from eureka_fast.train.data import (IGNORE_INDEX, BadSample, BucketBatchSampler, ConversationCollator,
                                    ConversationDataset, SkipCounter, count_targets, mixture_counts, read_manifest)
from train_helpers import asr_record, write_manifest


def test_manifest_skips_and_counts_bad_records(clip_dir, tmp_path):
    (tmp_path / "garbage.wav").write_bytes(b"this is not audio at all" * 10)
    good = asr_record("good", str(clip_dir / "c1.wav"), "one two")
    relative = asr_record("relative", os.path.relpath(clip_dir / "c2.wav", tmp_path), "three")
    lines = [
        good, relative,
        asr_record("missing", "nope/absent.wav", "four"),
        asr_record("unreadable", "garbage.wav", "five"),
        asr_record("empty", str(clip_dir / "c3.wav"), "   "),
        {"id": "no-target", "messages": good["messages"][:2]},
        {"id": "bad-role", "messages": [{"role": "robot", "content": "x"}] + good["messages"]},
        "{not json",
        "",  # blank lines are ignored, not counted
    ]
    skips = SkipCounter()
    records = read_manifest(write_manifest(str(tmp_path / "m.jsonl"), lines), skips)
    assert [r.id for r in records] == ["good", "relative"]
    assert records[1].audio == [str(clip_dir / "c2.wav")]  # resolved against the manifest's directory
    assert dict(skips.counts) == {"missing_audio": 1, "unreadable_audio": 1, "empty_target": 1, "no_target": 1,
                                  "bad_format": 1, "invalid_json": 1}
    assert skips.total == 6
    assert "missing" in skips.examples["missing_audio"][0]
    assert "bad records skipped: 6" in skips.report()


def test_dataset_loads_lazily_and_reports_decode_failures(clip_dir, tmp_path):
    records = read_manifest(write_manifest(str(tmp_path / "m.jsonl"),
                                           [asr_record("a", str(clip_dir / "c0.wav"), "one")]))
    calls = []

    def loader(ref):
        calls.append(ref)
        raise OSError("disk on fire")

    ds = ConversationDataset(records, load_audio=loader)
    assert calls == []  # nothing decoded until an item is fetched
    item = ds[0]
    assert isinstance(item, BadSample) and item.reason == "unreadable_audio" and "disk on fire" in item.detail
    ok = ConversationDataset(records)[0]
    wave, rate = ok["messages"][1]["content"][0]["audio"]
    assert rate == 16000 and wave.dtype == np.float32 and abs(len(wave) - 0.3 * 16000) < 10


def test_mixture_counts_follow_ratios():
    assert mixture_counts([100, 100, 100, 100], [0.6, 0.1, 0.2, 0.1], 1000) == [600, 100, 200, 100]
    assert sum(mixture_counts([5, 7], [1, 2], 10)) == 10
    assert mixture_counts([5, 0], [1, 1], 10) == [10, 0]  # an empty source gets nothing


def test_sampler_mixes_sources_by_ratio_even_when_small():
    # source 0: 50 records, source 1: 10 records; ask 3:1 over 400 samples -> source 1 repeats ~10x
    sources = [0] * 50 + [1] * 10
    lengths = list(range(60))
    s = BucketBatchSampler(lengths, sources, micro_batch_size=4, ratios=[3, 1], samples_per_epoch=400, seed=1)
    drawn = [i for b in s for i in b]
    per_source = collections.Counter(sources[i] for i in drawn)
    assert len(drawn) == 400
    assert per_source[0] == 300 and per_source[1] == 100
    # successive shuffled passes: every record of the small source is used 10 times
    assert set(collections.Counter(i for i in drawn if sources[i] == 1).values()) == {10}


def test_sampler_buckets_by_length():
    rng = np.random.default_rng(0)
    lengths = rng.integers(10, 1000, size=512).tolist()
    s = BucketBatchSampler(lengths, [0] * 512, micro_batch_size=8, bucket_batches=64, seed=0)
    spreads = [max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in s]
    # random batches of 8 from U(10, 1000) have a mean range around 770; sorted 512-sample chunks give ~15
    assert np.mean(spreads) < 50
    batches = list(s)
    assert sorted(i for b in batches for i in b) == list(range(512))  # one epoch = every record once


def test_sampler_ranks_partition_the_global_batch_and_resume_mid_epoch():
    lengths = list(np.random.default_rng(3).integers(1, 100, 97))
    single = BucketBatchSampler(lengths, [0] * 97, micro_batch_size=4, seed=5)
    ranks = [BucketBatchSampler(lengths, [0] * 97, micro_batch_size=2, rank=r, world_size=2, seed=5)
             for r in range(2)]
    for epoch in (0, 1):
        single.set_epoch(epoch)
        for r in ranks:
            r.set_epoch(epoch)
        joined = [a + b for a, b in zip(*[list(r) for r in ranks])]
        assert joined == list(single)
        assert len(joined) == 97 // 4  # incomplete global batch dropped
    single.set_epoch(1)
    full = list(single)
    single.set_epoch(1, start_batch=7)
    assert list(single) == full[7:]
    single.set_epoch(2)
    assert list(single) != full  # a new epoch reshuffles


def test_collator_labels_only_assistant_tokens(clip_dir, tmp_path, processor):
    recs = [asr_record("a", str(clip_dir / "c0.wav"), "one two three"),
            asr_record("b", str(clip_dir / "c5.wav"), "four")]
    ds = ConversationDataset(read_manifest(write_manifest(str(tmp_path / "m.jsonl"), recs)))
    batch = ConversationCollator(processor)([ds[0], ds[1], BadSample("c", "unreadable_audio", "x")])
    assert batch["ids"] == ["a", "b"] and batch["skipped"] == [("c", "unreadable_audio", "x")]
    tok = processor.tokenizer
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    for row, text in enumerate(["one two three", "four"]):
        labels = batch["labels"][row]
        kept = labels[labels != IGNORE_INDEX].tolist()
        # independent reference: the tokenizer's ids for the answer, then the closing <|im_end|>
        assert kept == tok.encode(text, add_special_tokens=False) + [im_end]
        # the labelled span is contiguous and sits right before "\n" after the assistant header
        pos = (labels != IGNORE_INDEX).nonzero().flatten()
        assert (pos.diff() == 1).all()
        assert (batch["input_ids"][row, pos] == labels[pos]).all()
        assert (batch["token_type_ids"][row][labels != IGNORE_INDEX] == 0).all()  # never an audio position
    assert count_targets(batch["labels"]) == len(tok.encode("one two three", add_special_tokens=False)) + 1 + 2


def test_collator_text_mode_and_processor_failures(clip_dir, tmp_path, processor):
    recs = [asr_record("a", str(clip_dir / "c0.wav"), "one")]
    ds = ConversationDataset(read_manifest(write_manifest(str(tmp_path / "m.jsonl"), recs)))
    batch = ConversationCollator(processor, loss_on="text")([ds[0]])
    labels = batch["labels"][0]
    text_positions = (batch["attention_mask"][0] == 1) & (batch["token_type_ids"][0] == 0)
    assert torch.equal(labels != IGNORE_INDEX, text_positions)
    broken = dict(ds[0])
    broken["id"] = "broken"
    broken["messages"] = [{"role": "user", "content": [{"type": "audio", "audio": "/no/such.wav"}]},
                          broken["messages"][2]]
    out = ConversationCollator(processor)([ds[0], broken])
    assert out["ids"] == ["a"] and out["skipped"][0][:2] == ("broken", "processor_error")
    assert ConversationCollator(processor)([BadSample("x", "unreadable_audio")])["empty"]


def test_manifest_reads_every_audio_item_form_the_processor_takes(clip_dir, tmp_path, processor):
    # one parser (eureka_fast.models.conversation) for both: an item the processor renders is one training accepts
    path = str(clip_dir / "c1.wav")
    with open(path, "rb") as fh:
        data_uri = "data:audio/wav;base64," + base64.b64encode(fh.read()).decode("ascii")
    user_items = [
        [{"type": "audio_url", "audio_url": {"url": path}}],
        [{"type": "audio_url", "audio_url": path}],
        [{"type": "audio", "path": path}],
        [{"type": "audio", "url": "file://" + path}],
        [{"type": "input_audio", "input_audio": {"data": data_uri.split(",", 1)[1], "format": "wav"}}],
        {"type": "audio", "audio": path},  # one item, not in a list
    ]
    lines = [{"id": f"form-{i}", "messages": [{"role": "user", "content": content},
                                              {"role": "assistant", "content": "ok"}]}
             for i, content in enumerate(user_items)]
    lines.append({"id": "no-url", "messages": [{"role": "user", "content": [{"type": "audio_url", "audio_url": {}}]},
                                               {"role": "assistant", "content": "ok"}]})
    skips = SkipCounter()
    records = read_manifest(write_manifest(str(tmp_path / "forms.jsonl"), lines), skips)
    assert [r.id for r in records] == [f"form-{i}" for i in range(len(user_items))]
    assert dict(skips.counts) == {"bad_format": 1} and "audio_url item needs" in skips.examples["bad_format"][0]
    assert [r.audio for r in records[:4]] == [[path]] * 4
    assert records[4].audio[0].startswith("data:audio/wav;base64,")
    # every record decodes to the same waveform and the processor gives each the same audio tokens
    dataset = ConversationDataset(records)
    waves = [dataset[i]["messages"][0]["content"][0]["audio"][0] for i in range(len(records))]
    assert all(np.array_equal(w, waves[0]) for w in waves)
    counts = [processor(line["messages"])["audio_token_counts"].tolist() for line in lines[:-1]]
    assert counts == [counts[0]] * len(counts) and counts[0][0] == -(-len(waves[0]) // 1280)
