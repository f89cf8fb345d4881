"""The HTTP server through the official `openai` client and raw HTTP: answers, streaming, bad input, security."""
import base64
import json
import os
import struct
import time

import httpx
import numpy as np
import openai
import pytest
import soundfile as sf

from eureka_fast.audio import load_audio
from eureka_fast.inference import EurekaAudio, task_messages
from eureka_fast.serve import Engine, ServeOptions, create_app

from serve_helpers import ServerThread, noise, wav_bytes

pytestmark = pytest.mark.usefixtures("one_torch_thread")

NAME = "tiny-eureka"
MAX_AUDIO_S = 20
MAX_BODY_MB = 2


@pytest.fixture(scope="module")
def reference(model_and_processor):
    return EurekaAudio(*model_and_processor)


@pytest.fixture(scope="module")
def audio_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("audio_root")
    allowed = root / "allowed"
    allowed.mkdir()
    (allowed / "clip.wav").write_bytes(wav_bytes(noise(1.2, seed=3)))
    (root / "secret.wav").write_bytes(wav_bytes(noise(1.0, seed=4)))
    os.symlink(root / "secret.wav", allowed / "link.wav")
    return allowed


@pytest.fixture(scope="module")
def served(model_and_processor, audio_dir):
    engine = Engine(*model_and_processor, max_num_seqs=8)
    options = ServeOptions(served_model_name=NAME, max_audio_seconds=MAX_AUDIO_S, max_body_mb=MAX_BODY_MB,
                           allow_local_audio=str(audio_dir))
    with ServerThread(create_app(engine, options)) as server:
        server.engine = engine
        yield server


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def audio_part(samples, fmt="wav"):
    return {"type": "input_audio", "input_audio": {"data": base64.b64encode(wav_bytes(samples)).decode(),
                                                   "format": fmt}}


def reference_conversation(samples, question):
    """The conversation as EurekaAudio.generate takes it, with the audio the server decodes from the wav."""
    decoded = load_audio(wav_bytes(samples))
    return [{"role": "user", "content": [{"type": "audio", "audio": decoded}, {"type": "text", "text": question}]}]


