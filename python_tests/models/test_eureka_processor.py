"""EurekaAudioProcessor: template, audio placeholders, token types, windows, masks, padding, sources, errors."""
import base64
import io
import math
import urllib.error

import numpy as np
import pytest
import soundfile as sf
import torch

from eureka_fast.audio import AudioError, audio_token_count, log_mel
from eureka_fast.models import MessageFormatError


pytestmark = pytest.mark.usefixtures("one_torch_thread")


ASR_SYSTEM = "You are an advanced ASR (Automatic Speech Recognition) AI assistant."


def _audio_item(path):
    return {"type": "audio_url", "audio_url": {"url": str(path)}}


def test_tiny_tokenizer_matches_tiktoken_gpt2(tiny_eureka_processor):
    import tiktoken
    from whisper.tokenizer import get_encoding

    reference = get_encoding("gpt2")  # openai-whisper's tiktoken GPT-2 encoding (same ranks, independent code)
    texts = ["Hello world, this is a test.\n\nNumbers 12345 and   spaces", "naïve café — 日本語 🙂",
             "It's   they're\tTAB\r\nend ", "<not special> a<b"]
    tok = tiny_eureka_processor.tokenizer
    for text in texts:
        ours = tok.encode(text, add_special_tokens=False)
        assert ours == reference.encode(text), text
        assert tok.decode(ours) == text
    assert isinstance(reference, tiktoken.Encoding)
    vocab = tok.get_vocab()
    assert [vocab[t] for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|audio_start|>", "<|audio_end|>",
                               "<|audio_pad|>", "<think>", "</think>")] == list(range(50256, 50264))


def test_tiny_processor_matches_tiny_config(tiny_eureka_processor):
    from eureka_fast.models import EurekaAudioConfig

    cfg = EurekaAudioConfig.preset("tiny")
    p = tiny_eureka_processor
    assert (p.audio_start_token_id, p.audio_pad_token_id, p.audio_end_token_id) == \
        (cfg.audio_start_token_id, cfg.audio_pad_token_id, cfg.audio_end_token_id)
    assert p.text_vocab_size == cfg.text_vocab_size == len(p.tokenizer) <= cfg.text_config.vocab_size
    assert p.n_mels == cfg.audio_config.n_mels


def test_chat_template_text(tiny_eureka_processor, wav_dir):
    conv = [{"role": "system", "content": ASR_SYSTEM},
            {"role": "user", "content": [_audio_item(wav_dir / "noise.wav"), {"type": "text", "text": "Q?"}]}]
    text = tiny_eureka_processor.apply_chat_template(conv)
    assert text == (f"<|im_start|>system\n{ASR_SYSTEM}<|im_end|>\n"
                    "<|im_start|>user\n<|audio_start|><|audio_pad|><|audio_end|>Q?<|im_end|>\n"
                    "<|im_start|>assistant\n<think>\n\n</think>\n\n")


def test_audio_tokens_types_and_features(tiny_eureka_processor, wav_dir):
    p = tiny_eureka_processor
    conv = [{"role": "user", "content": [_audio_item(wav_dir / "tone.wav"), {"type": "text", "text": "then"},
                                         _audio_item(wav_dir / "noise.wav")]}]
    out = p(conv)
    ids, types = out["input_ids"][0], out["token_type_ids"][0]
    n_tone, n_noise = math.ceil(12320 / 1280), 32000 // 1280
    assert out["audio_token_counts"].tolist() == [n_tone, n_noise]
    assert (types == 3).sum() == n_tone + n_noise
    assert torch.equal(types == 3, ids == p.audio_pad_token_id)
    starts = (ids == p.audio_start_token_id).nonzero().flatten().tolist()
    ends = (ids == p.audio_end_token_id).nonzero().flatten().tolist()
    assert [e - s - 1 for s, e in zip(starts, ends)] == [n_tone, n_noise]
    # features: both clips of the request concatenated in time, one 3000-frame window, as the audio module makes them
    clips = [sf.read(wav_dir / "tone.wav", dtype="float32")[0], sf.read(wav_dir / "noise.wav", dtype="float32")[0]]
    expected = log_mel(clips, 80, mode="eureka")
    assert torch.equal(out["input_features"], expected.windows)
    assert out["windows_per_request"].tolist() == [1]
    decoded = p.tokenizer.decode(ids[ids != p.audio_pad_token_id], skip_special_tokens=False)
    assert decoded == ("<|im_start|>user\n<|audio_start|><|audio_end|>then<|audio_start|><|audio_end|><|im_end|>\n"
                       "<|im_start|>assistant\n<think>\n\n</think>\n\n")


