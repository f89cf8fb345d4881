"""Batched Whisper transcription against a one-clip loop and faster-whisper, on the same clips and tiny.en model.

    python bench/transcribe.py [--clips 24] [--real 8] [--rounds 1] [--threads 2] [--batch-size 8] [--engines ...]

Clips: `--clips` espeak-ng sentences of 3-6 s (several voices and speeds) and `--real` recorded prompts of 3-6 s
(Allison Smith's wideband English Asterisk prompts, when the Debian packages asterisk-core-sounds-en-g722 and
asterisk-core-sounds-en are installed: the audio and its documented text); both with known text. Engines, timed in
the same run over the same clips, models loaded and warmed up first, interleaved per round (the best round counts):
  ours-loop          WhisperModel.transcribe(clip) for each clip (the reference transcripts)
  ours-batched       WhisperModel.transcribe(list_of_clips, batch_size=...)        (exact: equal to ours-loop)
  ours-trimmed       the same with window="trimmed"
  ours-int8          the same with compute_type="int8"
  ours-trimmed-int8  both
  fw-fp32 / fw-int8                  faster-whisper WhisperModel.transcribe, one clip at a time
  fw-fp32-batched / fw-int8-batched  faster-whisper BatchedInferencePipeline over the clips laid end to end, each
                                     clip its own segment (clip_timestamps), batch_size as ours
Every engine decodes greedily without timestamps (faster-whisper: beam_size=1, condition_on_previous_text=False, no
VAD). Prints per engine: time, clips/s, the fastest faster-whisper engine's time over its own, WER against the known
text (espeak and real clips apart), WER against ours-loop and how many transcripts equal ours-loop's.
"""

from __future__ import annotations

import argparse
import glob
import gzip
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

ENGINES = ("ours-loop", "ours-batched", "ours-trimmed", "ours-int8", "ours-trimmed-int8", "fw-fp32", "fw-int8",
           "fw-fp32-batched", "fw-int8-batched")
OURS_OPTIONS = {"ours-batched": {}, "ours-trimmed": {"window": "trimmed"}, "ours-int8": {"compute_type": "int8"},
                "ours-trimmed-int8": {"window": "trimmed", "compute_type": "int8"}}
WORDS = ("the a small old quiet bright green river window teacher garden morning station letter market doctor "
         "children city bread coffee yellow train music picture friend table evening kitchen paper water story "
         "walked carried opened found painted bought watched wrote cleaned visited moved before after near under "
         "behind across slowly today").split()
VOICES = ("en", "en-us", "en+f3", "en-us+m3", "en+f2")
ALLISON_AUDIO = "/usr/share/asterisk/sounds/en_US_f_Allison"
ALLISON_TEXT = "/usr/share/doc/asterisk-core-sounds-en/core-sounds-en.txt.gz"


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


