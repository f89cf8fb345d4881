"""log_mel in both modes against openai-whisper, transformers and an independent numpy implementation."""

import os

import numpy as np
import pytest
import torch

from eureka_fast.audio import (AudioError, EurekaFeatures, FRAMES_PER_WINDOW, PAD_VALUE, SAMPLES_PER_TOKEN,
                               TOKENS_PER_WINDOW, audio_token_count, eureka_features_batch, load_audio, log_mel,
                               slaney_mel_filters)

whisper = pytest.importorskip("whisper")

SR = 16000


def speechlike(seconds, seed=0, gain=0.1):
    """Noise shaped by a slow envelope: broadband, with loud and quiet parts so the max clamp matters."""
    rng = np.random.default_rng(seed)
    n = int(seconds * SR)
    envelope = 0.05 + np.abs(np.sin(np.arange(n) / SR * 2 * np.pi * 1.3))
    return (gain * envelope * rng.standard_normal(n)).astype(np.float32)


def whisper_npz(n_mels):
    path = os.path.join(os.path.dirname(whisper.__file__), "assets", "mel_filters.npz")
    with np.load(path) as data:
        return data["mel_%d" % n_mels]


def numpy_official_front_end(audio, n_mels):
    """The front-end rules of docs/audio.md for ONE clip written with numpy only (independent of torch.stft)."""
    padded = np.pad(audio.astype(np.float64), (0, (-len(audio)) % SAMPLES_PER_TOKEN))
    framed_source = np.pad(padded, (200, 200), mode="reflect")
    n_frames = 1 + (len(framed_source) - 400) // 160
    frames = np.lib.stride_tricks.sliding_window_view(framed_source, 400)[::160][:n_frames]
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(400) / 400)  # periodic Hann
    power = np.abs(np.fft.rfft(frames * window, axis=1)) ** 2
    mel = whisper_npz(n_mels).astype(np.float64) @ power[:-1].T  # last frame dropped
    log_spec = np.log10(np.maximum(mel, 1e-10))
    log_spec = np.maximum(log_spec, log_spec.max() - 8.0)
    return (log_spec + 4.0) / 4.0


