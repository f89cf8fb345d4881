"""load_audio: formats, layouts, resampling quality and the AudioError cases."""

import base64
import os
import re
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
    _expect_error(tmp_path / "text.wav", "text.wav", "not a decodable audio file")
    _expect_error(str(tmp_path), "directory")

    sf.write(tmp_path / "full.wav", tone(440), SR, subtype="PCM_16")
    raw = (tmp_path / "full.wav").read_bytes()
    (tmp_path / "cut.wav").write_bytes(raw[: len(raw) // 2])
    _expect_error(tmp_path / "cut.wav", "cut.wav", "truncated", "expected %d samples" % len(tone(440)))
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
    _expect_error(b"RIFF\x00\x00", "not a decodable audio file")
    _expect_error("data:audio/wav;base64", "malformed")
    _expect_error("data:audio/wav;base64,!!!!", "data URI", "invalid base64")
    _expect_error("https://example.com/a.wav", "URL")
    _expect_error(12345, "unsupported")


# ---------------------------------------------------------------------------------------------------------------------
# Truncated compressed files: the container states the length, the decode must reach it.


def _encode(tmp_path, signal, rate, kind):
    """Write `signal` as `kind`; returns the path, or skips when no encoder for it is available here."""
    if kind in ("flac", "ogg-vorbis", "ogg-opus", "mp3-libsndfile"):
        fmt, subtype, ext = {"flac": ("FLAC", None, "flac"), "ogg-vorbis": ("OGG", "VORBIS", "ogg"),
                             "ogg-opus": ("OGG", "OPUS", "ogg"), "mp3-libsndfile": ("MP3", None, "mp3")}[kind]
        path = tmp_path / ("%s.%s" % (kind, ext))
        try:
            sf.write(path, signal, rate, format=fmt, subtype=subtype)
        except (sf.LibsndfileError, TypeError, ValueError) as exc:
            pytest.skip("libsndfile cannot write %s here: %s" % (kind, exc))
        return path
    if shutil.which("ffmpeg") is None:
        pytest.skip("ffmpeg not installed")
    sf.write(tmp_path / "source.wav", signal, rate, subtype="FLOAT")
    options = {"mp3-ffmpeg-cbr": ["-c:a", "libmp3lame", "-b:a", "64k"],  # writes an "Info" header with LAME tag
               "mp3-ffmpeg-vbr": ["-c:a", "libmp3lame", "-q:a", "4"],  # "Xing" header
               "mp3-no-xing": ["-c:a", "libmp3lame", "-b:a", "64k", "-write_xing", "0"]}[kind]
    path = tmp_path / (kind + ".mp3")
    subprocess.run(["ffmpeg", "-nostdin", "-loglevel", "error", "-y", "-i", str(tmp_path / "source.wav")] + options
                   + [str(path)], check=True)
    return path


TRUNCATION_KINDS = ["flac", "ogg-vorbis", "ogg-opus", "mp3-libsndfile", "mp3-ffmpeg-cbr", "mp3-ffmpeg-vbr"]


@pytest.mark.parametrize("kind", TRUNCATION_KINDS)
def test_truncated_compressed_files_raise(tmp_path, kind, capfd):
    rate = 16000
    signal = tone(440, seconds=2.0, sr=rate)
    path = _encode(tmp_path, signal, rate, kind)
    raw = path.read_bytes()
    # The complete file is not flagged, and decodes to its full length (lossy codecs: within a frame).
    assert abs(len(load_audio(path)) - len(signal)) <= 1152
    for keep in (0.75, 0.4):
        cut = tmp_path / ("cut_%d_%s" % (keep * 100, path.name))
        cut.write_bytes(raw[: int(len(raw) * keep)])
        message = _expect_error(cut, cut.name, "truncated")
        with pytest.raises(AudioError, match="truncated"):
            load_audio(cut.read_bytes())  # the same from memory
        if kind.startswith("ogg"):
            continue  # Ogg states no total length before its last page: the cut page is reported instead
        assert "expected %d samples" % len(signal) in message, message
        got = int(re.search(r"got (\d+)", message).group(1))
        assert got < len(signal) - 1152, message
        if kind == "mp3-ffmpeg-cbr":  # constant bitrate: the samples left are proportional to the bytes left
            assert abs(got - len(signal) * keep) < 0.05 * len(signal), message
    # libmpg123's own warnings ("Xing stream size off by more than 1%") are not printed: the error says it.
    err = capfd.readouterr().err
    assert "Xing" not in err and "mpg123" not in err, err


def test_truncated_stereo_44100_flac_counts_samples_per_channel(tmp_path):
    rate = 44100
    stereo = np.stack([tone(440, seconds=1.0, sr=rate), tone(660, seconds=1.0, sr=rate)], axis=1)
    sf.write(tmp_path / "s.flac", stereo, rate)
    raw = (tmp_path / "s.flac").read_bytes()
    (tmp_path / "cut.flac").write_bytes(raw[: len(raw) // 2])
    _expect_error(tmp_path / "cut.flac", "cut.flac", "truncated", "expected %d samples" % rate, "44100 Hz")


def test_cbr_mp3_without_xing_header_states_no_length(tmp_path):
    # Documented limitation: a constant-bitrate MP3 without a Xing/Info header declares no length, so a cut one is
    # indistinguishable from a shorter recording and decodes to the frames present.
    signal = tone(440, seconds=2.0)
    path = _encode(tmp_path, signal, SR, "mp3-no-xing")
    raw = path.read_bytes()
    assert b"Xing" not in raw[:4096] and b"Info" not in raw[:4096]
    (tmp_path / "cut.mp3").write_bytes(raw[: len(raw) // 2])
    shortened = load_audio(tmp_path / "cut.mp3")
    assert 0.3 * len(signal) < len(shortened) < 0.7 * len(signal)


def test_ogg_without_end_of_stream_page_is_truncated(tmp_path):
    signal = tone(440, seconds=2.0)
    path = _encode(tmp_path, signal, SR, "ogg-vorbis")
    raw = bytearray(path.read_bytes())
    # Cut exactly at a page boundary: every page is whole, but the last one lacks the end-of-stream flag.
    last_page = raw.rfind(b"OggS")
    cut = raw[:last_page]
    (tmp_path / "cut.ogg").write_bytes(bytes(cut))
    _expect_error(tmp_path / "cut.ogg", "cut.ogg", "truncated", "end-of-stream")


# ---------------------------------------------------------------------------------------------------------------------
# Sample rates, messages


@pytest.mark.parametrize("rate, fragment", [
    (float("inf"), "not a finite number"), (float("-inf"), "not a finite number"), (float("nan"), "not a finite"),
    (0, "out of the supported range"), (-16000, "out of the supported range"), (1e12, "out of the supported range"),
    (16000.5, "not a whole number"), ("16000", "not a number"), (True, "not a number"),
    (np.array([16000, 8000]), "shape (2,)"), (None, "not a number"),
])
def test_bad_sample_rates_raise_audio_error(rate, fragment):
    _expect_error((tone(440), rate), "<array>", fragment)


@pytest.mark.parametrize("rate", [48000.0, np.float32(48000), np.int64(48000), torch.tensor(48000), np.array(48000)])
def test_integral_sample_rates_of_any_numeric_type_are_accepted(rate):
    signal = tone(440, sr=48000)
    np.testing.assert_array_equal(load_audio((signal, rate)), load_audio((signal, 48000)))
    assert len(load_audio((signal, rate))) == len(signal) // 3


def test_tuple_of_clips_is_not_taken_for_array_and_rate():
    message = _expect_error((tone(440), tone(660)), "(array, sample_rate)", "list")
    assert "shape (8000,)" in message, message
    _expect_error((tone(440), tone(660), tone(880)), "tuple of 3 items")


def test_undecodable_mp3_gives_one_short_message_and_no_decoder_noise(tmp_path, capfd):
    junk = np.random.default_rng(0).integers(0, 256, 3000, dtype=np.uint8).tobytes()
    (tmp_path / "junk.mp3").write_bytes(junk)
    message = _expect_error(tmp_path / "junk.mp3", "junk.mp3", "not a decodable audio file")
    assert "does not exist" not in message and len(message) < 300, message
    message = _expect_error(junk, "<bytes, 3000 bytes>", "not a decodable audio file")
    assert "BytesIO" not in message and "0x" not in message, message
    err = capfd.readouterr().err
    assert "Illegal Audio-MPEG-Header" not in err and "mpg123" not in err, err


def test_data_uri_base64_is_validated_and_may_be_wrapped(tmp_path):
    sf.write(tmp_path / "x.wav", tone(500), SR, subtype="PCM_16")
    raw = (tmp_path / "x.wav").read_bytes()
    encoded = base64.b64encode(raw).decode()
    wrapped = "\n".join(encoded[i:i + 76] for i in range(0, len(encoded), 76))  # MIME-style line breaks
    np.testing.assert_array_equal(load_audio("data:audio/wav;base64," + wrapped), load_audio(raw))
    _expect_error("data:audio/wav;base64,!!!@@@", "invalid base64 in data: URI")
    _expect_error("data:audio/wav;base64," + encoded[:-8] + "*" + encoded[-7:], "invalid base64")
    _expect_error("data:audio/wav;base64,", "empty")


def test_decoder_stderr_capture_passes_other_output_through(capfd):
    from eureka_fast.audio.io import _decoder_stderr_silenced

    with _decoder_stderr_silenced(True):
        os.write(2, b"Note: Illegal Audio-MPEG-Header 0x00000000 at offset 2996.\n")
        os.write(2, b"Warning: Xing stream size off by more than 1%\n")
        os.write(2, b"another library's message\n")
    err = capfd.readouterr().err
    assert "another library's message" in err
    assert "Illegal" not in err and "Xing" not in err