def test_long_audio_is_chunked_never_truncated(tiny_eureka_processor, tmp_path):
    seconds = 65.3
    samples = int(seconds * 16000)
    rng = np.random.default_rng(1)
    sf.write(tmp_path / "long.wav", (rng.standard_normal(samples) * 0.05).astype(np.float32), 16000)
    out = tiny_eureka_processor([{"role": "user", "content": [_audio_item(tmp_path / "long.wav")]}])
    n = audio_token_count(samples)
    assert n == math.ceil(samples / 1280) == 817
    assert (out["token_type_ids"] == 3).sum() == n
    assert out["input_features"].shape == (3, 80, 3000)  # 8 * 817 = 6536 frames -> 3 windows
    assert out["windows_per_request"].tolist() == [3]


def test_assistant_mask_and_training_prompt_equals_inference_prompt(tiny_eureka_processor, wav_dir):
    p = tiny_eureka_processor
    prompt = [{"role": "system", "content": ASR_SYSTEM},
              {"role": "user", "content": [_audio_item(wav_dir / "tone.wav")]}]
    answer = "<THINK>beep</THINK><RESPONSE>B</RESPONSE>"
    record = {"id": "x", "messages": prompt + [{"role": "assistant", "content": [{"type": "text", "text": answer}]}]}
    train = p(record, return_assistant_mask=True)
    infer = p(prompt)
    mask = train["assistant_mask"][0].bool()
    assert p.tokenizer.decode(train["input_ids"][0][mask], skip_special_tokens=False) == answer + "<|im_end|>"
    first = int(mask.nonzero()[0])
    # everything before the answer is exactly the generation prompt
    assert torch.equal(train["input_ids"][0][:first], infer["input_ids"][0])
    assert torch.equal(train["token_type_ids"][0][:first], infer["token_type_ids"][0])
    assert train["input_ids"][0][-1].item() == p.tokenizer.convert_tokens_to_ids("\u010a")  # trailing "\n"
    # multi-turn: only the last assistant turn is the target by default; "all" covers every turn
    multi = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
             {"role": "user", "content": "again"}, {"role": "assistant", "content": "sure"}]
    last = p(multi, return_assistant_mask=True)
    every = p(multi, return_assistant_mask=True, train_turns="all")
    dec = p.tokenizer.decode
    assert dec(last["input_ids"][0][last["assistant_mask"][0].bool()], skip_special_tokens=False) == "sure<|im_end|>"
    assert dec(every["input_ids"][0][every["assistant_mask"][0].bool()], skip_special_tokens=False) == \
        "hello<|im_end|>sure<|im_end|>"


def test_batch_padding_sides(tiny_eureka_processor, wav_dir):
    p = tiny_eureka_processor
    convs = [[{"role": "user", "content": [_audio_item(wav_dir / "noise.wav")]}],
             [{"role": "user", "content": "short"}]]
    gen = p(convs)
    singles = [p(c) for c in convs]
    length = gen["input_ids"].shape[1]
    for b, s in enumerate(singles):
        n = s["input_ids"].shape[1]
        assert torch.equal(gen["input_ids"][b, length - n:], s["input_ids"][0])  # left padded for generation
        assert gen["attention_mask"][b].sum() == n and gen["attention_mask"][b, -1] == 1
        assert (gen["input_ids"][b, : length - n] == p.pad_token_id).all()
    assert gen["windows_per_request"].tolist() == [1, 0]
    train = p([c + [{"role": "assistant", "content": "ok"}] for c in convs], return_assistant_mask=True)
    assert train["attention_mask"][:, 0].tolist() == [1, 1]  # right padded for training
    assert (train["assistant_mask"] <= train["attention_mask"]).all()