@pytest.mark.parametrize("n_mels", [80, 128])
def test_slaney_filters_equal_whisper_npz(n_mels):
    ours = slaney_mel_filters(n_mels)
    reference = whisper_npz(n_mels)
    assert ours.shape == reference.shape == (n_mels, 201)
    np.testing.assert_allclose(ours, reference, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("n_mels", [80, 128])
@pytest.mark.parametrize("seconds", [0.3, 7.0, 30.0, 37.5])
def test_whisper_mode_matches_openai_whisper(n_mels, seconds):
    audio = speechlike(seconds, seed=int(seconds * 10))
    ours = log_mel(audio, n_mels, mode="whisper")
    reference = whisper.log_mel_spectrogram(whisper.pad_or_trim(audio), n_mels=n_mels)
    assert ours.shape == (n_mels, FRAMES_PER_WINDOW)
    torch.testing.assert_close(ours, reference, atol=2e-6, rtol=0)


@pytest.mark.parametrize("n_mels", [80, 128])
def test_whisper_mode_matches_transformers_feature_extractor(n_mels):
    from transformers import WhisperFeatureExtractor

    audio = speechlike(11.3, seed=3)
    extractor = WhisperFeatureExtractor(feature_size=n_mels)
    reference = extractor(audio, sampling_rate=SR, return_tensors="np").input_features[0]
    np.testing.assert_allclose(log_mel(audio, n_mels, mode="whisper").numpy(), reference, atol=1e-5, rtol=0)


@pytest.mark.parametrize("samples, tokens", [(1, 1), (1279, 1), (1280, 1), (1281, 2), (16000, 13), (480000, 375)])
def test_1280_rule(samples, tokens):
    assert audio_token_count(samples) == tokens
    features = log_mel(speechlike(samples / SR, seed=samples), 80)
    assert isinstance(features, EurekaFeatures)
    assert features.token_counts == [tokens]
    assert features.num_frames == 8 * tokens
    assert features.windows.shape == (1, 80, FRAMES_PER_WINDOW)


@pytest.mark.parametrize("n_mels", [80, 128])
def test_eureka_clip_matches_numpy_and_whisper_on_padded_audio(n_mels):
    audio = speechlike(4.37, seed=11)
    features = log_mel(audio, n_mels)
    frames = features.num_frames
    ours = features.windows[0, :, :frames].double().numpy()
    np.testing.assert_allclose(ours, numpy_official_front_end(audio, n_mels), atol=5e-5, rtol=0)
    padded = np.pad(audio, (0, (-len(audio)) % SAMPLES_PER_TOKEN))
    reference = whisper.log_mel_spectrogram(padded, n_mels=n_mels).numpy()
    np.testing.assert_allclose(ours, reference, atol=2e-6, rtol=0)
    # The rest of the window is the pad constant, exactly.
    assert torch.all(features.windows[0, :, frames:] == PAD_VALUE)


def test_long_audio_gives_four_windows_and_drops_nothing():
    audio = speechlike(95.0, seed=5)
    features = log_mel(audio, 80)
    tokens = audio_token_count(len(audio))
    assert features.token_counts == [tokens] == [1188]
    assert features.windows.shape == (4, 80, FRAMES_PER_WINDOW)
    flat = features.windows.permute(1, 0, 2).reshape(80, -1)  # windows back to back in time
    padded = np.pad(audio, (0, (-len(audio)) % SAMPLES_PER_TOKEN))
    reference = whisper.log_mel_spectrogram(padded).numpy()
    assert reference.shape[1] == 8 * tokens
    np.testing.assert_allclose(flat[:, :8 * tokens].numpy(), reference, atol=2e-6, rtol=0)
    assert torch.all(flat[:, 8 * tokens:] == PAD_VALUE)
    assert 3 * TOKENS_PER_WINDOW < tokens <= 4 * TOKENS_PER_WINDOW


def test_clips_of_a_request_are_normalised_separately_then_concatenated():
    loud, quiet = speechlike(2.0, seed=1, gain=0.5), speechlike(1.01, seed=2, gain=0.001)
    features = log_mel([loud, quiet], 80)
    n_loud, n_quiet = audio_token_count(len(loud)), audio_token_count(len(quiet))
    assert features.token_counts == [n_loud, n_quiet]
    assert features.num_frames == 8 * (n_loud + n_quiet)
    flat = features.windows[0]
    np.testing.assert_allclose(flat[:, :8 * n_loud].numpy(), log_mel(loud, 80).windows[0, :, :8 * n_loud].numpy())
    quiet_alone = log_mel(quiet, 80).windows[0, :, :8 * n_quiet]
    np.testing.assert_allclose(flat[:, 8 * n_loud:8 * (n_loud + n_quiet)].numpy(), quiet_alone.numpy())
    # A joint clamp would have floored the quiet clip at the loud clip's max - 8 (normalised: max - 2); its own clamp
    # keeps the quiet clip's values below that floor.
    loud_floor = log_mel(loud, 80).windows[0, :, :8 * n_loud].max() - 2.0
    assert quiet_alone.min() < loud_floor - 0.5


def test_request_spanning_windows_concatenates_in_time():
    clips = [speechlike(20.0, seed=7), speechlike(15.0, seed=8)]
    features = log_mel(clips, 80)
    assert features.windows.shape[0] == 2
    flat = features.windows.permute(1, 0, 2).reshape(80, -1)
    first = 8 * features.token_counts[0]
    np.testing.assert_allclose(flat[:, first:features.num_frames].numpy(),
                               log_mel(clips[1], 80).windows[0, :, :features.num_frames - first].numpy())


def test_batch_of_requests():
    # the last request is exactly one window long (375 tokens = 3000 frames): no padding window after it
    requests = [[speechlike(3.0, seed=1)], [speechlike(31.0, seed=2), speechlike(0.5, seed=3)], [speechlike(1.0)],
                [speechlike(30.0, seed=4)]]
    windows, per_request, counts = eureka_features_batch(requests, 128)
    assert per_request == [1, 2, 1, 1]
    assert counts == [[38], [388, 7], [13], [375]]
    assert windows.shape == (5, 128, FRAMES_PER_WINDOW)
    start = 0
    for request, n in zip(requests, per_request):
        torch.testing.assert_close(windows[start:start + n], log_mel(request, 128).windows, atol=0, rtol=0)
        start += n
    # every frame past a request's own is the pad value, and none before it is
    assert torch.all(windows[0, :, 8 * 38:] == PAD_VALUE) and not torch.any(windows[0, :, :8 * 38] == PAD_VALUE)
    assert torch.all(windows[2, :, 8 * 395 - FRAMES_PER_WINDOW:] == PAD_VALUE)
    assert not torch.any(windows[4] == PAD_VALUE)


def test_paths_are_loaded(tmp_path):
    import soundfile as sf

    audio = speechlike(1.0)
    sf.write(tmp_path / "a.wav", audio, SR, subtype="FLOAT")
    torch.testing.assert_close(log_mel(str(tmp_path / "a.wav"), 80).windows, log_mel(audio, 80).windows)


def test_bad_arguments():
    with pytest.raises(ValueError, match="n_mels"):
        log_mel(speechlike(1.0), 64)
    with pytest.raises(ValueError, match="mode"):
        log_mel(speechlike(1.0), 80, mode="kaldi")
    with pytest.raises(ValueError, match="list"):
        log_mel([speechlike(1.0)], 80, mode="whisper")
    with pytest.raises(AudioError, match="zero samples"):
        log_mel(np.zeros(0, np.float32), 80)
    with pytest.raises(AudioError, match="no audio clips"):
        log_mel([], 80)
    with pytest.raises(AudioError, match="1-D"):
        log_mel(torch.zeros(2, 100), 80)
    with pytest.raises(AudioError, match="NaN"):
        log_mel(np.array([0.0, np.nan] * 1000, np.float32), 80)


def test_integer_pcm_is_scaled():
    audio = speechlike(1.0)
    pcm = np.round(audio * 32767).astype(np.int16)
    expected = log_mel(pcm.astype(np.float32) / 32768.0, 80).windows
    torch.testing.assert_close(log_mel(pcm, 80).windows, expected)
    torch.testing.assert_close(log_mel(torch.from_numpy(pcm), 80).windows, expected)


@pytest.mark.parametrize("samples, padded_to", [(1000, 1280), (1280, 1280), (201, 1280), (300, 480000), (999, 999)])
def test_padded_signal_equals_zero_pad_then_reflect_pad(samples, padded_to):
    from eureka_fast.audio.features import _padded_signal

    waveform = torch.randn(samples)
    zero_padded = torch.nn.functional.pad(waveform, (0, padded_to - samples))
    expected = torch.nn.functional.pad(zero_padded[None, None], (200, 200), mode="reflect")[0, 0]
    torch.testing.assert_close(_padded_signal(waveform, padded_to, 200), expected, atol=0, rtol=0)


def test_batch_accepts_array_rate_pairs_with_float_rates():
    clip = speechlike(1.5, seed=3)
    at_48k = clip  # taken to be recorded at 48 kHz below
    windows, per_request, counts = eureka_features_batch([(at_48k, 48000.0), [(at_48k, np.int64(48000))]])
    expected = log_mel(load_audio((at_48k, 48000)))
    assert per_request == [1, 1] and counts == [expected.token_counts, expected.token_counts]
    torch.testing.assert_close(windows[0], expected.windows[0], rtol=0, atol=0)
    torch.testing.assert_close(windows[1], expected.windows[0], rtol=0, atol=0)


def test_errors_say_which_clip_and_request():
    good = speechlike(1.0)
    bad = good.copy()
    bad[10] = np.nan
    with pytest.raises(AudioError, match=r"clips\[1\] \(of 2\).*NaN"):
        log_mel([good, bad])
    with pytest.raises(AudioError, match=r"requests\[1\] clips\[2\] \(of 3\).*sample rate"):
        eureka_features_batch([[good], [good, good, (good, 5)]])
    with pytest.raises(AudioError, match=r"requests\[0\] clips\[0\] \(of 1\).*zero samples"):
        eureka_features_batch([[np.zeros(0, np.float32)], [good]])
    with pytest.raises(AudioError, match=r"^<array>: clip contains NaN"):  # one clip: no index needed
        log_mel(bad)


def test_tuple_of_two_clips_explains_what_is_expected():
    a, b = speechlike(1.0), speechlike(0.5, seed=1)
    with pytest.raises(AudioError, match=r"\(array, sample_rate\).*second item is an array of shape \(8000,\).*list"):
        log_mel((a, b))
    assert log_mel([a, b]).token_counts == [13, 7]


def test_front_end_scratch_buffers_never_leak_into_results():
    # the padded signal, windowed frames and spectrum live in per-thread buffers reused by every call: results must
    # not alias them, calls in and out of inference mode must both work, and threads must not share them
    import threading

    clips = [speechlike(seconds, seed=seed) for seed, seconds in enumerate((30.0, 12.5, 30.0, 3.1))]
    expected = [log_mel(clip, 80, mode="whisper").clone() for clip in clips]
    first = log_mel(clips[0], 80, mode="whisper")
    log_mel(clips[1], 80, mode="whisper")
    torch.testing.assert_close(first, expected[0], atol=0, rtol=0)  # not overwritten by the next call
    with torch.inference_mode():
        torch.testing.assert_close(log_mel(clips[2], 80, mode="whisper"), expected[2], atol=0, rtol=0)
    torch.testing.assert_close(log_mel(clips[3], 80, mode="whisper"), expected[3], atol=0, rtol=0)
    results, errors = {}, []

    def work(i):
        try:
            for _ in range(5):
                results[i] = log_mel(clips[i], 80, mode="whisper")
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(clips))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for i, e in enumerate(expected):
        torch.testing.assert_close(results[i], e, atol=0, rtol=0)
