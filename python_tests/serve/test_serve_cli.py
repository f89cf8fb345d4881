"""`eureka-audio serve` as a process: start-up line, health, argument errors, graceful SIGINT / SIGTERM."""
import os
import re
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest

from eureka_fast.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class ServeProcess:
    """`eureka-audio serve` on 127.0.0.1 and a free port (--port 0); always killed on exit."""

    def __init__(self, *args, env=None):
        environment = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
                           PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
        environment.update(env or {})
        self.proc = subprocess.Popen([sys.executable, "-m", "eureka_fast.cli", "serve", "--port", "0", *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=environment,
                                     cwd=ROOT)
        self.output = []
        self.ready = threading.Event()
        self.url = None
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            self.output.append(line)
            found = re.search(r"ready at (http://127\.0\.0\.1:\d+)/v1", line)
            if found:
                self.url = found.group(1)
                self.ready.set()

    def wait_ready(self, timeout=180):
        if not self.ready.wait(timeout):
            raise AssertionError("server not ready:\n" + "".join(self.output))
        return self.url

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(30)


def test_start_line_health_and_curl(serve_model_dir):
    with ServeProcess("--model", serve_model_dir, "--served-model-name", "tiny") as server:
        url = server.wait_ready()
        start = time.monotonic()
        assert httpx.get(url + "/health", timeout=10).status_code == 200
        assert time.monotonic() - start < 5
        text = "".join(server.output)
        assert f"curl {url}/v1/chat/completions" in text and '"model": "tiny"' in text
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(60) == 0


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_lets_in_flight_requests_finish(serve_model_dir, sig):
    with ServeProcess("--model", serve_model_dir, "--graceful-timeout", "60") as server:
        url = server.wait_ready()
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 150, "temperature": 0,
                "ignore_eos": True, "stream": True}
        lines = []
        first = threading.Event()

        def stream():
            with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=120) as r:
                for line in r.iter_lines():
                    if line:  # events are separated by blank lines
                        lines.append(line)
                        first.set()

        reader = threading.Thread(target=stream)
        reader.start()
        assert first.wait(60)
        server.proc.send_signal(sig)
        reader.join(120)
        assert not reader.is_alive()
        assert lines[-1] == "data: [DONE]"  # the in-flight answer was completed
        assert '"finish_reason": "length"' in "\n".join(lines)
        assert server.proc.wait(60) == 0
        with pytest.raises(httpx.TransportError):  # and the port is closed
            httpx.get(url + "/health", timeout=5)


def test_argument_errors(tmp_path, serve_model_dir, capsys, monkeypatch):
    assert main(["serve", "--model", str(tmp_path / "missing")]) == 2
    assert "is not a directory" in capsys.readouterr().err
    monkeypatch.delenv("EUREKA_TEST_KEY", raising=False)
    assert main(["serve", "--model", serve_model_dir, "--api-key-env", "EUREKA_TEST_KEY"]) == 2
    assert "EUREKA_TEST_KEY" in capsys.readouterr().err
    assert main(["serve", "--model", serve_model_dir, "--max-num-seqs", "0"]) == 2
    assert "--max-num-seqs must be > 0" in capsys.readouterr().err
    assert main(["serve", "--model", serve_model_dir, "--max-prefill-windows", "0"]) == 2
    assert "--max-prefill-windows must be > 0" in capsys.readouterr().err
    assert main(["serve", "--model", serve_model_dir, "--allow-remote-audio", "--remote-audio-timeout", "0"]) == 2
    assert "--remote-audio-timeout must be > 0" in capsys.readouterr().err
    assert main(["serve", "--model", serve_model_dir, "--allow-local-audio", str(tmp_path / "nope")]) == 2
    assert "--allow-local-audio" in capsys.readouterr().err


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ray_serve_replicas_answer_the_openai_client(serve_model_dir, model_and_processor):
    pytest.importorskip("ray.serve")
    import openai

    from eureka_fast.inference import EurekaAudio

    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "eureka_fast.cli", "serve", "--model", serve_model_dir,
                             "--served-model-name", "tiny", "--port", str(port), "--ray-replicas", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                            env=dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
                                     OMP_NUM_THREADS="1", RAY_USAGE_STATS_ENABLED="0"))
    output = []
    ready = threading.Event()

    def read():
        for line in proc.stdout:
            output.append(line)
            if "2 Ray Serve replicas" in line:
                ready.set()

    threading.Thread(target=read, daemon=True).start()
    try:
        assert ready.wait(600), "".join(output)[-3000:]
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=120)
        messages = [{"role": "user", "content": "Tell me about the sea."}]
        expected = EurekaAudio(*model_and_processor).generate(messages, greedy=True, max_new_tokens=6)
        answers = [client.chat.completions.create(model="tiny", messages=messages, max_tokens=6, temperature=0)
                   for _ in range(4)]
        assert [a.choices[0].message.content for a in answers] == [expected] * 4
        streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
            model="tiny", messages=messages, max_tokens=6, temperature=0, stream=True) if c.choices)
        assert streamed == expected
        assert [m.id for m in client.models.list().data] == ["tiny"]
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(model="other", messages=messages, max_tokens=2)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(180) == 0
        assert "stopped (SIGTERM)" in "".join(output)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(60)
