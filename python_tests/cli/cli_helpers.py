"""Helpers for the command-line tests: run the real `eureka-audio` command in a subprocess, importing the package
of the tree under test, and check what it printed and left on disk."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import numpy as np
import soundfile

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def cli_command() -> list[str]:
    """The installed console script when it sits next to this Python, else the same entry point via -m."""
    script = os.path.join(os.path.dirname(sys.executable), "eureka-audio")
    return [script] if os.path.exists(script) else [sys.executable, "-m", "eureka_fast.cli"]


def cli_env(**extra) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("EUREKA_AUDIO_DEBUG", None)
    env.update(extra)
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def run_cli(*args, timeout: float = 240, env_extra: dict | None = None, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(cli_command() + [str(a) for a in args], capture_output=True, text=True, timeout=timeout,
                          env=cli_env(**(env_extra or {})), cwd=cwd)


def default_sigint() -> None:
    """preexec_fn for commands a test interrupts: a shell without job control starts background jobs with SIGINT
    ignored, and a Python started that way never turns Ctrl-C into KeyboardInterrupt; a terminal's Ctrl-C reaches
    a command with the default disposition."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def popen_cli(*args, env_extra: dict | None = None, **kwargs) -> subprocess.Popen:
    kwargs.setdefault("preexec_fn", default_sigint)
    return subprocess.Popen(cli_command() + [str(a) for a in args], env=cli_env(**(env_extra or {})),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if ": error: " in line]


def assert_one_line_error(proc, command: str, *needles: str, code: int | None = None):
    """Non-zero exit, no traceback, exactly one `eureka-audio <command>: error: ...` line holding every needle."""
    assert proc.returncode != 0, proc.stderr
    if code is not None:
        assert proc.returncode == code, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = error_lines(proc.stderr)
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"eureka-audio {command}: error: "), lines[0]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def write_tone(path, seconds: float, freq: float, sr: int = 16000):
    t = np.arange(int(seconds * sr)) / sr
    noise = 0.01 * np.random.default_rng(int(freq)).standard_normal(t.size)
    soundfile.write(str(path), (0.3 * np.sin(2 * np.pi * freq * t) + noise).astype(np.float32), sr)
    return str(path)


def read_manifest(out) -> dict:
    with open(os.path.join(out, "manifest.json"), encoding="utf-8") as fh:
        return json.load(fh)


# Offline DataFlux roles without speech recognition: signal analysis only, a second or so per clip.
OFFLINE_CONFIG = {"pipeline": {"workers": 1, "rounds": 1, "categories": ["speaker_gender", "background_noise"]},
                  "roles": {r: {"asr": "none"} for r in ("captioner", "answerer_a", "answerer_b")}}
