"""Bad audio through the loader, the captioner and DataFlux: mutated WAV / FLAC / Ogg / MP3 files (headers and bodies
cut, flipped, repeated, zeroed; wrong extensions; zero-length and one-sample files; a small FLAC that decodes to two
hours). Every file must end as a decoded clip or an AudioError, quickly, and never crash the process.

The default run pushes FUZZ_COUNT (>= 2,000) files through libsndfile, FFMPEG_COUNT of them through the ffmpeg
fallback too (a subprocess per file, so fewer), and every decoded clip through the captioner's signal analysis.
`-m slow` adds a larger run."""
from __future__ import annotations

import io
import os
import random
import shutil
import time

import numpy as np
import pytest
import soundfile as sf

from eureka_fast.audio import io as audio_io
from eureka_fast.audio.io import AudioError, AudioTooLongError, load_audio

FUZZ_COUNT = 2000
FFMPEG_COUNT = 120
PER_FILE_LIMIT_S = 5.0  # "a few seconds": nothing may take longer than this
MAX_S = 30.0  # the loader's max_duration in these tests


def seed_files() -> dict[str, bytes]:
    """Small valid files (0.25 s of a voiced-like tone plus noise) in each container the fuzz mutates."""
    rng = np.random.default_rng(0)
    t = np.arange(4000) / 16000
    x = (0.3 * np.sign(np.sin(2 * np.pi * 140 * t)) * np.exp(-3 * t) + 0.05 * rng.standard_normal(t.size))
    x = x.astype(np.float32)
    out = {}
    for name, fmt, subtype, rate in (("pcm16.wav", "WAV", "PCM_16", 16000), ("float.wav", "WAV", "FLOAT", 8000),
                                     ("a.flac", "FLAC", "PCM_16", 16000), ("a.ogg", "OGG", "VORBIS", 16000),
                                     ("a.mp3", "MP3", "MPEG_LAYER_III", 16000)):
        buf = io.BytesIO()
        data = x if rate == 16000 else x[::2]
        sf.write(buf, data, rate, format=fmt, subtype=subtype)
        out[name] = buf.getvalue()
    return out


def mutate(data: bytes, rng: random.Random) -> bytes:
    """One random corruption of an encoded file."""
    n = len(data)
    kind = rng.randrange(9)
    if kind == 0:  # cut anywhere, header included
        return data[: rng.randrange(n)]
    if kind == 1:  # cut inside the first 64 bytes (the header)
        return data[: rng.randrange(min(64, n))]
    if kind == 2:  # flip bytes in the header
        b = bytearray(data)
        for _ in range(rng.randint(1, 6)):
            b[rng.randrange(min(64, n))] ^= 1 << rng.randrange(8)
        return bytes(b)
    if kind == 3:  # flip bytes anywhere
        b = bytearray(data)
        for _ in range(rng.randint(1, 40)):
            b[rng.randrange(n)] = rng.randrange(256)
        return bytes(b)
    if kind == 4:  # repeat a chunk (duplicated pages / frames / a second header)
        i = rng.randrange(n)
        j = min(n, i + rng.randint(1, 2048))
        return data[:j] + data[i:j] * rng.randint(1, 4) + data[j:]
    if kind == 5:  # zero a region
        i = rng.randrange(n)
        return data[:i] + bytes(rng.randint(1, 512)) + data[i + 512:]
    if kind == 6:  # header glued onto garbage
        return data[:rng.randint(4, 64)] + bytes(rng.randrange(256) for _ in range(rng.randint(0, 3000)))
    if kind == 7:  # size fields stretched: every 32-bit little-endian value near the file size becomes huge
        b = bytearray(data)
        for pos in range(0, min(n - 4, 200)):
            v = int.from_bytes(b[pos:pos + 4], "little")
            if 0 < v and abs(v - n) < 64:
                b[pos:pos + 4] = rng.choice([0xFFFFFFFF, 0x7FFFFFFF, 0x10000000]).to_bytes(4, "little")
        return bytes(b)
    return bytes(rng.randrange(256) for _ in range(rng.randint(0, 200)))  # pure garbage


def special_files(seeds: dict[str, bytes]) -> list[tuple[str, bytes]]:
    """Edge cases that random mutation rarely hits."""
    one = io.BytesIO()
    sf.write(one, np.array([0.5], np.float32), 16000, format="WAV", subtype="PCM_16")
    one_flac = io.BytesIO()
    sf.write(one_flac, np.array([0.5], np.float32), 16000, format="FLAC", subtype="PCM_16")
    return [("empty.wav", b""), ("empty.mp3", b""), ("one-sample.wav", one.getvalue()),
            ("one-sample.flac", one_flac.getvalue()), ("header-only.wav", seeds["pcm16.wav"][:44]),
            ("wav-named.mp3", seeds["pcm16.wav"]), ("flac-named.ogg", seeds["a.flac"]),
            ("ogg-named.wav", seeds["a.ogg"]), ("mp3-named.flac", seeds["a.mp3"]),
            ("text.wav", b"this is not audio\n" * 10), ("nul.flac", bytes(4096))]