def real_clips(count: int) -> tuple[list[np.ndarray], list[str]]:
    """Up to `count` of Allison's wideband prompts of 3-6 s with their documented text, spread evenly over the
    sorted list; none (with a note on stderr) when the packages are missing."""
    from eureka_fast.audio import load_audio

    if count <= 0:
        return [], []
    if not os.path.exists(ALLISON_TEXT) or not glob.glob(os.path.join(ALLISON_AUDIO, "*.g722")):
        print("no real clips: install asterisk-core-sounds-en-g722 and asterisk-core-sounds-en", file=sys.stderr)
        return [], []
    texts = {}
    with gzip.open(ALLISON_TEXT, "rt", encoding="utf-8", errors="replace") as handle:
        for line in handle:
            name, sep, text = line.partition(":")
            if sep and not line.startswith(";") and text.strip() and "[" not in text:
                texts[name.strip()] = " ".join(text.split())
    candidates = []
    for path in sorted(glob.glob(os.path.join(ALLISON_AUDIO, "*.g722"))):
        name = os.path.splitext(os.path.basename(path))[0]
        if name in texts and len(texts[name].split()) >= 4:
            candidates.append((path, texts[name]))
    clips, known = [], []
    step = max(1, len(candidates) // (3 * count))
    for path, text in candidates[::step]:
        if len(clips) == count:
            break
        try:
            audio = load_audio(path)
        except Exception:  # an undecodable prompt is skipped, not the run
            continue
        if 3.0 <= len(audio) / 16000 <= 6.0:
            clips.append(audio)
            known.append(text)
    return clips, known


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
        engines["ours-loop"] = lambda clips: [ours.transcribe(clip) for clip in clips]
        for name, options in OURS_OPTIONS.items():
            engines[name] = lambda clips, options=options: ours.transcribe(clips, batch_size=batch_size, **options)
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


def pooled_wer(references: list[str], hypotheses: list[str]) -> float | None:
    """Word edits over reference words, pooled over the clips (eureka_fast.dataflux.asr.word_error_rate)."""
    from eureka_fast.dataflux.asr import word_error_rate

    if not references:
        return None
    edits = words = 0
    for reference, hypothesis in zip(references, hypotheses):
        e, n = word_error_rate(reference, hypothesis)
        edits, words = edits + e, words + n
    return edits / max(1, words)


def percent(value: float | None) -> str:
    return "-" if value is None else "%.1f%%" % (100 * value)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=24, help="espeak-ng clips of 3-6 s (default 24)")
    parser.add_argument("--real", type=int, default=8, help="recorded prompts of 3-6 s, if installed (default 8)")
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
    if args.clips < 1 or args.real < 0 or args.rounds < 1 or args.threads < 1 or args.batch_size < 1:
        parser.error("--clips, --rounds, --threads and --batch-size must be positive, --real not negative")

    import torch

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as directory:
        clips, texts = make_clips(args.clips, directory)
    recorded, recorded_texts = real_clips(args.real)
    synthetic = len(clips)
    clips, texts = clips + recorded, texts + recorded_texts
    seconds = sum(len(c) for c in clips) / 16000
    engines = build_engines(names, args.threads, args.batch_size)
    for run in ([] if args.no_warmup else engines.values()):  # warm-up: first calls allocate and pack weights
        run(clips[:2])
    load_before = os.getloadavg()
    best = {name: float("inf") for name in names}
    outputs = {}
    for _ in range(args.rounds):
        for name, run in engines.items():  # interleaved, so load changes hit every engine alike
            start = time.perf_counter()
            outputs[name] = run(clips)
            best[name] = min(best[name], time.perf_counter() - start)
    load = os.getloadavg()
    print("%d clips (%d espeak-ng, %d recorded), %.1f s of audio (%.1f-%.1f s each), %d thread(s), batch size %d, "
          "%d round(s), load average %.1f / %.1f / %.1f before the timed rounds, %.1f / %.1f / %.1f after"
          % (len(clips), synthetic, len(recorded), seconds, min(len(c) for c in clips) / 16000,
             max(len(c) for c in clips) / 16000, args.threads, args.batch_size, args.rounds, *load_before, *load))
    baselines = [name for name in names if name.startswith("fw-")]
    fastest = min(baselines, key=best.get) if baselines else None
    reference = outputs.get("ours-loop")
    print("| engine | s | clips/s | speed vs %s | WER espeak | WER recorded | WER vs ours-loop | transcripts equal to "
          "ours-loop |" % (fastest or "faster-whisper"))
    print("|---|---|---|---|---|---|---|---|")
    for name in names:
        got = outputs[name]
        speed = "%.2fx" % (best[fastest] / best[name]) if fastest else "-"
        against_loop = percent(pooled_wer(reference, got)) if reference is not None else "-"
        agree = ("%d/%d" % (sum(normalise(a) == normalise(b) for a, b in zip(got, reference)), len(clips))
                 if reference is not None else "-")
        print("| %s | %.2f | %.2f | %s | %s | %s | %s | %s |"
              % (name, best[name], len(clips) / best[name], speed, percent(pooled_wer(texts[:synthetic],
                                                                                      got[:synthetic])),
                 percent(pooled_wer(texts[synthetic:], got[synthetic:])), against_loop, agree))
    for name in names:
        if name.startswith("ours") and fastest:
            print("%s vs the fastest faster-whisper engine (%s): %.2fx" % (name, fastest, best[fastest] / best[name]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
