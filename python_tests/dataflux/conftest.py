"""Shared fixtures: espeak-ng labelled clips, written once per session."""
from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))  # for mock_openai

from eureka_fast.dataflux import synthetic  # noqa: E402

needs_espeak = pytest.mark.skipif(not synthetic.espeak_available(), reason="espeak-ng not installed")

# A compact labelled set: both genders, low/medium/high pitch, slow/normal/fast, clean and noisy.
SMALL_PLAN = [
    ("m1", 15, 135, None), ("m3", 60, 80, 10.0), ("m6", 92, 270, 30.0), ("m4", 60, 135, 5.0),
    ("f4", 15, 270, None), ("f3", 55, 135, 5.0), ("f5", 92, 80, 30.0), ("f4", 55, 270, 10.0),
]


@pytest.fixture(scope="session")
def small_clips(tmp_path_factory):
    if not synthetic.espeak_available():
        pytest.skip("espeak-ng not installed")
    clips = [synthetic.make_clip(i, v, p, s, snr) for i, (v, p, s, snr) in enumerate(SMALL_PLAN)]
    d = tmp_path_factory.mktemp("dataflux_small")
    paths = synthetic.write_clips(clips, d)
    return clips, paths, str(d)


@pytest.fixture(scope="session")
def tiny_audio_dir(tmp_path_factory, small_clips):
    """Three clips plus one unreadable file, for pipeline runs."""
    import shutil

    clips, paths, _ = small_clips
    d = tmp_path_factory.mktemp("dataflux_tiny")
    for c in clips[:3]:
        shutil.copy(paths[c.clip_id], d / os.path.basename(paths[c.clip_id]))
    (d / "zz-broken.wav").write_bytes(b"RIFF\x10\x00\x00\x00WAVEjunk")
    return str(d)