def fuzz_cases(count: int, seed: int = 1234) -> list[tuple[str, bytes]]:
    seeds = seed_files()
    rng = random.Random(seed)
    names = sorted(seeds)
    cases = special_files(seeds)
    exts = [".wav", ".flac", ".ogg", ".mp3"]
    while len(cases) < count:
        src = rng.choice(names)
        data = mutate(seeds[src], rng)
        ext = os.path.splitext(src)[1] if rng.random() < 0.8 else rng.choice(exts)  # 20%: wrong extension
        cases.append((f"m{len(cases):05d}-{src.replace('.', '_')}{ext}", data))
    return cases


def load_or_error(path: str):
    """-> ("ok", audio) or ("error", message); anything else escapes and fails the test."""
    t = time.perf_counter()
    try:
        audio = load_audio(path, max_duration=MAX_S)
        outcome = ("ok", audio)
    except AudioError as exc:
        assert str(exc), path
        outcome = ("error", str(exc))
    elapsed = time.perf_counter() - t
    assert elapsed < PER_FILE_LIMIT_S, (path, elapsed)
    if outcome[0] == "ok":
        a = outcome[1]
        assert a.dtype == np.float32 and a.ndim == 1 and 0 < a.size <= MAX_S * 16000 and np.isfinite(a).all(), path
    return outcome


def run_fuzz(tmp_path, cases, monkeypatch=None, no_ffmpeg=False):
    if no_ffmpeg and monkeypatch is not None:
        monkeypatch.setattr(audio_io, "ffmpeg_executable", lambda: None)
    results = []
    for name, data in cases:
        path = tmp_path / name
        path.write_bytes(data)
        results.append((name, *load_or_error(str(path))))
        path.unlink()
    return results


@pytest.fixture(scope="module")
def fuzz_results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fuzz")
    mp = pytest.MonkeyPatch()
    try:
        results = run_fuzz(tmp, fuzz_cases(FUZZ_COUNT), mp, no_ffmpeg=True)
    finally:
        mp.undo()
    return results


def test_every_mutated_file_decodes_or_raises_audio_error(fuzz_results):
    assert len(fuzz_results) >= 2000
    outcomes = {r[1] for r in fuzz_results}
    # the mutations really produce both outcomes (a fuzz that only ever errors tests nothing about decoding)
    assert outcomes == {"ok", "error"}
    errors = [r for r in fuzz_results if r[1] == "error"]
    assert len(errors) > 200 and sum(r[1] == "ok" for r in fuzz_results) > 200
    by_name = {r[0]: r for r in fuzz_results}
    assert by_name["empty.wav"][1] == "error" and "empty" in by_name["empty.wav"][2]
    assert by_name["one-sample.wav"][1] == "ok" and by_name["one-sample.wav"][2].size == 1
    assert by_name["wav-named.mp3"][1] == "ok"  # content, not the extension, decides the format
    assert by_name["text.wav"][1] == "error"


@pytest.mark.skipif(audio_io.ffmpeg_executable() is None, reason="no ffmpeg (system or imageio-ffmpeg wheel): the fallback decoder is not used")
def test_mutated_files_through_the_ffmpeg_fallback(tmp_path):
    # a different seed: these are files libsndfile may reject, which then go to ffmpeg
    results = run_fuzz(tmp_path, fuzz_cases(FFMPEG_COUNT, seed=99))
    assert {r[1] for r in results} == {"ok", "error"}


def test_decoded_fuzz_clips_through_the_captioner(fuzz_results):
    from eureka_fast.dataflux.captioner import analyse

    decoded = [(name, audio) for name, kind, audio in fuzz_results if kind == "ok"]
    # every distinct decoded clip (mutations often decode to the same samples)
    seen, distinct = set(), []
    for name, audio in decoded:
        key = (audio.size, float(np.round(audio[: 64].sum(), 4)), float(np.round(np.abs(audio).sum(), 3)))
        if key not in seen:
            seen.add(key)
            distinct.append((name, audio))
    assert len(distinct) >= 50
    for name, audio in distinct:
        t = time.perf_counter()
        facts = analyse(audio, "")
        assert time.perf_counter() - t < PER_FILE_LIMIT_S, name
        assert facts["duration_s"] == pytest.approx(audio.size / 16000, abs=1e-3)
        assert facts["gender"] in (None, "male", "female", "unknown"), name


