"""WhisperModel.transcribe's speed options: window="trimmed" and compute_type="int8".

The default (full 30 s windows, float32) stays exact; the options are checked for what they promise: trimmed windows
batched equal trimmed windows alone, the trimmed log-mel is the full one's prefix, the int8 projections track the
float32 ones, and the transcripts of real sentences stay within a stated word error rate of the full-window float32
ones and of the known text."""

import shutil
import subprocess

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from eureka_fast.models.whisper import int8_linears, load_whisper_model, trimmed_frames
from eureka_fast.models.whisper.decoding import _trimmed_log_mel
from eureka_fast.models.whisper.encoder import int8_linear
from whisper_helpers import needs_espeak, needs_tiny

# Ordinary English (the transcripts are judged against this text), several voices and speeds, 2-7 s each.
SENTENCES = [
    ("Please call Stella and ask her to bring these things with her from the store.", "en", 160),
    ("The children walked slowly across the old bridge before the evening train arrived.", "en-us", 150),
    ("My brother bought a small green car last summer.", "en+f3", 170),
    ("It is going to rain this afternoon, so take your umbrella.", "en-us+m3", 150),
    ("We had coffee and bread in the kitchen.", "en+f2", 140),
    ("The doctor wrote a long letter to the hospital.", "en", 175),
]


@pytest.fixture(scope="module")
def tiny_model():
    return load_whisper_model("tiny.en")


@pytest.fixture(scope="module")
def sentences(tmp_path_factory):
    from eureka_fast.audio import load_audio

    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng not installed")
    directory = tmp_path_factory.mktemp("tts")
    clips = []
    for index, (text, voice, speed) in enumerate(SENTENCES):
        path = directory / ("s%d.wav" % index)
        subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "-w", str(path), text], check=True,
                       capture_output=True)
        clips.append(load_audio(str(path)))
    return clips, [text for text, _, _ in SENTENCES]


def pooled_wer(references, hypotheses):
    from eureka_fast.dataflux.asr import word_error_rate

    edits = words = 0
    for reference, hypothesis in zip(references, hypotheses):
        e, n = word_error_rate(reference, hypothesis)
        edits, words = edits + e, words + n
    return edits / words


