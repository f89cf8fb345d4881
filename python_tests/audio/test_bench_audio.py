"""Smoke test of bench/audio.py (one round, tiny encoder): its own checks run, which a benchmark that only times
would skip. The encoder section asserts our fp32 encoder's error against our float64 encoder stays within a few
times openai-whisper's; the stack_norm_project section asserts the op equals the eager chain on a full and on a
ragged batch. It also checks that every table and statistic the results file quotes is printed."""
import importlib.util
import os
import re

import pytest

pytest.importorskip("whisper")

BENCH = os.path.join(os.path.dirname(__file__), "..", "..", "bench", "audio.py")


def test_bench_audio_quick_runs_its_checks(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("bench_audio", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "audio.md"
    assert bench.main(["--quick", "--rounds", "1", "--threads", "1", "--markdown", str(out)]) == 0
    text = out.read_text()
    assert "| ours (whisper mode) |" in text and "| plain numpy |" in text
    assert re.search(r"\| ours \(eureka_fast WhisperEncoder\) \| [\d.]+ \| [\d.]+ \| [\d.]+ \|", text)
    assert re.search(r"Same-span roofline \(\d+ square GEMMs", text)
    assert re.search(r"single-call roofline min [\d.]+, median [\d.]+, max [\d.]+; same-span roofline min", text)
    rows = re.findall(r"\| (ops\.stack_norm_project|eager chain)[^|]*, (4 x 30 s|ragged [^|]*) \|", text)
    assert len(rows) == 4, rows
