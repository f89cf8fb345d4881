"""Driver: list clips, skip what the manifest says is done, run an executor, commit finished clips in shards,
show progress, write stats. `run_dataflux` is what `eureka-audio dataflux run|resume` calls."""
from __future__ import annotations

import copy
import os
import sys
import time

import yaml

from ..cli import Interrupted

DEFAULT_CONFIG = {
    "pipeline": {"rounds": 3, "questions_per_category": 5, "shard_size": 200, "executor": "local", "workers": 2,
                 "batch_size": 8, "seed": 0, "taxonomy": None, "categories": None, "ray_address": None,
                 "ray_num_cpus": None, "ray_batch_size": 4},
    "roles": {},
}
PIPELINE_KEYS = set(DEFAULT_CONFIG["pipeline"]) | {"workers_per_task"}


class ConfigError(ValueError):
    pass


def load_config(path: str | None = None, overrides: dict | None = None) -> dict:
    """DEFAULT_CONFIG updated by the YAML file at `path` and then by `overrides` (pipeline keys)."""
    cfg = copy.deepcopy(DEFAULT_CONFIG)
    if path:
        try:
            with open(path, encoding="utf-8") as fh:
                user = yaml.safe_load(fh) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"{path}: cannot read config ({exc})") from exc
        unknown = set(user) - {"pipeline", "roles"}
        if unknown:
            raise ConfigError(f"{path}: unknown top-level key(s) {sorted(unknown)} (expected pipeline, roles)")
        cfg["pipeline"].update(user.get("pipeline") or {})
        cfg["roles"] = user.get("roles") or {}
        if cfg["pipeline"].get("taxonomy") and not os.path.isabs(cfg["pipeline"]["taxonomy"]):
            cfg["pipeline"]["taxonomy"] = os.path.join(os.path.dirname(os.path.abspath(path)),
                                                       cfg["pipeline"]["taxonomy"])
    for k, v in (overrides or {}).items():
        if v is not None:
            cfg["pipeline"][k] = v
    unknown = set(cfg["pipeline"]) - PIPELINE_KEYS
    if unknown:
        raise ConfigError(f"unknown pipeline option(s) {sorted(unknown)}")
    for key in ("batch_size", "workers"):
        value = cfg["pipeline"][key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"pipeline.{key} must be an integer >= 1, got {value!r}")
    if cfg["pipeline"]["executor"] not in ("local", "ray"):
        raise ConfigError(f"pipeline.executor must be local or ray, got {cfg['pipeline']['executor']!r}")
    if cfg["pipeline"]["taxonomy"]:
        cfg["pipeline"]["taxonomy"] = os.path.abspath(cfg["pipeline"]["taxonomy"])
    if not isinstance(cfg["roles"], dict):
        raise ConfigError(f"roles must be a mapping of role names to options, got {cfg['roles']!r}")
    from .roles import check_role_options

    try:
        check_role_options(cfg["roles"])
    except ValueError as exc:
        raise ConfigError(f"{path}: {exc}" if path else str(exc)) from exc
    return cfg


class RunInterrupted(Interrupted):
    """Ctrl-C or SIGTERM stopped a run after its finished clips were committed; the message says how to resume."""


def check_run_arguments(audio_dir: str, out_dir: str) -> list[str]:
    """Everything a new run can check before it writes anything: the audio directory exists, is a directory and
    holds audio files, and --out is not a file or a run already. Returns the audio files (sorted)."""
    from .audio_io import AUDIO_EXTENSIONS, list_audio_files
    from .store import RunStore

    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise NotADirectoryError(f"--out {out_dir}: is a file, not a directory")
    if RunStore(out_dir).exists():
        raise FileExistsError(f"{out_dir} already holds a DataFlux run; use `eureka-audio dataflux resume --out "
                              f"{out_dir}` to continue it, or choose a new --out")
    files = list_audio_files(audio_dir)
    if not files:
        raise FileNotFoundError(f"no audio files ({', '.join(AUDIO_EXTENSIONS)}) under {audio_dir}")
    return files


