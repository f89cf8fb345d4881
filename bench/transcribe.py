"""Batched Whisper transcription against a one-clip loop and faster-whisper, on the same clips and tiny.en model.

    python bench/transcribe.py [--clips 24] [--rounds 1] [--threads 2] [--batch-size 8] [--engines ...]

Clips: espeak-ng sentences of 3-6 s (several voices and speeds). Engines, timed in the same run, models loaded and
warmed up first, each over all clips per round (the best round counts):
  ours-batched  WhisperModel.transcribe(list_of_clips, batch_size=...)
  ours-loop     WhisperModel.transcribe(clip) for each clip
  fw-fp32 / fw-int8                  faster-whisper WhisperModel.transcribe, one clip at a time
  fw-fp32-batched / fw-int8-batched  faster-whisper BatchedInferencePipeline over the clips laid end to end, each
                                     clip its own segment (clip_timestamps), batch_size as ours
Every engine decodes greedily without timestamps (faster-whisper: beam_size=1, condition_on_previous_text=False, no
VAD). Prints clips/s per engine, ours-batched's speed over each, and how many transcripts agree with ours-loop.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

ENGINES = ("ours-batched", "ours-loop", "fw-fp32", "fw-int8", "fw-fp32-batched", "fw-int8-batched")
WORDS = ("the a small old quiet bright green river window teacher garden morning station letter market doctor "
         "children city bread coffee yellow train music picture friend table evening kitchen paper water story "
         "walked carried opened found painted bought watched wrote cleaned visited moved before after near under "
         "behind across slowly today").split()
VOICES = ("en", "en-us", "en+f3", "en-us+m3", "en+f2")


def make_clips(count: int, directory: str, seed: int = 0) -> tuple[list[np.ndarray], list[str]]:
    """`count` espeak-ng clips of 3-6 s (sentences re-drawn until they land in that range)."""
    from eureka_fast.audio import load_audio

    if shutil.which("espeak-ng") is None:
        raise SystemExit("bench/transcribe.py: espeak-ng is not installed (apt-get install espeak-ng)")
    rng = random.Random(seed)
    clips, texts = [], []
    attempt = 0
    while len(clips) < count:
        attempt += 1
        if attempt > 20 * count:
            raise SystemExit("bench/transcribe.py: could not synthesise %d clips of 3-6 s" % count)
        text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(7, 13))).capitalize() + "."
        path = os.path.join(directory, "clip%03d.wav" % len(clips))
        subprocess.run(["espeak-ng", "-v", rng.choice(VOICES), "-s", str(rng.randint(140, 180)), "-w", path, text],
                       check=True, capture_output=True)
        audio = load_audio(path)
        if 3.0 <= len(audio) / 16000 <= 6.0:
            clips.append(audio)
            texts.append(text)
    return clips, texts


def faster_whisper_model(compute_type: str, threads: int):
    import faster_whisper

    from eureka_fast.models.whisper import resolve_whisper_path

    return faster_whisper.WhisperModel(resolve_whisper_path("tiny.en"), device="cpu", compute_type=compute_type,
                                       cpu_threads=threads)


def build_engines(names: list[str], threads: int, batch_size: int) -> dict:
    """name -> function(list of clips) -> list of transcripts."""
    engines = {}
    if any(name.startswith("ours") for name in names):
        from eureka_fast.models.whisper import load_whisper_model

        ours = load_whisper_model("tiny.en")
        engines["ours-batched"] = lambda clips: ours.transcribe(clips, batch_size=batch_size)
        engines["ours-loop"] = lambda clips: [ours.transcribe(clip) for clip in clips]
    for compute_type in ("fp32", "int8"):
        if not any(name.startswith("fw-" + compute_type) for name in names):
            continue
        model = faster_whisper_model("float32" if compute_type == "fp32" else "int8", threads)
        options = dict(beam_size=1, without_timestamps=True, condition_on_previous_text=False, vad_filter=False)

        def one_at_a_time(clips, model=model):
            return [" ".join(s.text.strip() for s in model.transcribe(clip, **options)[0]) for clip in clips]

        def batched(clips, model=model):
            from faster_whisper import BatchedInferencePipeline

            pipeline = BatchedInferencePipeline(model)
            starts = np.cumsum([0] + [len(c) for c in clips])
            stamps = [{"start": starts[i] / 16000, "end": starts[i + 1] / 16000} for i in range(len(clips))]
            segments, _ = pipeline.transcribe(np.concatenate(clips), beam_size=1, without_timestamps=True,
                                              clip_timestamps=stamps, batch_size=batch_size)
            return [s.text.strip() for s in segments]

        engines["fw-%s" % compute_type] = one_at_a_time
        engines["fw-%s-batched" % compute_type] = batched
    return {name: engines[name] for name in names}


def normalise(text: str) -> str:
    return " ".join("".join(c for c in text.lower() if c.isalnum() or c.isspace()).split())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=24, help="number of 3-6 s clips (default 24)")
    parser.add_argument("--rounds", type=int, default=1, help="timed rounds per engine; the best counts")
    parser.add_argument("--threads", type=int, default=2, help="torch / CTranslate2 threads (default 2)")
    parser.add_argument("--batch-size", type=int, default=8, help="windows per batch, ours and faster-whisper's")
    parser.add_argument("--engines", default=",".join(ENGINES), help="comma-separated subset of " + ", ".join(ENGINES))
    parser.add_argument("--no-warmup", action="store_true", help="skip the warm-up call (smoke runs only)")
    args = parser.parse_args(argv)
    names = [name.strip() for name in args.engines.split(",") if name.strip()]
    unknown = [name for name in names if name not in ENGINES]
    if unknown or not names:
        parser.error("unknown engine(s) %s; choose from %s" % (", ".join(unknown) or "(none)", ", ".join(ENGINES)))
    if args.clips < 1 or args.rounds < 1 or args.threads < 1 or args.batch_size < 1:
        parser.error("--clips, --rounds, --threads and --batch-size must be positive")

    import torch

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as directory:
        clips, _ = make_clips(args.clips, directory)
    seconds = sum(len(c) for c in clips) / 16000
    engines = build_engines(names, args.threads, args.batch_size)
    for run in ([] if args.no_warmup else engines.values()):  # warm-up: first calls allocate and pack weights
        run(clips[:1])
    best = {name: float("inf") for name in names}
    outputs = {}
    for _ in range(args.rounds):
        for name, run in engines.items():  # interleaved, so load changes hit every engine alike
            start = time.perf_counter()
            outputs[name] = run(clips)
            best[name] = min(best[name], time.perf_counter() - start)
    load = os.getloadavg()
    print("%d clips, %.1f s of audio (%.1f-%.1f s each), %d thread(s), batch size %d, %d round(s), load average "
          "%.1f / %.1f / %.1f" % (len(clips), seconds, min(len(c) for c in clips) / 16000,
                                   max(len(c) for c in clips) / 16000, args.threads, args.batch_size, args.rounds,
                                   *load))
    reference = outputs.get("ours-loop")
    print("| engine | s | clips/s | ours-batched speed-up | transcripts equal to ours-loop |")
    print("|---|---|---|---|---|")
    for name in names:
        clips_per_s = len(clips) / best[name]
        speedup = ("%.2fx" % (best[name] / best["ours-batched"])) if "ours-batched" in best else "-"
        agree = ("%d/%d" % (sum(normalise(a) == normalise(b) for a, b in zip(outputs[name], reference)),
                            len(clips))) if reference is not None else "-"
        print("| %s | %.2f | %.2f | %s | %s |" % (name, best[name], clips_per_s, speedup, agree))
    baselines = [name for name in names if name.startswith("fw-")]
    if "ours-batched" in best and baselines:
        fastest = min(baselines, key=best.get)
        print("ours-batched vs the fastest faster-whisper engine (%s): %.2fx"
              % (fastest, best[fastest] / best["ours-batched"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
