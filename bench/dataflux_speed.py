"""DataFlux throughput: the whole offline loop over espeak-ng clips of 3-6 s, one clip at a time against batched.

    python bench/dataflux_speed.py [--clips 16] [--modes loop,batched] [--batch-size 8] [--workers 2]
                                   [--rounds 1] [--baseline-pythonpath DIR] [--asr-window full|trimmed]
                                   [--json FILE]
    python bench/dataflux_speed.py --window-check 40

--window-check N: no loop; N clips of the nano recipe's corpus plan (its sentence generator, voices, pitch, speed
and noise settings; the first N training clips) transcribed by the captioner's recognisers over both windows,
reporting each one's WER against the known text, its seconds per clip, and how often the second recogniser
confirms the first (the clips that keep their word questions).

Each mode runs `run_dataflux` with the default offline config (built-in roles: the Whisper tiny.en captioner with
its second recogniser, the template generator, the two measuring answerers, the rule judge) over the same clips
into a fresh output directory, so every step of the loop is timed, committing the records included. The models are
loaded and warmed first (one warm-up clip through the whole loop), so the numbers are steady-state throughput.

  loop     pipeline.batch_size 1: one clip at a time, `workers` clips in flight (the loop before batching)
  batched  pipeline.batch_size N: a batch's clips transcribed together, their signal analysis in `workers`
           processes, the next batch transcribed while the previous one is analysed and questioned

Per stage it reports the seconds per clip spent inside that stage's functions, summed over the threads and
processes that ran it (stages overlap, so they can add up to more than the wall time), then clips/s over the whole
loop and whether both modes wrote the same records (kept, rejected and captions, compared by id).
--baseline-pythonpath DIR also runs the loop mode with the package found in DIR (e.g. a checkout of the main
branch), in a subprocess on the same clips, to compare with the code before this tree's changes.
"""
from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

MODES = ("loop", "batched")
STAGES = (
    ("read", "read + decode the clip"),
    ("asr_primary", "ASR (Whisper tiny.en, ours)"),
    ("asr_second", "second recogniser (faster-whisper beam 5 / ours int8 beam 5)"),
    ("caption_analysis", "captioner signal analysis"),
    ("generate", "question generation"),
    ("measure_a", "answerer a measurements"),
    ("measure_b", "answerer b measurements"),
    ("answer", "answerers (reading their measurements)"),
    ("judge", "judge"),
    ("store", "store (commit records)"),
)


