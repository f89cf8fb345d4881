"""load_audio: formats, layouts, resampling quality and the AudioError cases."""

import base64
import os
import shutil
import subprocess

import numpy as np
import pytest
import soundfile as sf
import torch

from eureka_fast.audio import AudioError, load_audio

SR = 16000


def tone(freq, seconds=0.5, sr=SR, amplitude=0.5):
    t = np.arange(int(seconds * sr)) / sr
    return (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.float32)


@pytest.mark.parametrize("subtype, tolerance", [
    ("PCM_U8", 1.0 / 128), ("PCM_16", 1.0 / 32768), ("PCM_24", 1.0 / 2 ** 23), ("PCM_32", 1.0 / 2 ** 31),
    ("FLOAT", 0.0), ("DOUBLE", 0.0),
])
def test_wav_subtypes_round_trip(tmp_path, subtype, tolerance):
    signal = tone(440)
    path = tmp_path / ("x_%s.wav" % subtype)
    sf.write(path, signal, SR, subtype=subtype)
    assert sf.info(path).subtype == subtype
    loaded = load_audio(path)
    assert loaded.dtype == np.float32 and loaded.shape == signal.shape
    np.testing.assert_allclose(loaded, signal, atol=tolerance + 1e-7)


def test_flac_is_lossless(tmp_path):
    signal = tone(300)
    sf.write(tmp_path / "x.flac", signal, SR, subtype="PCM_16")
    np.testing.assert_allclose(load_audio(str(tmp_path / "x.flac")), signal, atol=1.0 / 32768 + 1e-7)


@pytest.mark.parametrize("fmt", ["ogg", "mp3"])
def test_lossy_formats_decode_the_tone(tmp_path, fmt):
    signal = tone(440, seconds=1.0)
    path = tmp_path / ("x." + fmt)
    sf.write(path, signal, SR)
    loaded = load_audio(path)
    # Lossy codecs add encoder delay/padding: check the length roughly and that it is the same 440 Hz tone.
    assert abs(len(loaded) - len(signal)) < 0.1 * SR
    spectrum = np.abs(np.fft.rfft(loaded[2000:14000]))
    peak_hz = np.argmax(spectrum) * SR / 12000
    assert abs(peak_hz - 440) < 3
    assert 0.3 < np.sqrt(np.mean(loaded[2000:14000] ** 2)) / np.sqrt(np.mean(signal ** 2)) < 1.2


def test_stereo_is_averaged_and_channels_layouts(tmp_path):
    left, right = tone(440), tone(660, amplitude=0.25)
    sf.write(tmp_path / "s.wav", np.stack([left, right], axis=1), SR, subtype="FLOAT")
    expected = (left + right) / 2
    np.testing.assert_allclose(load_audio(tmp_path / "s.wav"), expected, atol=1e-6)
    np.testing.assert_allclose(load_audio((np.stack([left, right], 1), SR)), expected, atol=1e-6)  # [T, C]
    np.testing.assert_allclose(load_audio((np.stack([left, right], 0), SR)), expected, atol=1e-6)  # [C, T]
    np.testing.assert_allclose(load_audio((torch.from_numpy(np.stack([left, right])), SR)), expected, atol=1e-6)


def test_resampling_is_band_limited():
    rate = 48000
    seconds = 1.0
    t = np.arange(int(rate * seconds)) / rate
    in_band = 0.4 * np.sin(2 * np.pi * 7000 * t)
    above_nyquist = 0.4 * np.sin(2 * np.pi * 10000 * t)  # naive decimation would fold this onto 6 kHz
    out = load_audio(((in_band + above_nyquist).astype(np.float32), rate))
    assert len(out) == SR
    t16 = np.arange(SR) / SR
    expected = 0.4 * np.sin(2 * np.pi * 7000 * t16)
    middle = slice(800, SR - 800)  # away from the filter's edge transients
    assert np.max(np.abs(out[middle] - expected[middle])) < 2e-3
    spectrum = np.abs(np.fft.rfft(out[middle])) / (len(out[middle]) / 2)
    freqs = np.fft.rfftfreq(len(out[middle]), 1 / SR)
    assert spectrum[np.abs(freqs - 6000) < 20].max() < 1e-3


def test_resampling_from_file_44100(tmp_path):
    rate = 44100
    t = np.arange(rate) / rate
    sf.write(tmp_path / "x.wav", (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), rate, subtype="FLOAT")
    out = load_audio(tmp_path / "x.wav")
    assert len(out) == SR
    expected = 0.5 * np.sin(2 * np.pi * 440 * np.arange(SR) / SR)
    assert np.max(np.abs(out[800:-800] - expected[800:-800])) < 1e-3