def ok_request(url, **headers):
    """A normal request: the server must still answer it after any bad one."""
    r = httpx.post(url + "/v1/chat/completions", json={"model": NAME, "messages": [{"role": "user", "content": "hi"}],
                                                        "max_tokens": 2, "temperature": 0}, headers=headers,
                   timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["finish_reason"] == "length"


def assert_error(response, status, param=None, code=None, match=None):
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert "Traceback" not in response.text and 'File "' not in response.text
    if param is not None:
        assert body["error"]["param"] == param
    if code is not None:
        assert body["error"]["code"] == code
    if match is not None:
        assert match in body["error"]["message"], body["error"]["message"]


def test_chat_with_audio_matches_generate(client, served, reference):
    samples = noise(1.5, seed=11)
    out = client.chat.completions.create(model=NAME, temperature=0, max_tokens=10, messages=[
        {"role": "user", "content": [audio_part(samples), {"type": "text", "text": "What is said?"}]}])
    conv = reference_conversation(samples, "What is said?")
    assert out.choices[0].message.content == reference.generate(conv, greedy=True, max_new_tokens=10)
    assert out.choices[0].finish_reason == "length" and out.model == NAME
    prompt_tokens = len(served.engine.prepare(conv))
    assert out.usage.prompt_tokens == prompt_tokens > 19  # 1.5 s of audio = 19 pads, plus the template
    assert out.usage.completion_tokens == 10 and out.usage.total_tokens == prompt_tokens + 10


def test_streaming_with_usage_gives_the_same_text(client, reference):
    samples = noise(0.8, seed=12)
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": [audio_part(samples), {"type": "text", "text": "Describe it."}]}]
    stream = client.chat.completions.create(model=NAME, temperature=0, max_tokens=8, messages=messages, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    conv = [messages[0]] + reference_conversation(samples, "Describe it.")
    assert text == reference.generate(conv, greedy=True, max_new_tokens=8)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8
    assert all(c.usage is None for c in chunks[:-1])


def test_n_seed_stop_and_vllm_extra_fields(client):
    messages = [{"role": "user", "content": "Tell me a story about a fox."}]
    kw = dict(model=NAME, messages=messages, max_tokens=8, temperature=1.0, seed=42)
    first = client.chat.completions.create(n=3, **kw)
    again = client.chat.completions.create(n=3, **kw)
    texts = [c.message.content for c in first.choices]
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert texts == [c.message.content for c in again.choices]  # seeded: reproducible
    assert len(set(texts)) > 1  # n samples differ
    assert first.usage.completion_tokens == 24

    greedy = client.chat.completions.create(model=NAME, messages=messages, max_tokens=12, temperature=0)
    full = greedy.choices[0].message.content
    stop = full[len(full) // 2:len(full) // 2 + 3]
    cut = client.chat.completions.create(model=NAME, messages=messages, max_tokens=12, temperature=0, stop=[stop])
    assert cut.choices[0].message.content == full[:full.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    # vLLM's extra fields: top_k=1 sampling equals greedy without repetition penalty
    plain = client.chat.completions.create(model=NAME, messages=messages, max_tokens=6, temperature=0,
                                           extra_body={"repetition_penalty": 1.0})
    top1 = client.chat.completions.create(model=NAME, messages=messages, max_tokens=6, temperature=0.8,
                                          extra_body={"top_k": 1, "repetition_penalty": 1.0, "min_tokens": 2,
                                                      "ignore_eos": True})
    assert top1.choices[0].message.content == plain.choices[0].message.content


def test_models_health_metrics(client, served):
    assert [m.id for m in client.models.list().data] == [NAME]
    assert httpx.get(served.url + "/health").json() == {"status": "ok"}
    ok_request(served.url)
    text = httpx.get(served.url + "/metrics").text
    assert "eureka_serve_num_requests_running 0" in text
    assert "eureka_serve_num_requests_waiting 0" in text
    generated = [line for line in text.splitlines() if line.startswith("eureka_serve_generation_tokens_total ")]
    assert int(generated[0].split()[1]) >= 2
    assert 'eureka_serve_time_to_first_token_seconds_bucket{le="+Inf"}' in text
    assert "eureka_serve_e2e_request_latency_seconds_count" in text

    def value(name):
        return float(next(line.split()[1] for line in text.splitlines() if line.startswith(name + " ")))

    # the parts of a first token's wait: every admitted request's queue wait, every admission's prefill
    assert value("eureka_serve_queue_wait_seconds_count") >= 1
    assert 1 <= value("eureka_serve_prefill_seconds_count") <= value("eureka_serve_queue_wait_seconds_count")
    assert value("eureka_serve_prefill_seconds_sum") > 0
    assert value("eureka_serve_decode_steps_total") >= 1 and value("eureka_serve_decode_seconds_total") > 0


@pytest.mark.parametrize("fmt", ["json", "text", "verbose_json", "srt", "vtt"])
def test_transcriptions_formats(client, served, reference, fmt):
    samples = noise(1.0, seed=21)
    data = wav_bytes(samples)
    expected = reference.generate(task_messages("asr", load_audio(data)), greedy=True).strip()
    out = client.audio.transcriptions.create(model=NAME, file=("clip.wav", data), response_format=fmt)
    if fmt == "json":
        assert out.text == expected
    elif fmt == "verbose_json":
        assert out.text == expected and out.duration == pytest.approx(1.0, abs=0.01)
        assert out.segments[0].end == pytest.approx(1.0, abs=0.01)
    elif fmt == "text":
        assert out == expected + "\n"
    elif fmt == "srt":
        assert out == f"1\n00:00:00,000 --> 00:00:01,000\n{expected}\n\n"
    else:
        assert out == f"WEBVTT\n\n00:00:00.000 --> 00:00:01.000\n{expected}\n\n"


def test_transcription_prompt_is_context_in_the_asr_instruction(client, served, reference):
    data = wav_bytes(noise(1.0, seed=22))
    context = "Names: Ada Lovelace, Charles Babbage."
    audio = {"type": "audio", "audio": load_audio(data)}
    # the official ASR system prompt, then the context on its own line; the user turn is the audio alone
    with_context = [{"role": "system", "content": "You are an advanced ASR (Automatic Speech Recognition) AI "
                                                  "assistant.\nContext (the text before this audio, or names and "
                                                  "terms it may contain): " + context},
                    {"role": "user", "content": [audio]}]
    expected = reference.generate(with_context, greedy=True).strip()
    assert expected != reference.generate(task_messages("asr", audio["audio"]), greedy=True).strip()  # it matters
    out = client.audio.transcriptions.create(model=NAME, file=("clip.wav", data), prompt=context)
    assert out.text == expected
    # an empty prompt is no prompt
    blank = client.audio.transcriptions.create(model=NAME, file=("clip.wav", data), prompt="  ")
    assert blank.text == reference.generate(task_messages("asr", audio["audio"]), greedy=True).strip()
    # Whisper's limit: 224 tokens
    r = httpx.post(served.url + "/v1/audio/transcriptions", files={"file": ("clip.wav", data)},
                   data={"model": NAME, "prompt": "word " * 300}, timeout=60)
    assert_error(r, 400, param="prompt", match="longer than 224 tokens")
    ok_request(served.url)


def _chat(messages, **extra):
    return {"model": NAME, "messages": messages, "max_tokens": 2, **extra}


def _audio_msg(part):
    return [{"role": "user", "content": [part, {"type": "text", "text": "?"}]}]


def _b64_part(data: bytes, fmt="wav"):
    return {"type": "input_audio", "input_audio": {"data": base64.b64encode(data).decode(), "format": fmt}}


BAD_REQUESTS = [
    ("malformed JSON", b'{"model": "tiny-eureka", "messages": [', 400, None, "invalid_json", "not valid JSON"),
    ("body not an object", b"[1, 2]", 400, None, "invalid_type", "JSON object"),
    ("wrong field type", _chat([{"role": "user", "content": "hi"}], temperature="hot"), 400, "temperature",
     "invalid_type", "must be a number"),
    ("unknown model", {**_chat([{"role": "user", "content": "hi"}]), "model": "gpt-9"}, 404, "model",
     "model_not_found", "gpt-9"),
    ("missing messages", {"model": NAME}, 400, "messages", "missing_required_parameter", "required"),
    ("empty messages", _chat([]), 400, "messages", None, "non-empty"),
    ("bad role", _chat([{"role": "robot", "content": "hi"}]), 400, "messages[0].role", None, "role"),
    ("bad part type", _chat([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]), 400,
     "messages[0].content[0].type", None, "type"),
    ("empty audio", _chat(_audio_msg({"type": "input_audio", "input_audio": {"data": "", "format": "wav"}})), 400,
     "messages[0].content[0].input_audio.data", None, "empty"),
    ("not base64", _chat(_audio_msg({"type": "input_audio", "input_audio": {"data": "@@@", "format": "wav"}})),
     400, "messages[0].content[0].input_audio.data", None, "base64"),
    ("undecodable audio", _chat(_audio_msg(_b64_part(b"this is not audio" * 50))), 400,
     "messages[0].content[0].input_audio.data", None, "could not be decoded"),
    ("truncated audio", _chat(_audio_msg(_b64_part(wav_bytes(noise(1.0))[:9000]))), 400,
     "messages[0].content[0].input_audio.data", None, "truncated"),
    ("unsupported format", _chat(_audio_msg(_b64_part(wav_bytes(noise(0.5)), "aac"))), 400,
     "messages[0].content[0].input_audio.format", None, "aac"),
    ("audio too long", _chat(_audio_msg(_b64_part(wav_bytes(noise(MAX_AUDIO_S + 5))))), 400,
     "messages[0].content[0].input_audio.data", "audio_too_long", "at most 20 s"),
    ("prompt longer than the context", _chat([{"role": "user", "content": "word " * 33000}]), 400, "messages",
     "context_length_exceeded", "context is 32768"),
    ("max_tokens 0", _chat([{"role": "user", "content": "hi"}], max_tokens=0), 400, "max_tokens", None, ">= 1"),
    ("max_tokens too large", _chat([{"role": "user", "content": "hi"}], max_tokens=10 ** 9), 400, "max_tokens",
     None, "<= 32768"),
    ("n 0", _chat([{"role": "user", "content": "hi"}], n=0), 400, "n", None, ">= 1"),
    ("n too large", _chat([{"role": "user", "content": "hi"}], n=1000), 400, "n", None, "<= 16"),
    ("stop not strings", _chat([{"role": "user", "content": "hi"}], stop=[1]), 400, "stop", "invalid_type", None),
    ("stream_options without stream", _chat([{"role": "user", "content": "hi"}], stream_options={}), 400,
     "stream_options", None, None),
    ("tools", _chat([{"role": "user", "content": "hi"}], tools=[{"type": "function"}]), 400, "tools",
     "unsupported_parameter", None),
    ("audio in an assistant turn", _chat([{"role": "user", "content": "a"}, {"role": "assistant", "content": [
        _b64_part(wav_bytes(noise(0.2)))]}, {"role": "user", "content": "b"}]), 400, None, None, "user messages"),
    ("http audio url", _chat(_audio_msg({"type": "audio_url", "audio_url": {"url": "http://127.0.0.1:9/a.wav"}})),
     400, "messages[0].content[0].audio_url.url", "audio_url_not_allowed", "--allow-remote-audio"),
]


@pytest.mark.parametrize("case", BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS])
def test_bad_input_gets_an_openai_error_and_the_server_goes_on(served, case):
    _, body, status, param, code, match = case
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(served.url + "/v1/chat/completions", content=content,
                   headers={"Content-Type": "application/json"}, timeout=60)
    assert_error(r, status, param, code, match)
    ok_request(served.url)


def test_unknown_route_and_method(served):
    assert_error(httpx.get(served.url + "/v1/nothing"), 404, code="not_found")
    assert_error(httpx.get(served.url + "/v1/chat/completions"), 405)
    assert_error(httpx.post(served.url + "/v1/audio/transcriptions", json={}), 400, param="file")
    r = httpx.post(served.url + "/v1/audio/transcriptions", files={"file": ("a.wav", wav_bytes(noise(0.3)))},
                   data={"response_format": "docx"})
    assert_error(r, 400, param="response_format")
    ok_request(served.url)


def test_body_size_limit_with_and_without_content_length(served):
    big = b'{"messages": "' + b"x" * (MAX_BODY_MB * 1024 * 1024 + 10) + b'"}'
    r = httpx.post(served.url + "/v1/chat/completions", content=big, headers={"Content-Type": "application/json"})
    assert_error(r, 413, code="request_too_large", match="--max-body-mb")

    def chunks():  # chunked transfer: no Content-Length to refuse up front
        for i in range(0, len(big), 65536):
            yield big[i:i + 65536]

    r = httpx.post(served.url + "/v1/chat/completions", content=chunks(), headers={"Content-Type": "application/json"})
    assert_error(r, 413, code="request_too_large")
    ok_request(served.url)


def _flac_of_silence(seconds: float, rate: int = 8000) -> bytes:
    import io

    buf = io.BytesIO()
    block = np.zeros(rate * 60, dtype=np.int16)
    with sf.SoundFile(buf, "w", samplerate=rate, channels=1, format="FLAC", subtype="PCM_16") as fh:
        for _ in range(int(seconds // 60)):
            fh.write(block)
    return buf.getvalue()


def test_small_compressed_file_that_decodes_to_hours_is_refused_early(served):
    hour = _flac_of_silence(3600)
    assert len(hour) < MAX_BODY_MB * 1024 * 1024 // 2  # small enough to send
    # 1: the FLAC header declares an hour; 2: the same stream with the total-samples field zeroed (unknown): the
    # block-wise decode stops at the limit.
    unknown = bytearray(hour)
    assert unknown[:4] == b"fLaC"
    (packed,) = struct.unpack(">Q", bytes(unknown[18:26]))
    unknown[18:26] = struct.pack(">Q", packed & ~((1 << 36) - 1))
    for data, match in ((hour, "3600.0 s long"), (bytes(unknown), "decodes to more than")):
        start = time.monotonic()
        r = httpx.post(served.url + "/v1/chat/completions", json=_chat(_audio_msg(_b64_part(data, "flac"))),
                       timeout=60)
        assert_error(r, 400, code="audio_too_long", match=match)
        assert time.monotonic() - start < 20  # refused without decoding the hour
    ok_request(served.url)


def test_local_audio_only_inside_the_allowed_directory(served, client, audio_dir, reference):
    def url_part(url):
        return {"type": "audio_url", "audio_url": {"url": url}}

    out = client.chat.completions.create(model=NAME, temperature=0, max_tokens=5,
                                         messages=_audio_msg(url_part("clip.wav")))
    conv = [{"role": "user", "content": [{"type": "audio", "audio": load_audio(str(audio_dir / "clip.wav"))},
                                         {"type": "text", "text": "?"}]}]
    assert out.choices[0].message.content == reference.generate(conv, greedy=True, max_new_tokens=5)
    same = client.chat.completions.create(model=NAME, temperature=0, max_tokens=5,
                                          messages=_audio_msg(url_part("file://" + str(audio_dir / "clip.wav"))))
    assert same.choices[0].message.content == out.choices[0].message.content
    outside = str(audio_dir.parent / "secret.wav")
    for url in ("../secret.wav", outside, "file://" + outside, "link.wav", "sub/../../secret.wav",
                "file://" + str(audio_dir) + "/..%2Fsecret.wav"):
        r = httpx.post(served.url + "/v1/chat/completions", json=_chat(_audio_msg(url_part(url))), timeout=60)
        assert_error(r, 400, code="local_audio_not_allowed", match="outside")
    r = httpx.post(served.url + "/v1/chat/completions", json=_chat(_audio_msg(url_part("missing.wav"))), timeout=60)
    assert_error(r, 400, match="does not exist")
    ok_request(served.url)


def test_stream_disconnect_cancels_the_request(served):
    before = served.engine.metrics.requests_cancelled
    body = _chat([{"role": "user", "content": "go on"}], max_tokens=2000, temperature=0, stream=True,
                 ignore_eos=True)
    with httpx.stream("POST", served.url + "/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
    deadline = time.monotonic() + 20
    while (served.engine.num_running() or served.engine.metrics.requests_cancelled == before) and \
            time.monotonic() < deadline:
        time.sleep(0.05)
    assert served.engine.num_running() == 0
    assert served.engine.metrics.requests_cancelled == before + 1
    ok_request(served.url)


def test_api_key(model_and_processor, monkeypatch):
    engine = Engine(*model_and_processor, max_num_seqs=2)
    with ServerThread(create_app(engine, ServeOptions(served_model_name=NAME, api_key="s3cret-key"))) as server:
        assert_error(httpx.get(server.url + "/v1/models"), 401, code="invalid_api_key", match="missing")
        for header in ("Bearer wrong", "Bearer s3cret-ke", "Bearer s3cret-key2", "Basic s3cret-key", "Bearer"):
            r = httpx.get(server.url + "/v1/models", headers={"Authorization": header})
            assert_error(r, 401, code="invalid_api_key")
        r = httpx.post(server.url + "/v1/chat/completions", json=_chat([{"role": "user", "content": "hi"}]))
        assert_error(r, 401, code="invalid_api_key")
        assert httpx.get(server.url + "/health").status_code == 200  # health checks need no key
        good = openai.OpenAI(base_url=server.url + "/v1", api_key="s3cret-key", max_retries=0)
        assert good.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "hi"}],
                                            max_tokens=2).choices[0].finish_reason == "length"
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=server.url + "/v1", api_key="nope", max_retries=0).models.list()


def test_api_key_compare_is_constant_time():
    import inspect

    from eureka_fast.serve.app import Server

    source = inspect.getsource(Server._auth)
    assert "hmac.compare_digest" in source and "==" not in source.split("compare_digest")[1].split("\n")[0]


def test_queue_full_gets_429_with_retry_after(model_and_processor):
    engine = Engine(*model_and_processor, max_num_seqs=1, max_queue=1)
    with ServerThread(create_app(engine, ServeOptions(served_model_name=NAME))) as server:
        long_body = _chat([{"role": "user", "content": "go"}], max_tokens=3000, temperature=0, stream=True,
                          ignore_eos=True)
        with httpx.Client(timeout=60) as http, http.stream("POST", server.url + "/v1/chat/completions",
                                                           json=long_body) as running:
            assert running.status_code == 200
            lines = running.iter_lines()  # kept: a dropped line iterator closes the response
            assert next(lines).startswith("data: ")
            import threading

            waiting_result = {}
            waiter = threading.Thread(target=lambda: waiting_result.update(r=httpx.post(
                server.url + "/v1/chat/completions", json=_chat([{"role": "user", "content": "x"}]), timeout=60)))
            waiter.start()
            deadline = time.monotonic() + 20
            while engine.num_waiting() < 1 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert engine.num_waiting() == 1
            r = httpx.post(server.url + "/v1/chat/completions", json=_chat([{"role": "user", "content": "y"}]))
            assert_error(r, 429, code="queue_full", match="max-queue 1")
            assert r.headers["Retry-After"] == "1"
        # closing the running stream frees the slot; the waiting request is then served
        waiter.join(60)
        assert waiting_result["r"].status_code == 200
