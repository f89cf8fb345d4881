"""Executors: run `process_clip` over many clips and hand finished ClipResults back to the driver, which commits.

- local (default): one asyncio loop in this process; `workers` clips in flight; built-in roles run their CPU work
  in threads, HTTP roles are async with per-role concurrency limits.
- ray: clips go to Ray tasks in batches (same pipeline code); each worker process builds the roles once from the
  config and keeps them. Needs `pip install eureka_fast[ray]`.
"""
from __future__ import annotations

import asyncio


def iter_local(items, config: dict, workers: int):
    """Yield ClipResults as clips finish. `items` = [(clip_id, path)]. The event loop runs in a background thread
    and hands results over through a queue, so the caller commits while other clips keep running."""
    import queue
    import threading

    from .pipeline import process_clip

    roles, taxonomy, settings = _materialise(config)
    results: queue.Queue = queue.Queue()
    done = object()
    stop = threading.Event()

    async def main():
        sem = asyncio.Semaphore(max(1, workers))

        async def one(cid, path):
            async with sem:
                if stop.is_set():
                    return
                results.put(await process_clip(cid, path, roles, taxonomy, settings))

        try:
            await asyncio.gather(*(one(cid, p) for cid, p in items))
        finally:
            await roles.aclose()

    def runner():
        try:
            asyncio.run(main())
            results.put(done)
        except BaseException as exc:  # surfaced in the caller's thread
            results.put(exc)

    thread = threading.Thread(target=runner, name="dataflux-local-executor", daemon=True)
    thread.start()
    try:
        while True:
            item = results.get()
            if item is done:
                break
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()  # the caller stopped early (error / interrupt): start no new clips
        thread.join(timeout=5)


_WORKER_STATE: dict = {}


def _materialise(config: dict):
    from .pipeline import Settings
    from .roles import build_roles
    from .taxonomy import load_taxonomy

    p = config.get("pipeline", {})
    taxonomy = load_taxonomy(p.get("taxonomy"))
    roles = build_roles(config.get("roles"), taxonomy)
    cats = p.get("categories")
    settings = Settings(rounds=int(p.get("rounds", 3)), questions_per_category=int(p.get("questions_per_category", 5)),
                        seed=int(p.get("seed", 0)), categories=tuple(cats) if cats else None)
    return roles, taxonomy, settings


def _ray_process_batch(config: dict, items):
    """Runs inside a Ray worker: build roles once per worker process, process a batch of clips."""
    import json

    from .pipeline import process_clip

    key = json.dumps(config, sort_keys=True)
    if _WORKER_STATE.get("key") != key:
        _WORKER_STATE.clear()
        _WORKER_STATE["key"] = key
        _WORKER_STATE["parts"] = _materialise(config)
    roles, taxonomy, settings = _WORKER_STATE["parts"]
    workers = int(config.get("pipeline", {}).get("workers_per_task", 2))

    async def main():
        sem = asyncio.Semaphore(workers)

        async def one(cid, path):
            async with sem:
                return await process_clip(cid, path, roles, taxonomy, settings)

        try:
            return await asyncio.gather(*(one(cid, p) for cid, p in items))
        finally:
            await roles.aclose()

    return asyncio.run(main())


def iter_ray(items, config: dict, workers: int, batch_size: int = 4, address: str | None = None,
             num_cpus: int | None = None):
    """Yield ClipResults from Ray tasks, `workers` tasks in flight, `batch_size` clips per task."""
    import ray

    if not ray.is_initialized():
        kwargs = {"ignore_reinit_error": True, "include_dashboard": False, "log_to_driver": False}
        if address:
            kwargs["address"] = address
        elif num_cpus:
            kwargs["num_cpus"] = num_cpus
        ray.init(**kwargs)
    remote = ray.remote(_ray_process_batch)
    config_ref = ray.put(config)
    batches = [items[i: i + batch_size] for i in range(0, len(items), batch_size)]
    pending = {}
    nxt = 0
    while nxt < len(batches) or pending:
        while nxt < len(batches) and len(pending) < max(1, workers):
            ref = remote.remote(config_ref, batches[nxt])
            pending[ref] = batches[nxt]
            nxt += 1
        done, _ = ray.wait(list(pending), num_returns=1)
        for ref in done:
            pending.pop(ref)
            for result in ray.get(ref):
                yield result
