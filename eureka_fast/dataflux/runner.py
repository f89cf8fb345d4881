"""Driver: list clips, skip what the manifest says is done, run an executor, commit finished clips in shards,
show progress, write stats. `run_dataflux` is what `eureka-audio dataflux run|resume` calls."""
from __future__ import annotations

import copy
import os
import sys
import time

import yaml

DEFAULT_CONFIG = {
    "pipeline": {"rounds": 3, "questions_per_category": 5, "shard_size": 200, "executor": "local", "workers": 2,
                 "seed": 0, "taxonomy": None, "categories": None, "ray_address": None, "ray_num_cpus": None,
                 "ray_batch_size": 4},
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
    if cfg["pipeline"]["executor"] not in ("local", "ray"):
        raise ConfigError(f"pipeline.executor must be local or ray, got {cfg['pipeline']['executor']!r}")
    if cfg["pipeline"]["taxonomy"]:
        cfg["pipeline"]["taxonomy"] = os.path.abspath(cfg["pipeline"]["taxonomy"])
    return cfg


def run_dataflux(audio_dir: str | None, out_dir: str, config: dict | None = None, *, resume: bool = False,
                 progress: bool = True, limit: int | None = None, log=None) -> dict:
    """Run (or resume) a DataFlux job. Returns the stats dict."""
    from .audio_io import list_audio_files
    from .pipeline import clip_id_for
    from .stats import format_table, write_stats
    from .store import RunStore

    log = log or (lambda msg: print(msg, file=sys.stderr))
    store = RunStore(out_dir)
    if resume:
        if not store.exists():
            raise FileNotFoundError(f"{out_dir}: no DataFlux run to resume (manifest.json missing)")
        saved = store.load_config()
        config, audio_dir = saved["config"], saved["audio_dir"]
        cleaned = store.recover()
        if cleaned["removed_files"] or cleaned["truncated_bytes"]:
            log(f"resume: rolled back uncommitted output {cleaned}")
    else:
        if store.exists():
            raise FileExistsError(f"{out_dir} already holds a DataFlux run; use `eureka-audio dataflux resume --out "
                                  f"{out_dir}` to continue it, or choose a new --out")
        config = config or load_config()
        audio_dir = os.path.abspath(audio_dir)
        store.create({"config": config, "audio_dir": audio_dir})
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
    log(f"dataflux: {len(items)} clips in {audio_dir}, {len(items) - len(todo)} already done, {len(todo)} to do; "
        f"executor={p['executor']} workers={p['workers']} out={store.out}")
    store.mark_complete(False)
    t0 = time.perf_counter()
    if todo:
        if p["executor"] == "ray":
            from .executors import iter_ray

            stream = iter_ray(todo, config, int(p["workers"]), batch_size=int(p.get("ray_batch_size") or 4),
                              address=p.get("ray_address"), num_cpus=p.get("ray_num_cpus"))
        else:
            from .executors import iter_local

            stream = iter_local(todo, config, int(p["workers"]))
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
    from tqdm import tqdm

    batch = []
    kept = rejected = failed = 0
    bar = tqdm(total=total, unit="clip", disable=not progress, dynamic_ncols=True, desc="dataflux")
    try:
        for result in stream:
            batch.append(result)
            kept += len(result.kept)
            rejected += len(result.rejected)
            failed += result.status != "ok"
            bar.update(1)
            bar.set_postfix(kept=kept, rejected=rejected, failed_clips=failed, refresh=False)
            if len(batch) >= shard_size:
                store.commit(batch)
                batch = []
        store.commit(batch)
    finally:
        bar.close()