def run_dataflux(audio_dir: str | None, out_dir: str, config: dict | None = None, *, resume: bool = False,
                 progress: bool = True, limit: int | None = None, log=None, timings: dict | None = None) -> dict:
    """Run (or resume) a DataFlux job. Returns the stats dict.

    A new run checks its arguments before it writes anything; if it then fails before any clip is committed,
    the files it made are removed again (an empty or half-made --out would refuse the next run). Ctrl-C / SIGTERM
    (KeyboardInterrupt) stops it with every finished clip committed and raises RunInterrupted. `timings`, if given,
    collects the seconds the batched local loop spent per stage (transcription per recogniser, analysis per kind)."""
    from .store import RunStore

    log = log or (lambda msg: print(msg, file=sys.stderr))
    store = RunStore(out_dir)
    made = None  # what this call created, removed again if the run fails before committing anything
    if resume:
        if not os.path.isdir(out_dir):
            raise FileNotFoundError(f"--out {out_dir}: no such directory, so no DataFlux run to resume")
        if not store.exists():
            raise FileNotFoundError(f"{out_dir}: no DataFlux run to resume (manifest.json missing)")
        saved = store.load_config()
        config, audio_dir = saved["config"], saved["audio_dir"]
        cleaned = store.recover()
        if cleaned["removed_files"] or cleaned["truncated_bytes"]:
            log(f"resume: rolled back uncommitted output {cleaned}")
        files = None
    else:
        files = check_run_arguments(audio_dir, out_dir)
        config = config or load_config()
        audio_dir = os.path.abspath(audio_dir)
        made = _created_paths(store.out)
        store.create({"config": config, "audio_dir": audio_dir})
    try:
        return _run(store, audio_dir, config, files, progress, limit, log, timings)
    except KeyboardInterrupt as exc:
        done = len(store.manifest["done"])
        raise RunInterrupted(f"{done} clip(s) committed in {store.out}; continue with: eureka-audio dataflux "
                             f"resume --out {out_dir}") from exc
    except BaseException:
        if made is not None and not store.manifest["done"]:
            _remove(store.out, made)
        raise


def _created_paths(out: str):
    """The paths RunStore.create will make under `out` that do not exist yet (`out` itself if it is missing)."""
    from .store import LEDGERS, MANIFEST, SHARD_DIRS

    if not os.path.exists(out):
        return [out]
    names = [MANIFEST, "run_config.json", *LEDGERS, *SHARD_DIRS]
    return [os.path.join(out, n) for n in names if not os.path.exists(os.path.join(out, n))]


def _remove(out: str, paths):
    import shutil

    for path in paths:
        if os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
        elif os.path.exists(path):
            os.remove(path)
    if os.path.isdir(out):  # leftovers of an atomic write that was cut short
        for fn in os.listdir(out):
            if ".tmp-" in fn:
                os.remove(os.path.join(out, fn))


def _run(store, audio_dir, config, files, progress, limit, log, timings=None) -> dict:
    from .audio_io import list_audio_files
    from .pipeline import clip_id_for
    from .stats import format_table, write_stats

    if files is None:
        files = list_audio_files(audio_dir)
    if limit:
        files = files[:limit]
    items = [(clip_id_for(p, audio_dir), p) for p in files]
    ids = [cid for cid, _ in items]
    if len(set(ids)) != len(ids):
        raise RuntimeError("clip id collision; this should not happen (ids include a path hash)")
    done = store.done_ids
    todo = [it for it in items if it[0] not in done]
    p = config["pipeline"]
    batch_size = int(p.get("batch_size") or DEFAULT_CONFIG["pipeline"]["batch_size"])
    log(f"dataflux: {len(items)} clips in {audio_dir}, {len(items) - len(todo)} already done, {len(todo)} to do; "
        f"executor={p['executor']} workers={p['workers']}"
        + (f" batch_size={batch_size}" if p["executor"] == "local" else "") + f" out={store.out}")
    store.mark_complete(False)
    t0 = time.perf_counter()
    if todo:
        if p["executor"] == "ray":
            from .executors import iter_ray

            stream = iter_ray(todo, config, int(p["workers"]), batch_size=int(p.get("ray_batch_size") or 4),
                              address=p.get("ray_address"), num_cpus=p.get("ray_num_cpus"))
        else:
            from .executors import iter_local

            stream = iter_local(todo, config, int(p["workers"]), batch_size=batch_size, timings=timings)
        _drain(stream, store, int(p["shard_size"]), len(todo), progress)
    elapsed = time.perf_counter() - t0
    store.mark_complete(True)
    stats = write_stats(store)
    stats["run"] = {"clips_this_session": len(todo), "seconds": round(elapsed, 2),
                    "clips_per_second": round(len(todo) / elapsed, 4) if todo and elapsed > 0 else None}
    log(format_table(stats))
    if todo:
        log(f"processed {len(todo)} clips in {elapsed:.1f} s ({len(todo) / max(elapsed, 1e-9):.3f} clips/s)")
    return stats


def _drain(stream, store, shard_size: int, total: int, progress: bool):
    """Commit every clip as it finishes (appended to the open shard of `shard_size` clips), so that an interruption
    or a kill loses only the clips still in flight."""
    from tqdm import tqdm

    kept = rejected = failed = 0
    bar = tqdm(total=total, unit="clip", disable=not progress, dynamic_ncols=True, desc="dataflux")
    try:
        for result in stream:
            store.commit([result], shard_size=shard_size)
            kept += len(result.kept)
            rejected += len(result.rejected)
            failed += result.status != "ok"
            bar.update(1)
            bar.set_postfix(kept=kept, rejected=rejected, failed_clips=failed, refresh=False)
    finally:
        bar.close()