@pytest.fixture(scope="module")
def two_hour_flac(tmp_path_factory):
    """180 KB of FLAC that decodes to two hours of digital silence at 8 kHz."""
    path = tmp_path_factory.mktemp("long") / "two-hours.flac"
    block = np.zeros(8000 * 600, dtype=np.int16)
    with sf.SoundFile(str(path), "w", 8000, 1, format="FLAC", subtype="PCM_16") as fh:
        for _ in range(12):
            fh.write(block)
    assert os.path.getsize(path) < 1_000_000
    return str(path)


def test_small_file_that_decodes_to_hours_stops_at_the_maximum_duration(two_hour_flac, tmp_path):
    t = time.perf_counter()
    with pytest.raises(AudioTooLongError, match="longer than the maximum duration of 30 s"):
        load_audio(two_hour_flac, max_duration=30)
    assert time.perf_counter() - t < 2.0
    # the same bytes under a name libsndfile does not claim, and as in-memory bytes
    with pytest.raises(AudioTooLongError):
        load_audio(open(two_hour_flac, "rb").read(), max_duration=30)
    if audio_io.ffmpeg_executable():
        t = time.perf_counter()
        out = audio_io._decode_with_ffmpeg(None, two_hour_flac, 16000, max_duration=30)
        assert out.size <= 30 * 16000 + 3 and time.perf_counter() - t < PER_FILE_LIMIT_S
    with pytest.raises(AudioError, match="max_duration"):
        load_audio(two_hour_flac, max_duration=0)
    # without a limit the loader still decodes long files (the limit is the caller's choice)
    short = tmp_path / "short.flac"
    sf.write(str(short), np.zeros(8000 * 40, np.float32), 8000)
    assert load_audio(str(short)).size == 40 * 16000
    with pytest.raises(AudioTooLongError):
        load_audio(str(short), max_duration=39.9)


def test_dataflux_rejects_bad_clips_with_reasons_and_goes_on(tmp_path, two_hour_flac):
    """A run over broken files, the two-hour file and one good clip: the broken ones land in rejected/ with their
    reason, the good clip is captioned, the run completes."""
    import json

    from eureka_fast.dataflux import audio_io as df_audio
    from eureka_fast.dataflux.runner import load_config, run_dataflux
    from eureka_fast.dataflux.store import RunStore

    audio_dir = tmp_path / "audio"
    audio_dir.mkdir()
    seeds = seed_files()
    (audio_dir / "empty.wav").write_bytes(b"")
    (audio_dir / "cut.flac").write_bytes(seeds["a.flac"][:30])
    (audio_dir / "garbage.mp3").write_bytes(b"\x00\xff" * 300)
    shutil.copy(two_hour_flac, audio_dir / "hours.flac")
    rng = np.random.default_rng(3)
    t = np.arange(32000) / 16000
    voiced = (0.3 * np.sin(2 * np.pi * 150 * t) * (np.sin(2 * np.pi * 3 * t) > 0) +
              0.01 * rng.standard_normal(t.size)).astype(np.float32)
    sf.write(str(audio_dir / "good.wav"), voiced, 16000)
    cfg = load_config(None, {"workers": 1, "shard_size": 10})
    cfg["roles"] = {r: {"asr": "none"} for r in ("captioner", "answerer_a", "answerer_b")}
    out = tmp_path / "out"
    t0 = time.perf_counter()
    run_dataflux(str(audio_dir), str(out), cfg, progress=False, log=lambda m: None)
    assert time.perf_counter() - t0 < 120
    store = RunStore(str(out))
    store.manifest = json.load(open(out / "manifest.json"))
    assert store.manifest["complete"]
    failed = {os.path.basename(r["audio"]): r for r in store.records("rejected") if r.get("stage") == "clip"}
    assert set(failed) == {"empty.wav", "cut.flac", "garbage.mp3", "hours.flac"}
    assert failed["hours.flac"]["reason"] == "audio_too_long"
    assert f"{df_audio.MAX_CLIP_SECONDS:g} s" in failed["hours.flac"]["detail"]
    assert failed["empty.wav"]["reason"] == "unreadable_audio" and "empty" in failed["empty.wav"]["detail"]
    assert all(r["detail"] for r in failed.values())
    captions = store.read_jsonl("captions.jsonl")
    assert [os.path.basename(c["audio"]) for c in captions] == ["good.wav"]
    stats = json.load(open(out / "stats.json"))
    assert stats["clips"]["failed_by_reason"] == {"unreadable_audio": 3, "audio_too_long": 1}


@pytest.mark.slow
def test_larger_fuzz_run(tmp_path, monkeypatch):
    results = run_fuzz(tmp_path, fuzz_cases(10000, seed=777), monkeypatch, no_ffmpeg=True)
    assert {r[1] for r in results} == {"ok", "error"}
