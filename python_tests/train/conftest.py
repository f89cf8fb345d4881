"""Fixtures for the training tests (helpers live in train_helpers.py)."""
from __future__ import annotations

import pytest

from train_helpers import WORDS, asr_record, write_clip, write_manifest


@pytest.fixture(scope="session")
def clip_dir(tmp_path_factory):
    """12 clips of 0.3-2.5 s (distinct tones) with relative paths, reused by every test."""
    d = tmp_path_factory.mktemp("clips")
    for i in range(12):
        write_clip(str(d / f"c{i}.wav"), 0.3 + 0.2 * i, 200 + 50 * i)
    return d


@pytest.fixture(scope="session")
def train_manifest(clip_dir):
    records = [asr_record(f"r{i}", f"c{i}.wav", " ".join(WORDS[(i + j) % 10] for j in range(1 + i % 4)))
               for i in range(12)]
    return write_manifest(str(clip_dir / "train.jsonl"), records)


@pytest.fixture(scope="session")
def processor():
    from eureka_fast.models import EurekaAudioProcessor

    return EurekaAudioProcessor.preset("tiny")


