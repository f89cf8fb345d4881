"""http(s) audio URLs (--allow-remote-audio) against a local HTTP server on 127.0.0.1: a wav is downloaded and
answered as EurekaAudio.generate answers it; a 404, a page that is not audio, a file over the size limit (declared or
not), a server that does not answer in time, a body that drips past the time limit and a redirect to a file:// URL
each get an OpenAI error body naming the problem, and the server goes on serving."""
import http.server
import threading
import time

import httpx
import pytest

from eureka_fast.audio import load_audio
from eureka_fast.inference import EurekaAudio
from eureka_fast.serve import Engine, ServeOptions, create_app

from serve_helpers import ServerThread, noise, wav_bytes

pytestmark = pytest.mark.usefixtures("one_torch_thread")

NAME = "tiny-eureka"
MAX_BODY_MB = 1
TIMEOUT_S = 1.0
CLIP = wav_bytes(noise(1.3, seed=31))
STOP = threading.Event()  # set when the test module ends: handlers that wait return at once


class AudioHandler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):  # keep the test output clean
        pass

    def _send(self, status, body: bytes, content_type="audio/wav", length=True):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        if length:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        if self.path == "/clip.wav":
            self._send(200, CLIP)
        elif self.path == "/moved":
            self.send_response(302)
            self.send_header("Location", "/clip.wav")
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif self.path == "/page.html":
            self._send(200, b"<html><body>not audio</body></html>" * 20, "text/html")
        elif self.path == "/big.wav":  # declared larger than the limit
            self.send_response(200)
            self.send_header("Content-Length", str(MAX_BODY_MB * 2 << 20))
            self.end_headers()
            self.wfile.write(b"\0" * 4096)
        elif self.path == "/big-undeclared.wav":  # no Content-Length: the limit applies while reading
            self.send_response(200)
            self.send_header("Connection", "close")
            self.end_headers()
            block = b"\0" * 65536
            try:
                for _ in range((MAX_BODY_MB * 2 << 20) // len(block)):
                    self.wfile.write(block)
            except OSError:  # the server stopped reading: expected
                pass
        elif self.path == "/silent":  # never answers within the time limit
            STOP.wait(TIMEOUT_S * 4)
        elif self.path == "/drip.wav":  # answers at once, then a few bytes at a time, past the time limit
            self.send_response(200)
            self.send_header("Content-Length", str(len(CLIP)))
            self.end_headers()
            try:
                for i in range(0, len(CLIP), 64):
                    if STOP.wait(0.2):
                        return
                    self.wfile.write(CLIP[i:i + 64])
                    self.wfile.flush()
            except OSError:
                pass
        elif self.path == "/to-file":
            self.send_response(302)
            self.send_header("Location", "file:///etc/passwd")
            self.send_header("Content-Length", "0")
            self.end_headers()
        else:
            self._send(404, b"no such file", "text/plain")


@pytest.fixture(scope="module")
def audio_site():
    site = http.server.ThreadingHTTPServer(("127.0.0.1", 0), AudioHandler)
    site.daemon_threads = True
    thread = threading.Thread(target=site.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{site.server_address[1]}"
    finally:
        STOP.set()
        site.shutdown()
        site.server_close()
        thread.join(10)
    assert not thread.is_alive()


@pytest.fixture(scope="module")
def served(model_and_processor):
    engine = Engine(*model_and_processor, max_num_seqs=4)
    options = ServeOptions(served_model_name=NAME, max_body_mb=MAX_BODY_MB, allow_remote_audio=True,
                           remote_audio_timeout_s=TIMEOUT_S)
    with ServerThread(create_app(engine, options)) as server:
        yield server


def chat(url, audio_url, max_tokens=6):
    body = {"model": NAME, "temperature": 0, "max_tokens": max_tokens, "messages": [{"role": "user", "content": [
        {"type": "audio_url", "audio_url": {"url": audio_url}}, {"type": "text", "text": "What is said?"}]}]}
    return httpx.post(url + "/v1/chat/completions", json=body, timeout=60)


def test_a_downloaded_wav_is_answered_as_generate_answers_it(served, audio_site, model_and_processor):
    reference = EurekaAudio(*model_and_processor)
    conv = [{"role": "user", "content": [{"type": "audio", "audio": load_audio(CLIP)},
                                         {"type": "text", "text": "What is said?"}]}]
    expected = reference.generate(conv, greedy=True, max_new_tokens=6)
    for path in ("/clip.wav", "/moved"):  # directly and through a redirect
        r = chat(served.url, audio_site + path)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"] == expected
        assert r.json()["usage"]["prompt_tokens"] > 16  # the audio's pad tokens are in the prompt


ERRORS = [
    ("/missing.wav", "audio_download_failed", "HTTP 404"),
    ("/page.html", "invalid_audio", "could not be decoded"),
    ("/big.wav", "audio_too_large", "larger than 1 MiB"),
    ("/big-undeclared.wav", "audio_too_large", "larger than 1 MiB"),
    ("/silent", "audio_download_failed", f"longer than {TIMEOUT_S:g} s"),
    ("/drip.wav", "audio_download_failed", f"longer than {TIMEOUT_S:g} s"),
    ("/to-file", "audio_download_failed", "not an http(s) URL"),
]


@pytest.mark.parametrize("path, code, match", ERRORS, ids=[e[0] for e in ERRORS])
def test_download_errors_are_openai_errors_and_the_server_goes_on(served, audio_site, path, code, match):
    start = time.monotonic()
    r = chat(served.url, audio_site + path)
    elapsed = time.monotonic() - start
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and "Traceback" not in r.text
    assert error["param"] == "messages[0].content[0].audio_url.url"
    assert error["code"] == code and match in error["message"], error
    assert elapsed < TIMEOUT_S + 10  # the time limit holds for the whole download
    assert chat(served.url, audio_site + "/clip.wav", max_tokens=2).status_code == 200


def test_an_unreachable_host_is_a_clear_error(served):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = chat(served.url, f"http://127.0.0.1:{port}/a.wav")
    assert r.status_code == 400 and r.json()["error"]["code"] == "audio_download_failed"
    assert "could not download the audio (ConnectionRefusedError)" in r.json()["error"]["message"]