def test_bytes_data_uri_and_arrays(tmp_path):
    signal = tone(500)
    sf.write(tmp_path / "x.wav", signal, SR, subtype="PCM_16")
    raw = (tmp_path / "x.wav").read_bytes()
    reference = load_audio(tmp_path / "x.wav")
    np.testing.assert_array_equal(load_audio(raw), reference)
    np.testing.assert_array_equal(load_audio(bytearray(raw)), reference)
    uri = "data:audio/wav;base64," + base64.b64encode(raw).decode()
    np.testing.assert_array_equal(load_audio(uri), reference)
    pcm16 = np.round(signal * 32767).astype(np.int16)
    np.testing.assert_allclose(load_audio((pcm16, SR)), pcm16 / 32768.0, atol=1e-7)
    np.testing.assert_array_equal(load_audio(signal), signal)  # a bare array is already at 16 kHz


@pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="ffmpeg not installed")
def test_ffmpeg_fallback_for_formats_libsndfile_cannot_read(tmp_path):
    sf.write(tmp_path / "x.wav", tone(440, seconds=1.0), SR, subtype="PCM_16")
    subprocess.run(["ffmpeg", "-nostdin", "-loglevel", "error", "-i", str(tmp_path / "x.wav"), "-c:a", "aac",
                    str(tmp_path / "x.m4a")], check=True)
    out = load_audio(tmp_path / "x.m4a")
    assert abs(len(out) - SR) < 0.1 * SR
    assert abs(np.argmax(np.abs(np.fft.rfft(out[2000:14000]))) * SR / 12000 - 440) < 3


def _expect_error(source, *fragments):
    with pytest.raises(AudioError) as info:
        load_audio(source)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, message
    return message


def test_errors_name_the_file_and_the_problem(tmp_path):
    missing = str(tmp_path / "missing.wav")
    _expect_error(missing, "missing.wav", "not found")
    (tmp_path / "empty.wav").write_bytes(b"")
    _expect_error(tmp_path / "empty.wav", "empty.wav", "empty")
    (tmp_path / "text.wav").write_text("this is not audio at all " * 20)
    _expect_error(tmp_path / "text.wav", "text.wav", "not a readable audio file")
    _expect_error(str(tmp_path), "directory")

    sf.write(tmp_path / "full.wav", tone(440), SR, subtype="PCM_16")
    raw = (tmp_path / "full.wav").read_bytes()
    (tmp_path / "cut.wav").write_bytes(raw[: len(raw) // 2])
    _expect_error(tmp_path / "cut.wav", "cut.wav", "truncated")
    (tmp_path / "header_only.wav").write_bytes(raw[:44])
    _expect_error(tmp_path / "header_only.wav", "header_only.wav")  # declares samples it lacks

    sf.write(tmp_path / "zero.wav", np.zeros(0, np.float32), SR, subtype="PCM_16")
    _expect_error(tmp_path / "zero.wav", "zero.wav", "zero samples")

    bad = tone(440)
    bad[100] = np.nan
    sf.write(tmp_path / "nan.wav", bad, SR, subtype="FLOAT")
    _expect_error(tmp_path / "nan.wav", "nan.wav", "NaN")

    sf.write(tmp_path / "slow.wav", tone(10, sr=200), 200, subtype="PCM_16")
    _expect_error(tmp_path / "slow.wav", "slow.wav", "sample rate")

    sf.write(tmp_path / "x.flac", tone(440, seconds=2.0), SR)
    flac = (tmp_path / "x.flac").read_bytes()
    (tmp_path / "cut.flac").write_bytes(flac[: len(flac) // 2])
    _expect_error(tmp_path / "cut.flac", "cut.flac")


def test_array_and_inline_errors():
    _expect_error((np.array([0.0, np.inf], np.float32), SR), "<array>", "infinite")
    _expect_error((np.zeros(0, np.float32), SR), "zero samples")
    _expect_error((tone(440), 5), "sample rate")
    _expect_error((tone(440), 16000.5), "sample rate")
    _expect_error((np.zeros((3, 4, 5), np.float32), SR), "shape")
    _expect_error(b"", "empty")
    _expect_error(b"RIFF\x00\x00", "not a readable audio file")
    _expect_error("data:audio/wav;base64", "malformed")
    _expect_error("data:audio/wav;base64,!!!!", "data URI")
    _expect_error("https://example.com/a.wav", "URL")
    _expect_error(12345, "unsupported")
