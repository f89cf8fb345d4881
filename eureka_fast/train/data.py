"""Training data: JSONL conversation manifests, a lazily loading dataset, ratio mixing, a length-bucketed
distributed batch sampler, and the collator that builds assistant-only labels.

Record format: docs/INTERFACES.md ("Conversation records"). Bad records are never fatal: they are skipped and counted
by reason (`SkipCounter`), either while reading the manifest (bad JSON, no assistant target, missing or unreadable
audio) or when a sample is loaded (audio that fails to decode); the trainer reports the totals at the end.
"""
from __future__ import annotations

import json
import math
import os
import random
from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from ..audio import SAMPLE_RATE, SAMPLES_PER_TOKEN, load_clip
from ..models.conversation import AUDIO_ITEM_TYPES, ROLES, MessageFormatError, audio_reference, content_items, text_of

IGNORE_INDEX = -100


class SkipCounter:
    """Counts skipped records by reason and keeps a few example ids per reason for the report."""

    def __init__(self, examples_per_reason: int = 5):
        self.counts: Counter = Counter()
        self.examples: dict[str, list[str]] = {}
        self._keep = examples_per_reason

    def add(self, reason: str, record_id: str, detail: str = "") -> None:
        self.counts[reason] += 1
        examples = self.examples.setdefault(reason, [])
        if len(examples) < self._keep:
            examples.append(f"{record_id}: {detail}" if detail else record_id)

    def merge(self, other: "SkipCounter") -> "SkipCounter":
        for reason, n in other.counts.items():
            self.counts[reason] += n
            room = self._keep - len(self.examples.setdefault(reason, []))
            self.examples[reason].extend(other.examples.get(reason, [])[: max(room, 0)])
        return self

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def as_dict(self) -> dict:
        return {"total": self.total, "by_reason": dict(self.counts), "examples": self.examples}

    def report(self) -> str:
        if not self.total:
            return "bad records skipped: 0"
        parts = ", ".join(f"{reason} {n}" for reason, n in sorted(self.counts.items()))
        return f"bad records skipped: {self.total} ({parts})"


@dataclass
class Record:
    """One validated conversation. `audio` holds the resolved audio references in the order they appear."""

    id: str
    task: str
    messages: list
    answer: str | None
    meta: dict
    audio: list[str]
    length: int  # estimated sequence length in tokens (audio tokens + text tokens), used for bucketing
    source: int = 0  # index of the manifest it came from


@dataclass
class BadSample:
    """Returned by the dataset instead of a sample when loading fails; the collator drops and counts it."""

    id: str
    reason: str
    detail: str = ""


def _is_remote(ref: str) -> bool:
    return ref.startswith(("http://", "https://", "data:"))


def audio_duration_samples(path: str) -> int:
    """Number of samples at 16 kHz, read from the file header (no decoding); raises on unreadable files."""
    import soundfile

    info = soundfile.info(path)
    if info.frames <= 0 or info.samplerate <= 0:
        raise ValueError("empty audio")
    return int(math.ceil(info.frames * SAMPLE_RATE / info.samplerate))


