"""`eureka-audio dataflux run|stats|resume`."""
from __future__ import annotations

import json
import os


def add_subcommand(subparsers):
    p = subparsers.add_parser("dataflux", help="DataFlux: raw audio -> verified instruction data (JSONL)")
    sub = p.add_subparsers(dest="dataflux_command", metavar="{run,resume,stats}")

    run = sub.add_parser("run", help="start a run over an audio directory")
    run.add_argument("--audio-dir", required=True, help="directory of audio files (searched recursively)")
    run.add_argument("--out", required=True, help="output directory (must not hold a run already)")
    run.add_argument("--config", help="roles/pipeline YAML (see eureka_fast/dataflux/roles_example.yaml)")
    run.add_argument("--taxonomy", help="taxonomy YAML (default: the shipped taxonomy.yaml)")
    run.add_argument("--executor", choices=("local", "ray"))
    run.add_argument("--workers", type=int, help="clips (local) or Ray tasks in flight")
    run.add_argument("--rounds", type=int, help="closed-loop rounds per (clip, category)")
    run.add_argument("--questions", type=int, dest="questions_per_category", help="questions per category and clip")
    run.add_argument("--shard-size", type=int, help="clips per output shard / checkpoint")
    run.add_argument("--seed", type=int)
    run.add_argument("--categories", help="comma-separated L3 category ids to restrict to")
    run.add_argument("--limit", type=int, help="only the first N clips (sorted by path)")
    run.add_argument("--no-progress", action="store_true")
    run.set_defaults(func=_run)

    res = sub.add_parser("resume", help="continue an interrupted run (same config, no loss, no duplicates)")
    res.add_argument("--out", required=True)
    res.add_argument("--no-progress", action="store_true")
    res.set_defaults(func=_resume)

    st = sub.add_parser("stats", help="print the report of a run (recomputed from its committed output)")
    st.add_argument("--out", required=True)
    st.add_argument("--json", action="store_true", help="print stats.json instead of the table")
    st.set_defaults(func=_stats)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def _run(args):
    from .runner import load_config, run_dataflux

    overrides = {"executor": args.executor, "workers": args.workers, "rounds": args.rounds,
                 "questions_per_category": args.questions_per_category, "shard_size": args.shard_size,
                 "seed": args.seed, "taxonomy": os.path.abspath(args.taxonomy) if args.taxonomy else None,
                 "categories": [c.strip() for c in args.categories.split(",")] if args.categories else None}
    config = load_config(args.config, overrides)
    stats = run_dataflux(args.audio_dir, args.out, config, progress=not args.no_progress, limit=args.limit)
    return 0 if stats["clips"]["total"] else 1


def _resume(args):
    from .runner import run_dataflux

    run_dataflux(None, args.out, resume=True, progress=not args.no_progress)
    return 0


def _stats(args):
    from .stats import compute_stats, format_table
    from .store import RunStore

    store = RunStore(args.out)
    if not store.exists():
        raise SystemExit(f"{args.out}: no DataFlux run here (manifest.json missing)")
    # read-only: never roll back or touch a run that may still be going; use only committed shards
    with open(os.path.join(store.out, "manifest.json"), encoding="utf-8") as fh:
        store.manifest = json.load(fh)
    stats = compute_stats(store)
    print(json.dumps(stats, indent=2, sort_keys=True) if args.json else format_table(stats))
    return 0