def test_trimmed_frames():
    # the audio's frames plus 3 s of padding, in whole seconds, at most the 30 s window
    assert trimmed_frames(1) == 400
    assert trimmed_frames(16000 * 3) == 600
    assert trimmed_frames(16000 * 3 + 1) == 700
    assert trimmed_frames(16000 * 5 - 160 * 30) == 800  # 470 frames + 300 -> 800
    assert trimmed_frames(16000 * 27) == 3000
    assert trimmed_frames(16000 * 30) == 3000
    for samples in (1, 999, 16000, 47999, 96001, 16000 * 26):
        frames = trimmed_frames(samples)
        assert frames % 100 == 0 and frames * 160 >= samples + 48000 and frames - 100 < -(-samples // 160) + 300


@pytest.mark.parametrize("seconds", [0.3, 3.0, 4.77, 12.5, 29.0])
def test_trimmed_log_mel_is_the_full_windows_prefix(seconds):
    from eureka_fast.audio import log_mel

    rng = np.random.default_rng(int(seconds * 100))
    audio = (rng.standard_normal(int(seconds * 16000)) * 0.1).astype(np.float32)
    frames = trimmed_frames(len(audio))
    full = log_mel(audio, 80, mode="whisper")
    trimmed = _trimmed_log_mel(audio, 80, frames)
    assert trimmed.shape == (80, frames)
    torch.testing.assert_close(trimmed, full[:, :frames], atol=1e-5, rtol=0)
    if frames < 3000:  # what was cut is Whisper's padding: one value, the clamp floor
        assert torch.all(full[:, frames:] == full[:, -1:])


def test_int8_linear_tracks_float32_and_follows_weight_updates():
    generator = torch.Generator().manual_seed(0)
    layer = torch.nn.Linear(384, 1536)
    x = torch.randn(40, 384, generator=generator)
    with torch.no_grad():
        expected = F.linear(x, layer.weight, layer.bias)
        got = int8_linear(layer, "w", x, layer.weight, layer.bias)
        assert got.shape == expected.shape and got.dtype == torch.float32
        # 8-bit weights and 7-bit activations: about 2% of the output's scale for Gaussian inputs
        assert (got - expected).norm() / expected.norm() < 0.04
        assert not torch.equal(got, expected)  # it is really quantised
        layer.weight.mul_(2.0)  # an in-place update must re-quantise, not reuse the cached weights
        again = int8_linear(layer, "w", x, layer.weight, layer.bias)
        expected = F.linear(x, layer.weight, layer.bias)
        assert (again - expected).norm() / expected.norm() < 0.04
        batched = int8_linear(layer, "w", x.view(4, 10, 384), layer.weight)
        assert batched.shape == (4, 10, 1536)
        # each row is quantised with its own scale: a row's result does not depend on the others in the call
        x[5] *= 50.0
        full = int8_linear(layer, "w", x, layer.weight)
        assert torch.equal(full[:5], int8_linear(layer, "w", x[:5], layer.weight))
        assert torch.equal(full[6:7], int8_linear(layer, "w", x[6:7], layer.weight))


@needs_tiny
def test_int8_encoder_and_decoder_track_float32(tiny_model):
    from eureka_fast.audio import log_mel

    audio = (np.random.default_rng(1).standard_normal(16000 * 4) * 0.05).astype(np.float32)
    mel = log_mel(audio, 80, mode="whisper")[None, :, :600]
    with torch.inference_mode():
        expected = tiny_model.encoder(mel)
        with int8_linears():
            got = tiny_model.encoder(mel)
        assert F.cosine_similarity(got.flatten(), expected.flatten(), dim=0) > 0.995
        assert not torch.equal(got, expected)
        assert torch.equal(tiny_model.encoder(mel), expected)  # outside the block: float32 again
        prompt = torch.tensor([tiny_model.tokenizer.prompt(multilingual=False)])
        reference_logits = tiny_model.decoder(prompt, tiny_model.decoder.new_cache(expected))
        with int8_linears():
            logits = tiny_model.decoder(prompt, tiny_model.decoder.new_cache(expected))
        assert F.cosine_similarity(logits.flatten(), reference_logits.flatten(), dim=0) > 0.99


@needs_tiny
@needs_espeak
def test_trimmed_windows_batched_equal_trimmed_windows_alone(tiny_model, sentences):
    clips, _ = sentences
    noise = (np.random.default_rng(0).standard_normal(16000 * 2) * 0.1).astype(np.float32)
    batch = [clips[2], noise, clips[0], clips[4]]
    frames = [trimmed_frames(len(c)) for c in batch]
    assert len(set(frames)) == 3  # rows of different lengths share a batch (masked encoder and cross-attention)
    # short fallbacks: the noise clip fails greedy and takes beam search and sampling on its trimmed window
    options = dict(max_new_tokens=24, beam_size=2, temperatures=(0.0, 0.5), best_of=2, window="trimmed")
    batched = tiny_model.decode_clips(batch, batch_size=4, **options)
    alone = [tiny_model.decode_windows(clip, **options) for clip in batch]
    for index, (got, expected) in enumerate(zip(batched, alone)):
        assert len(got) == len(expected) == 1
        assert got[0].tokens == expected[0].tokens, index
        assert (got[0].stop, got[0].attempts, got[0].temperature) == (
            expected[0].stop, expected[0].attempts, expected[0].temperature), index
        assert got[0].sum_logprob == pytest.approx(expected[0].sum_logprob, abs=1e-3), index
    assert batched[1][0].fell_back and not batched[0][0].fell_back
    # int8 too: each row is quantised on its own, so the batch does not change it
    texts = tiny_model.transcribe(batch[2:], batch_size=2, window="trimmed", compute_type="int8")
    assert texts == [tiny_model.transcribe(clip, window="trimmed", compute_type="int8") for clip in batch[2:]]


def test_trimmed_windows_of_a_long_clip():
    """A clip over 30 s: its full windows stay 3000 frames, only the last is trimmed."""
    from eureka_fast.audio import SAMPLES_PER_WINDOW

    samples = SAMPLES_PER_WINDOW * 2 + 16000 * 4
    pieces = [min(SAMPLES_PER_WINDOW, samples - start) for start in range(0, samples, SAMPLES_PER_WINDOW)]
    assert [trimmed_frames(n) for n in pieces] == [3000, 3000, 700]


@needs_tiny
@needs_espeak
def test_fast_modes_stay_within_a_stated_wer_on_sentences(tiny_model, sentences):
    """The bounds the docs state (docs/audio.md#transcription): on these sentences each mode's transcripts are
    within 15% WER of the full-window float32 ones and at most 5 points worse against the known text."""
    clips, texts = sentences
    full = tiny_model.transcribe(clips, batch_size=6)
    full_wer = pooled_wer(texts, full)
    assert full_wer < 0.15  # the reference itself transcribes these sentences
    for options in ({"window": "trimmed"}, {"compute_type": "int8"}, {"window": "trimmed", "compute_type": "int8"}):
        got = tiny_model.transcribe(clips, batch_size=6, **options)
        assert pooled_wer(full, got) <= 0.15, (options, got)
        assert pooled_wer(texts, got) <= full_wer + 0.05, (options, got)


@needs_tiny
@needs_espeak
def test_beam_first_pass_is_beam_search_on_each_window(tiny_model, sentences):
    """first_pass="beam": each window's first attempt is beam search on that window alone (batched or not), and a
    window that fails it goes on to sampling, never to beam search again."""
    from eureka_fast.models.whisper.decoding import LOGPROB_THRESHOLD

    clips, texts = sentences
    noise = (np.random.default_rng(1).standard_normal(16000 * 2) * 0.1).astype(np.float32)
    batch = [clips[4], noise, clips[2]]
    options = dict(max_new_tokens=24, beam_size=3, temperatures=(0.0, 0.5), best_of=2, window="trimmed",
                   first_pass="beam")
    batched = tiny_model.decode_clips(batch, batch_size=3, **options)
    alone = [tiny_model.decode_windows(clip, **options) for clip in batch]
    prompt = tiny_model.tokenizer.prompt(tiny_model.dims.is_multilingual, "en", "transcribe")
    for index, (got, expected, clip) in enumerate(zip(batched, alone, batch)):
        assert got[0].tokens == expected[0].tokens, index
        with torch.inference_mode():
            features, _ = tiny_model._encode_windows([clip], tiny_model.dims.n_mels, "trimmed")
            beam_try = tiny_model._window_result(*tiny_model.beam_search(features, prompt, 3, 24, repetition=(3, 16)),
                                                 0.0, 3)
        tests = {"compression_ratio_threshold": 2.4, "logprob_threshold": LOGPROB_THRESHOLD}
        if got[0].attempts == 1:  # passed on its first attempt: exactly the beam search
            assert got[0].tokens == beam_try.tokens and got[0].beam_size == 3, index
            assert not tiny_model._failed(beam_try, tests), index
        else:  # the beam search failed the quality tests; the one retry was sampled, not another beam search
            assert tiny_model._failed(beam_try, tests), index
            assert got[0].attempts == 2, index
    assert batched[0][0].attempts == 1 and batched[2][0].attempts == 1
    # real speech: the beam-first transcripts are as good as the greedy ones
    greedy = tiny_model.transcribe([clips[4], clips[2]], window="trimmed")
    beam = [" ".join(w.text for w in windows) for windows in batched[::2]]
    expected = [texts[4], texts[2]]
    assert pooled_wer(expected, beam) <= pooled_wer(expected, greedy) + 0.05, beam


@needs_tiny
@pytest.mark.parametrize("option, value", [("window", "half"), ("window", None), ("compute_type", "int16"),
                                           ("compute_type", "fp32"), ("first_pass", "sampled")])
def test_bad_mode_is_a_clear_error(tiny_model, option, value):
    clip = np.zeros(16000, np.float32)
    for audio in (clip, [clip]):
        with pytest.raises(ValueError, match="%s must be one of" % option):
            tiny_model.transcribe(audio, **{option: value})