def test_audio_sources_data_uri_relative_path_array_and_url(tiny_eureka_processor, wav_dir, monkeypatch):
    p = tiny_eureka_processor
    raw = (wav_dir / "tone.wav").read_bytes()
    by_path = p([{"role": "user", "content": [_audio_item(wav_dir / "tone.wav")]}])
    uri = "data:audio/wav;base64," + base64.b64encode(raw).decode()
    by_uri = p([{"role": "user", "content": [_audio_item(uri)]}])
    by_input_audio = p([{"role": "user", "content": [{"type": "input_audio", "input_audio": {
        "data": base64.b64encode(raw).decode(), "format": "wav"}}]}])
    rel = p({"messages": [{"role": "user", "content": [_audio_item("tone.wav")]}]}, audio_base_dir=str(wav_dir))
    array, rate = sf.read(io.BytesIO(raw), dtype="float32")
    by_array = p([{"role": "user", "content": [{"type": "audio", "audio": (array, rate)}]}])
    for other in (by_uri, by_input_audio, rel, by_array):
        for key in ("input_ids", "token_type_ids", "input_features", "audio_token_counts"):
            assert torch.equal(by_path[key], other[key]), key

    import urllib.request

    class FakeResponse(io.BytesIO):
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout=0: FakeResponse(raw))
    by_url = p([{"role": "user", "content": [_audio_item("https://example.com/tone.wav")]}])
    assert torch.equal(by_url["input_features"], by_path["input_features"])

    def offline(url, timeout=0):
        raise urllib.error.URLError("Temporary failure in name resolution")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(AudioError, match="example.com.*could not download"):
        p([{"role": "user", "content": [_audio_item("https://example.com/tone.wav")]}])


def test_transformers_style_text_and_audio(tiny_eureka_processor, wav_dir):
    p = tiny_eureka_processor
    convs = [[{"role": "user", "content": [_audio_item(wav_dir / "tone.wav"), {"type": "text", "text": "Q1"}]}],
             [{"role": "user", "content": [{"type": "text", "text": "Q2"}, _audio_item(wav_dir / "noise.wav")]}]]
    texts = p.apply_chat_template(convs)
    clips = [str(wav_dir / "tone.wav"), str(wav_dir / "noise.wav")]
    a = p(text=texts, audio=clips)
    b = p(convs)
    for key in b:
        assert torch.equal(a[key], b[key]), key
    c = p(texts, audios=clips)
    assert torch.equal(c["input_ids"], b["input_ids"])
    with pytest.raises(MessageFormatError, match="2 audio placeholder.*1 audio clip"):
        p(text=texts, audio=clips[:1])


def test_bad_messages_raise_clear_errors(tiny_eureka_processor, wav_dir):
    p = tiny_eureka_processor
    with pytest.raises(MessageFormatError, match="role must be one of"):
        p([{"role": "robot", "content": "hi"}])
    with pytest.raises(MessageFormatError, match="message 0.*unknown content type 'image'"):
        p([{"role": "user", "content": [{"type": "image", "image": "x.png"}]}])
    with pytest.raises(MessageFormatError, match="assistant content must be text"):
        p([{"role": "user", "content": "hi"},
           {"role": "assistant", "content": [_audio_item(wav_dir / "tone.wav")]}])
    with pytest.raises(MessageFormatError, match="audio_url item needs"):
        p([{"role": "user", "content": [{"type": "audio_url", "audio_url": {}}]}])
    with pytest.raises(MessageFormatError, match="literally"):
        p([{"role": "user", "content": "sneaky <|audio_pad|> token"}])
    with pytest.raises(MessageFormatError, match="expected a dict with 'role'"):
        p([{"role": "user", "content": "hi"}, "oops"])
    with pytest.raises(AudioError):
        p([{"role": "user", "content": [_audio_item(wav_dir / "missing.wav")]}])


def test_batch_decode_drops_non_text_ids(tiny_eureka_processor):
    p = tiny_eureka_processor
    hello = p.tokenizer.encode("Hello world", add_special_tokens=False)
    ids = torch.tensor([hello + [50300, p.im_end_token_id], [50299] + hello + [p.pad_token_id]])
    assert p.batch_decode(ids) == ["Hello world", "Hello world"]
    assert p.batch_decode(ids, skip_special_tokens=False)[0] == "Hello world<|im_end|>"


def test_save_and_load(tiny_eureka_processor, wav_dir, tmp_path):
    from eureka_fast.models import EurekaAudioProcessor

    tiny_eureka_processor.save_pretrained(tmp_path)
    loaded = EurekaAudioProcessor.from_pretrained(tmp_path)
    conv = [{"role": "user", "content": [_audio_item(wav_dir / "tone.wav"), {"type": "text", "text": "what?"}]}]
    a, b = tiny_eureka_processor(conv), loaded(conv)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert (loaded.n_mels, loaded.text_vocab_size, loaded.eos_token_ids) == \
        (80, tiny_eureka_processor.text_vocab_size, tiny_eureka_processor.eos_token_ids)
