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
    assert main(["serve", "--model", serve_model_dir, "--allow-local-audio", str(tmp_path / "nope")]) == 2
    assert "--allow-local-audio" in capsys.readouterr().err