def parse_record(obj: Any, base_dir: str, fallback_id: str, check_audio: bool = True) -> Record:
    """Validate one manifest object; raises `_Skip(reason, detail)` when it cannot be trained on."""
    if not isinstance(obj, dict):
        raise _Skip("bad_format", "record is not a JSON object")
    record_id = str(obj.get("id") or fallback_id)
    messages = obj.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _Skip("bad_format", "no messages", record_id)
    resolved_messages = []
    audio_refs: list[str] = []
    audio_samples = 0
    text_chars = 0
    for index, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise _Skip("bad_format", f"message with role {m.get('role') if isinstance(m, dict) else m!r}", record_id)
        where = f"message {index} ({m['role']})"
        try:
            items = content_items(m.get("content"), where)
        except MessageFormatError as exc:
            raise _Skip("bad_format", str(exc), record_id) from None
        new_items = []
        for it in items:
            if not isinstance(it, dict) or "type" not in it:
                raise _Skip("bad_format", "content item without a type", record_id)
            if it["type"] in AUDIO_ITEM_TYPES:
                try:
                    ref = audio_reference(it, where)
                except MessageFormatError as exc:
                    raise _Skip("bad_format", str(exc), record_id) from None
                if not isinstance(ref, str) or not ref:
                    raise _Skip("bad_format", f"{where}: a manifest's audio item must name a path, URL or data URI",
                                record_id)
                if not _is_remote(ref):
                    if ref.startswith("file://"):
                        ref = ref[len("file://"):]
                    if not os.path.isabs(ref):
                        ref = os.path.normpath(os.path.join(base_dir, ref))
                    if not os.path.exists(ref):
                        raise _Skip("missing_audio", ref, record_id)
                    if check_audio:
                        try:
                            audio_samples += audio_duration_samples(ref)
                        except Exception as exc:  # soundfile raises its own error types
                            raise _Skip("unreadable_audio", f"{ref}: {exc}", record_id) from None
                    else:
                        audio_samples += max(os.path.getsize(ref) // 2, 1)  # 16-bit PCM guess, only for bucketing
                else:
                    audio_samples += 10 * SAMPLE_RATE  # unknown until fetched; a typical clip for bucketing
                audio_refs.append(ref)
                new_items.append({"type": "audio_url", "audio_url": {"url": ref}})
            elif it["type"] == "text":
                if not isinstance(it.get("text"), str):
                    raise _Skip("bad_format", "text item without text", record_id)
                text_chars += len(it["text"])
                new_items.append(it)
            else:
                raise _Skip("bad_format", f"unknown content type {it['type']!r}", record_id)
        resolved_messages.append({"role": m["role"], "content": new_items})
    if resolved_messages[-1]["role"] != "assistant":
        raise _Skip("no_target", "the last message is not an assistant turn", record_id)
    if not text_of(resolved_messages[-1]["content"]).strip():
        raise _Skip("empty_target", "the assistant turn is empty", record_id)
    answer = obj.get("answer")
    length = int(math.ceil(audio_samples / SAMPLES_PER_TOKEN)) + text_chars // 3 + 8 * len(messages)
    return Record(
        id=record_id,
        task=str(obj.get("task") or "unknown"),
        messages=resolved_messages,
        answer=None if answer is None else str(answer),
        meta=obj.get("meta") if isinstance(obj.get("meta"), dict) else {},
        audio=audio_refs,
        length=length,
    )


class _Skip(Exception):
    def __init__(self, reason: str, detail: str, record_id: str = ""):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail, self.record_id = reason, detail, record_id


def read_manifest(path: str, skips: SkipCounter | None = None, check_audio: bool = True,
                  source: int = 0) -> list[Record]:
    """Read and validate a JSONL manifest. Bad lines are counted in `skips` and left out."""
    skips = skips if skips is not None else SkipCounter()
    base_dir = os.path.dirname(os.path.abspath(path))
    stem = os.path.basename(path)
    records = []
    with open(path, encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, 1):
            if not line.strip():
                continue
            fallback_id = f"{stem}:{line_no}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                skips.add("invalid_json", fallback_id, str(exc))
                continue
            try:
                rec = parse_record(obj, base_dir, fallback_id, check_audio=check_audio)
            except _Skip as skip:
                skips.add(skip.reason, skip.record_id or fallback_id, skip.detail)
                continue
            rec.source = source
            records.append(rec)
    return records


class ConversationDataset(torch.utils.data.Dataset):
    """Records from one or more manifests; audio is decoded only when an item is fetched.

    An item is a dict {id, task, answer, messages} whose audio items carry the decoded waveform as
    `{"type": "audio", "audio": (array, 16000)}` (the processor's in-memory form), or a `BadSample` when the audio
    fails to decode.
    """

    def __init__(self, records: Sequence[Record], load_audio=load_clip):
        self.records = list(records)
        self._load_audio = load_audio

    def __len__(self) -> int:
        return len(self.records)

    @property
    def lengths(self) -> list[int]:
        return [r.length for r in self.records]

    @property
    def sources(self) -> list[int]:
        return [r.source for r in self.records]

    def __getitem__(self, index: int):
        rec = self.records[index]
        messages = []
        for m in rec.messages:
            items = []
            for it in m["content"]:
                if it["type"] == "audio_url":
                    ref = it["audio_url"]["url"]
                    try:
                        wave = self._load_audio(ref)
                    except Exception as exc:  # any decoder failure makes this one sample unusable, not the run
                        return BadSample(rec.id, "unreadable_audio", f"{ref}: {exc}")
                    if wave is None or len(wave) == 0:
                        return BadSample(rec.id, "empty_audio", ref)
                    items.append({"type": "audio", "audio": (np.asarray(wave, np.float32), SAMPLE_RATE)})
                else:
                    items.append(it)
            messages.append({"role": m["role"], "content": items})
        return {"id": rec.id, "task": rec.task, "answer": rec.answer, "messages": messages}


def load_sources(paths: Sequence[str], check_audio: bool = True) -> tuple[ConversationDataset, SkipCounter]:
    skips = SkipCounter()
    records: list[Record] = []
    for i, p in enumerate(paths):
        records.extend(read_manifest(p, skips, check_audio=check_audio, source=i))
    return ConversationDataset(records), skips


def mixture_counts(source_sizes: Sequence[int], ratios: Sequence[float], total: int) -> list[int]:
    """Samples per source for one epoch of `total` samples, proportional to `ratios` (largest remainder rounding)."""
    if len(source_sizes) != len(ratios):
        raise ValueError("one ratio per source")
    active = [r if n > 0 else 0.0 for n, r in zip(source_sizes, ratios)]
    s = sum(active)
    if s <= 0:
        raise ValueError("no source has any usable record")
    exact = [total * r / s for r in active]
    counts = [int(math.floor(x)) for x in exact]
    by_remainder = sorted(range(len(exact)), key=lambda i: exact[i] - counts[i], reverse=True)
    for i in by_remainder[: total - sum(counts)]:
        counts[i] += 1
    return counts


class BucketBatchSampler(torch.utils.data.Sampler):
    """Length-bucketed, ratio-mixed, distributed batch sampler that can resume mid-epoch.

    Per epoch (deterministic in `seed` and the epoch): draw `mixture_counts` indices from each source (cycling
    through shuffled passes when a source is smaller than its share), shuffle, cut into chunks of `bucket_batches`
    global micro-batches, sort each chunk by length, cut it into global micro-batches of
    `micro_batch_size * world_size` samples, shuffle the batches. Rank r takes slice r of every global micro-batch,
    so N processes with micro-batch B see exactly the samples one process with micro-batch N*B sees.
    Incomplete global batches are dropped so every rank runs the same number of steps.
    """

    def __init__(self, lengths: Sequence[int], sources: Sequence[int], micro_batch_size: int,
                 ratios: Sequence[float] | None = None, samples_per_epoch: int | None = None,
                 bucket_batches: int = 50, rank: int = 0, world_size: int = 1, seed: int = 0):
        self.lengths = list(lengths)
        self.sources = list(sources)
        n_sources = (max(self.sources) + 1) if self.sources else 1
        self.ratios = list(ratios) if ratios is not None else [1.0] * n_sources
        if len(self.ratios) < n_sources:
            raise ValueError(f"{n_sources} sources but {len(self.ratios)} ratios")
        self.by_source = [[i for i, s in enumerate(self.sources) if s == k] for k in range(len(self.ratios))]
        self.micro_batch_size = micro_batch_size
        self.world_size = world_size
        self.rank = rank
        self.global_batch = micro_batch_size * world_size
        self.samples_per_epoch = samples_per_epoch or len(self.lengths)
        self.bucket_batches = max(1, bucket_batches)
        self.seed = seed
        self.epoch = 0
        self.start_batch = 0  # batches of the current epoch already consumed (resume)
        if self.samples_per_epoch < self.global_batch:
            raise ValueError(f"{self.samples_per_epoch} samples per epoch is less than one global batch "
                             f"({micro_batch_size} x {world_size} processes)")

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def epoch_indices(self, epoch: int) -> list[int]:
        rng = random.Random(f"{self.seed}-{epoch}-mix")
        counts = mixture_counts([len(b) for b in self.by_source], self.ratios, self.samples_per_epoch)
        drawn: list[int] = []
        for pool, n in zip(self.by_source, counts):
            # Successive shuffled passes: a small source repeats only after all its records were used.
            passes = []
            while len(passes) < n:
                p = list(pool)
                rng.shuffle(p)
                passes.extend(p)
            drawn.extend(passes[:n])
        rng.shuffle(drawn)
        return drawn

    def global_batches(self, epoch: int) -> list[list[int]]:
        rng = random.Random(f"{self.seed}-{epoch}-bucket")
        drawn = self.epoch_indices(epoch)
        chunk = self.global_batch * self.bucket_batches
        batches = []
        for start in range(0, len(drawn), chunk):
            part = sorted(drawn[start:start + chunk], key=lambda i: self.lengths[i])
            for b in range(0, len(part) - self.global_batch + 1, self.global_batch):
                batches.append(part[b:b + self.global_batch])
        rng.shuffle(batches)
        return batches

    def __len__(self) -> int:
        return self.samples_per_epoch // self.global_batch

    def __iter__(self) -> Iterator[list[int]]:
        batches = self.global_batches(self.epoch)
        lo, hi = self.rank * self.micro_batch_size, (self.rank + 1) * self.micro_batch_size
        for batch in batches[self.start_batch:]:
            yield batch[lo:hi]


class ConversationCollator:
    """Turns dataset items into a model batch with `labels`.

    Labels equal `input_ids` on the assistant tokens (the processor's `assistant_mask`: the assistant's content and
    its closing `<|im_end|>`) and -100 everywhere else (system/user text, audio pads, padding). With
    `loss_on="text"` every attended text token is a target instead (pretraining-style data). Samples that fail
    (`BadSample`, or the processor rejecting one conversation) are dropped and listed in `batch["skipped"]` as
    (id, reason, detail) so the main process can count them whatever worker loaded them.
    """

    def __init__(self, processor, loss_on: str = "assistant"):
        if loss_on not in ("assistant", "text"):
            raise ValueError(f"loss_on must be 'assistant' or 'text', got {loss_on!r}")
        self.processor = processor
        self.loss_on = loss_on

    def _encode(self, items: list[dict]):
        return self.processor([it["messages"] for it in items], return_tensors="pt",
                              add_generation_prompt=False, return_assistant_mask=True)

    def __call__(self, items: list) -> dict:
        skipped = [(b.id, b.reason, b.detail) for b in items if isinstance(b, BadSample)]
        good = [it for it in items if not isinstance(it, BadSample)]
        enc = None
        if good:
            try:
                enc = self._encode(good)
            except Exception:  # find the conversation(s) the processor rejects, keep the rest
                kept = []
                for it in good:
                    try:
                        self._encode([it])
                        kept.append(it)
                    except Exception as exc:
                        skipped.append((it["id"], "processor_error", f"{type(exc).__name__}: {exc}"))
                good = kept
                enc = self._encode(good) if good else None
        if enc is None:
            return {"empty": True, "skipped": skipped, "ids": [], "tasks": []}
        batch = dict(enc)
        input_ids = batch["input_ids"]
        attention = batch["attention_mask"].bool()
        if self.loss_on == "assistant":
            target = batch.pop("assistant_mask").bool() & attention
        else:
            batch.pop("assistant_mask", None)
            target = attention.clone()
            if "token_type_ids" in batch:
                target &= batch["token_type_ids"] == 0
        batch["labels"] = torch.where(target, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
        batch["ids"] = [it["id"] for it in good]
        batch["tasks"] = [it["task"] for it in good]
        batch["skipped"] = skipped
        batch["empty"] = False
        return batch


MODEL_INPUT_KEYS = ("input_ids", "attention_mask", "token_type_ids", "input_features", "audio_token_counts",
                    "windows_per_request")


def count_targets(labels: torch.Tensor) -> int:
    """Tokens that contribute to the next-token loss: labels shift left by one, so position 0 is never a target."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())