def make_clips(count: int, directory: str) -> list[float]:
    """`count` labelled espeak-ng clips of 3-6 s (both genders, three pitch levels, normal and fast speech, clean and
    noisy) written to `directory`; returns their durations."""
    from eureka_fast.dataflux import synthetic

    if not synthetic.espeak_available():
        raise SystemExit("bench/dataflux_speed.py: espeak-ng is not installed (apt-get install espeak-ng)")
    voices = [v for pair in zip(synthetic.MALE_VOICES, synthetic.FEMALE_VOICES) for v in pair]
    plan = []
    for i in range(40 * count):
        voice = voices[i % len(voices)]
        gender = "male" if voice.startswith("m") else "female"
        pitch = synthetic.PITCH_SETTINGS[gender][(i // len(voices)) % 3]
        speed = (135, 270)[(i // 3) % 2]
        snr = synthetic.NOISE_SETTINGS[i % len(synthetic.NOISE_SETTINGS)]
        plan.append((i, voice, pitch, speed, snr))
    clips = []
    for i, voice, pitch, speed, snr in plan:
        clip = synthetic.make_clip(i, voice, pitch, speed, snr)
        if 3.0 <= clip.audio.size / synthetic.SAMPLE_RATE <= 6.0:
            clips.append(clip)
        if len(clips) == count:
            break
    if len(clips) < count:
        raise SystemExit(f"bench/dataflux_speed.py: only {len(clips)} clips of 3-6 s could be made")
    synthetic.write_clips(clips, directory)
    return [c.audio.size / synthetic.SAMPLE_RATE for c in clips]


class StageClock:
    """Wraps the loop's functions to add up the seconds spent inside each (per stage, over all threads). A call
    nested in a call of the same stage on the same thread is not counted twice."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._lock = threading.Lock()
        self._local = threading.local()
        self._undo = []

    def add(self, stage, seconds):
        with self._lock:
            self.seconds[stage] = self.seconds.get(stage, 0.0) + seconds

    def wrap(self, owner, attr, stage, stage_of=None):
        original = getattr(owner, attr, None)
        if original is None:  # not in this version of the package
            return
        raw = inspect.getattr_static(owner, attr)
        clock = self
        fixed_stage = stage

        def timed(*args, **kwargs):
            stage = stage_of(args[0]) if stage_of is not None else fixed_stage
            depth = getattr(clock._local, stage, 0)
            setattr(clock._local, stage, depth + 1)
            t = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                setattr(clock._local, stage, depth)
                if depth == 0:
                    seconds = time.perf_counter() - t
                    clock.add(stage, seconds)
                    if stage != "answer_total" and getattr(clock._local, "answer_total", 0):
                        clock.add("inside_answer", seconds)  # counted in its own stage already

        setattr(owner, attr, staticmethod(timed) if isinstance(raw, staticmethod) else timed)
        self._undo.append((owner, attr, raw))

    def install(self):
        from eureka_fast.dataflux import asr, audio_io, builtin_roles, captioner, store

        self.wrap(audio_io, "read_clip_or_reject", "read")
        def which(recogniser):  # this tree's second recogniser is our own Whisper, decoded another way
            second = getattr(asr, "SECOND_DECODING", None)
            options = getattr(recogniser, "_options", {})
            is_second = second is not None and all(options.get(k) == v for k, v in second.items())
            return "asr_second" if is_second else "asr_primary"

        self.wrap(asr.EurekaWhisperASR, "transcribe", None, which)
        self.wrap(asr.EurekaWhisperASR, "transcribe_batch", None, which)
        self.wrap(asr.FasterWhisperASR, "transcribe", "asr_second")
        self.wrap(captioner, "analyse", "caption_analysis")
        self.wrap(builtin_roles.TemplateQueryGenerator, "generate", "generate")
        self.wrap(builtin_roles.MeasuringAnswerer, "_measure_a", "measure_a")
        self.wrap(builtin_roles.MeasuringAnswerer, "_measure_b", "measure_b")
        self.wrap(builtin_roles.MeasuringAnswerer, "answer", "answer_total")
        self.wrap(builtin_roles.RuleJudge, "judge", "judge")
        self.wrap(store.RunStore, "commit", "store")

    def uninstall(self):
        for owner, attr, raw in reversed(self._undo):
            setattr(owner, attr, raw)
        self._undo.clear()

    @contextlib.contextmanager
    def installed(self):
        self.install()
        try:
            yield self
        finally:
            self.uninstall()


def stage_seconds(clock_seconds: dict, worker_timings: dict) -> dict:
    """Per-stage seconds from the in-process clock and the batched loop's own timings (work in pool processes)."""
    out = {k: v for k, v in clock_seconds.items() if k not in ("answer_total", "inside_answer")}
    for key, seconds in worker_timings.items():  # the batched loop's analysis ran in worker processes
        if key == "analysis caption_facts":
            out["caption_analysis"] = out.get("caption_analysis", 0.0) + seconds
        elif key == "analysis answerer_measurements":
            out["measure_ab_workers"] = out.get("measure_ab_workers", 0.0) + seconds
    # the answerers' own time, without the measurements (and transcriptions) an answer call made itself
    if "answer_total" in clock_seconds:
        out["answer"] = clock_seconds["answer_total"] - clock_seconds.get("inside_answer", 0.0)
    return out


def run_mode(mode: str, audio_dir: str, out_dir: str, args) -> dict:
    from eureka_fast.dataflux.runner import DEFAULT_CONFIG, load_config, run_dataflux

    overrides = {"workers": args.workers, "shard_size": 1000}
    if "batch_size" in DEFAULT_CONFIG["pipeline"]:  # a tree from before batching has no such option
        overrides["batch_size"] = 1 if mode == "loop" else args.batch_size
    elif mode != "loop":
        raise SystemExit("this package has no batched loop (pipeline.batch_size); run --modes loop")
    config = load_config(None, overrides)
    kwargs = {}
    timings: dict = {}
    if "timings" in inspect.signature(run_dataflux).parameters:
        kwargs["timings"] = timings
    if args.asr_window:
        config["roles"] = {"captioner": {"asr_window": args.asr_window}}
    clock = StageClock()
    load_before = os.getloadavg()
    cpu_before = process_tree_cpu()
    with clock.installed():
        t = time.perf_counter()
        stats = run_dataflux(audio_dir, out_dir, config, progress=False, log=lambda m: None, **kwargs)
        wall = time.perf_counter() - t
    cpu = process_tree_cpu(wait_for_children=True) - cpu_before
    clips = stats["clips"]["total"]
    return {"mode": mode, "clips": clips, "seconds": wall, "clips_per_second": clips / wall,
            "cpu_seconds_per_clip": cpu / clips, "asr_window": args.asr_window or "full",
            "stages": stage_seconds(clock.seconds, timings), "load_before": load_before,
            "load_after": os.getloadavg(), "kept": stats["questions"]["kept"], "failed": stats["clips"]["failed"],
            "batch_size": overrides.get("batch_size", 1), "workers": args.workers}


def process_tree_cpu(wait_for_children: bool = False) -> float:
    """User + system CPU seconds of this process and its finished child processes (the analysis workers; with
    `wait_for_children`, up to 30 s for the workers of a finished run to exit, so that their time is counted)."""
    import multiprocessing
    import resource

    if wait_for_children:
        deadline = time.monotonic() + 30
        while multiprocessing.active_children() and time.monotonic() < deadline:  # reaps the finished ones
            time.sleep(0.05)
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def warm_up(audio_dir: str, scratch: str, args):
    """Load the models and run one clip through the whole loop (both modes' code paths) before timing."""
    import shutil

    from eureka_fast.dataflux.runner import DEFAULT_CONFIG, load_config, run_dataflux

    one = os.path.join(scratch, "warm_audio")
    os.makedirs(one, exist_ok=True)
    first = sorted(os.listdir(audio_dir))[0]
    shutil.copy(os.path.join(audio_dir, first), os.path.join(one, first))
    overrides = {"workers": args.workers}
    for n, size in enumerate((1, 2) if "batch_size" in DEFAULT_CONFIG["pipeline"] else (None,)):
        if size is not None:
            overrides["batch_size"] = size
        config = load_config(None, overrides)
        if args.asr_window:
            config["roles"] = {"captioner": {"asr_window": args.asr_window}}
        run_dataflux(one, os.path.join(scratch, f"warm_out{n}"), config, progress=False, log=lambda m: None)


def records(out_dir: str) -> dict:
    """What a run committed, by id, without timings: kept and rejected records and captions."""
    from eureka_fast.dataflux.store import RunStore

    store = RunStore(out_dir)
    with open(os.path.join(out_dir, "manifest.json"), encoding="utf-8") as fh:
        store.manifest = json.load(fh)
    return {"kept": sorted(store.records("data"), key=lambda r: r["id"]),
            "rejected": sorted(store.records("rejected"), key=lambda r: r["id"]),
            "captions": sorted(store.read_jsonl("captions.jsonl"), key=lambda r: r["id"])}


def markdown(result: dict) -> str:
    runs = result["runs"]
    names = [r["label"] for r in runs]
    lines = [f"{result['clips']} espeak-ng clips of {result['min_s']:.1f}-{result['max_s']:.1f} s "
             f"({result['audio_s']:.0f} s of audio), batch size {result['batch_size']}, workers {result['workers']}, "
             f"{result['threads']} torch threads, {result['cpus']} CPUs.", "",
             "| stage, s per clip | " + " | ".join(names) + " |", "|---|" + "---|" * len(runs)]
    keys = [k for k, _ in STAGES] + ["measure_ab_workers"]
    labels = dict(STAGES, measure_ab_workers="answerers a+b measurements (worker processes)")
    for key in keys:
        vals = [r["stages"].get(key) for r in runs]
        if all(v is None or v == 0 for v in vals):
            continue
        cells = ["-" if v is None else f"{v / r['clips']:.3f}" for v, r in zip(vals, runs)]
        lines.append(f"| {labels[key]} | " + " | ".join(cells) + " |")
    lines.append("| **wall, s per clip** | " + " | ".join(f"**{r['seconds'] / r['clips']:.3f}**" for r in runs) + " |")
    lines.append("| **clips/s** | " + " | ".join(f"**{r['clips_per_second']:.2f}**" for r in runs) + " |")
    lines.append("| CPU s per clip (process tree, user + sys) | " + " | ".join(
        f"{r['cpu_seconds_per_clip']:.2f}" if r.get("cpu_seconds_per_clip") else "-" for r in runs) + " |")
    lines.append("| ASR window | " + " | ".join(r.get("asr_window", "full") for r in runs) + " |")
    lines.append("| kept records | " + " | ".join(str(r["kept"]) for r in runs) + " |")
    lines.append("| load average before / after (1 min) | " + " | ".join(
        f"{r['load_before'][0]:.1f} / {r['load_after'][0]:.1f}" for r in runs) + " |")
    lines.append("")
    for note in result["notes"]:
        lines.append(note)
    return "\n".join(lines)


def window_check(count: int) -> str:
    """WER of each recogniser (both windows) on `count` recipe-like clips; a markdown table."""
    import numpy as np
    import torch

    from eureka_fast.audio import load_audio
    from eureka_fast.dataflux.asr import (SECOND_DECODING, check_transcript, get_asr, transcribe_many,
                                          word_error_rate)
    from eureka_fast.recipe.corpus import plan_corpus, synthesize_clip

    plans = [p for p in plan_corpus(quick=False, seed=0) if p["split"] == "train"][:count]
    with tempfile.TemporaryDirectory() as scratch:
        rows = [synthesize_clip(p, scratch) for p in plans]
        audios = [load_audio(os.path.join(scratch, r["audio"])) for r in rows]
    durations = [a.size / 16000 for a in audios]
    recognisers = [("full", get_asr("eureka")), ("trimmed", get_asr("eureka", window="trimmed")),
                   ("full", get_asr("eureka", **SECOND_DECODING)),
                   ("trimmed", get_asr("eureka", window="trimmed", **SECOND_DECODING))]
    try:
        recognisers.append(("full (30 s)", get_asr("faster-whisper", beam_size=5)))
    except ImportError:
        pass
    torch.set_num_threads(1)
    texts = {}
    lines = [f"{len(audios)} clips of the recipe's training plan, {min(durations):.1f}-{max(durations):.1f} s "
             f"({sum(durations):.0f} s of audio); one torch thread; 1-minute load average "
             f"{os.getloadavg()[0]:.1f} at the start.", "",
             "| recogniser | window | WER | s per clip (batch 8) | CPU s per clip |", "|---|---|---|---|---|"]
    for window, asr in recognisers:
        transcribe_many(asr, audios[:2], batch_size=8)  # warm
        wall, cpu = time.perf_counter(), time.process_time()
        out = transcribe_many(asr, audios, batch_size=8)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        texts[asr.name] = [o[0] if not isinstance(o, BaseException) else "" for o in out]
        errors = words = 0
        for row, text in zip(rows, texts[asr.name]):
            e, n = word_error_rate(row["text"], text)
            errors, words = errors + e, words + n
        lines.append(f"| {asr.name} | {window} | {errors / words:.3f} | {wall / len(audios):.3f} | "
                     f"{cpu / len(audios):.3f} |")
    lines.append("")
    for first, second in (("eureka-whisper-tiny.en", "eureka-whisper-tiny.en-int8-beam5"),
                          ("eureka-whisper-tiny.en-trimmed", "eureka-whisper-tiny.en-trimmed-int8-beam5"),
                          ("eureka-whisper-tiny.en", "faster-whisper-tiny.en-beam5")):
        if first not in texts or second not in texts:
            continue
        checks = [check_transcript(a, b, second) for a, b in zip(texts[first], texts[second])]
        confirmed = [c for c in checks if c["verified"]]
        wrong_kept = sum(1 for c, row, a in zip(checks, rows, texts[first])
                         if c["verified"] and word_error_rate(row["text"], a)[0] > 0)
        wrong = sum(1 for row, a in zip(rows, texts[first]) if word_error_rate(row["text"], a)[0] > 0)
        lines.append(f"- {first} checked by {second}: {len(confirmed)}/{len(checks)} clips confirmed (mean "
                     f"agreement {np.mean([c['agreement'] for c in checks]):.3f}); of the {wrong} clips the first "
                     f"got wrong, {wrong_kept} were confirmed anyway.")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clips", type=int, default=16)
    ap.add_argument("--modes", default="loop,batched", help="comma-separated, run in this order each round")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=1, help="runs of each mode, interleaved; the fastest is shown")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    ap.add_argument("--baseline-pythonpath", help="also run the loop mode with the package found in this directory")
    ap.add_argument("--audio-dir", help="use these clips instead of making new ones (internal: baseline runs)")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--asr-window", choices=("full", "trimmed"), default=None,
                    help="roles.captioner.asr_window of this tree's runs (default: DataFlux's default, full)")
    ap.add_argument("--window-check", type=int, metavar="N", help="only the recognisers' WER check on N clips")
    args = ap.parse_args(argv)
    if args.window_check:
        print(window_check(args.window_check))
        return 0
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if any(m not in MODES for m in modes) or args.clips < 1 or args.rounds < 1:
        ap.error(f"--modes takes {', '.join(MODES)}; --clips and --rounds must be >= 1")
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as scratch:
        audio_dir = args.audio_dir or os.path.join(scratch, "audio")
        if not args.audio_dir:
            make_clips(args.clips, audio_dir)
        from eureka_fast.audio import load_audio

        durations = [load_audio(os.path.join(audio_dir, f)).size / 16000 for f in sorted(os.listdir(audio_dir))]
        warm_up(audio_dir, scratch, args)
        runs, outputs = [], {}
        for rnd in range(args.rounds):
            if args.baseline_pythonpath:
                runs.append(baseline_run(args, audio_dir, scratch, rnd))
                progress(runs[-1])
            for mode in modes:
                out = os.path.join(scratch, f"out-{mode}-{rnd}")
                run = run_mode(mode, audio_dir, out, args)
                run["label"] = mode
                runs.append(run)
                progress(run)
                outputs.setdefault(mode, records(out))
        best = {}
        for r in runs:
            if r["label"] not in best or r["seconds"] < best[r["label"]]["seconds"]:
                best[r["label"]] = r
        notes = []
        if "loop" in outputs and "batched" in outputs:
            same = outputs["loop"] == outputs["batched"]
            notes.append("Records of the two modes (kept, rejected, captions, by id): "
                         + ("identical." if same else "**different**."))
        if "loop" in best and "batched" in best:
            notes.append(f"Batched over loop: {best['loop']['seconds'] / best['batched']['seconds']:.2f}x.")
        if "main-loop" in best and "batched" in best:
            notes.append(f"Batched over the baseline loop: "
                         f"{best['main-loop']['seconds'] / best['batched']['seconds']:.2f}x.")
        result = {"clips": len(durations), "audio_s": sum(durations), "min_s": min(durations),
                  "max_s": max(durations), "batch_size": args.batch_size, "workers": args.workers,
                  "threads": torch.get_num_threads(), "cpus": os.cpu_count(), "runs": list(best.values()),
                  "all_runs": runs, "notes": notes}
        if not args.audio_dir:
            print(markdown(result))
        if args.json:
            with open(args.json, "w") as fh:
                json.dump(result, fh, indent=2)
    return 0


def progress(run: dict):
    """One line per finished run on stderr, so a long benchmark shows its numbers as they come."""
    stages = ", ".join(f"{k} {v / run['clips']:.2f}" for k, v in sorted(run["stages"].items()) if v)
    print(f"[{time.strftime('%H:%M:%S')}] {run['label']}: {run['clips']} clips in {run['seconds']:.1f} s, "
          f"{run['clips_per_second']:.3f} clips/s, {run.get('cpu_seconds_per_clip', 0):.2f} CPU s per clip, "
          f"load {run['load_before'][0]:.1f} -> {run['load_after'][0]:.1f}; "
          f"s per clip: {stages}", file=sys.stderr, flush=True)


def baseline_run(args, audio_dir: str, scratch: str, rnd: int) -> dict:
    """The loop mode with another tree's package, in a subprocess on the same clips."""
    path = os.path.join(scratch, f"baseline-{rnd}.json")
    env = dict(os.environ, PYTHONPATH=os.path.abspath(args.baseline_pythonpath))
    cmd = [sys.executable, os.path.abspath(__file__), "--modes", "loop", "--audio-dir", audio_dir, "--workers",
           str(args.workers), "--json", path]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    subprocess.run(cmd, check=True, env=env, cwd=os.path.abspath(args.baseline_pythonpath))
    with open(path) as fh:
        run = json.load(fh)["runs"][0]
    run["label"] = "main-loop"
    return run


if __name__ == "__main__":
    sys.exit(main())
