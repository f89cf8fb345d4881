"""Executors: run `process_clip` over many clips and hand finished ClipResults back to the driver, which commits.

- local (default): one asyncio loop in this process. With `batch_size` > 1 (the default, 8) clips go through in
  batches: a batch is read, every recogniser transcribes its clips together (Whisper's windows through one encoder
  call and one decode), the roles' signal analysis of its clips runs in a pool of `workers` processes, then each
  clip's questions, answers and verdicts run and the clip is handed back as soon as it is done. While one batch is
  analysed and questioned, the next one is read and transcribed. With `batch_size` 1 clips go one at a time,
  `workers` of them in flight. Built-in roles run their CPU work in threads, HTTP roles are async with per-role
  concurrency limits.
- ray: clips go to Ray tasks in batches (same pipeline code); each worker process builds the roles once from the
  config and keeps them. Needs `pip install eureka_fast[ray]`.
"""
from __future__ import annotations

import asyncio


def iter_local(items, config: dict, workers: int, batch_size: int = 1, timings: dict | None = None):
    """Yield ClipResults as clips finish. `items` = [(clip_id, path)]. The event loop runs in a background thread
    and hands results over through a queue, so the caller commits while other clips keep running. `timings`, if
    given, collects seconds spent per stage of the batched loop (transcription, analysis)."""
    import queue
    import threading

    from .pipeline import ClipResult, analyse_batch, load_clip, process_clip, process_context, transcribe_batch

    roles, taxonomy, settings = _materialise(config)
    results: queue.Queue = queue.Queue()
    done = object()
    stop = threading.Event()
    batched = batch_size > 1
    # no processes for roles that analyse nothing themselves (HTTP roles)
    pool = AnalysisPool(workers if roles.measures_signal() else 0) if batched else None

    async def one_at_a_time():
        sem = asyncio.Semaphore(max(1, workers))

        async def one(cid, path):
            async with sem:
                if stop.is_set():
                    return
                results.put(await process_clip(cid, path, roles, taxonomy, settings))

        await asyncio.gather(*(one(cid, p) for cid, p in items))

    async def in_batches():
        sem = asyncio.Semaphore(max(1, workers))  # clips whose questions run at once (HTTP roles wait on servers)

        async def finish(ctxs):
            async def one(ctx):
                # the batch's analysis jobs are all queued at once; each clip goes on as soon as its own are done
                await analyse_batch([ctx], roles, run_jobs=pool.run, timings=timings)
                async with sem:
                    if not stop.is_set():
                        results.put(await process_context(ctx, roles, taxonomy, settings))

            await asyncio.gather(*(one(c) for c in ctxs))

        previous = None
        try:
            for start in range(0, len(items), batch_size):
                if stop.is_set():
                    break
                loaded = await asyncio.gather(*(load_clip(cid, p, settings)
                                                for cid, p in items[start:start + batch_size]))
                ctxs = []
                for item in loaded:
                    if isinstance(item, ClipResult):  # unreadable: rejected now, its neighbours go on
                        results.put(item)
                    else:
                        ctxs.append(item)
                # this batch's transcription overlaps the previous batch's analysis and questions
                await transcribe_batch(ctxs, roles, batch_size=batch_size, timings=timings)
                if previous is not None:
                    await previous
                previous = asyncio.ensure_future(finish(ctxs))
            if previous is not None:
                await previous
        finally:
            if previous is not None and not previous.done():
                previous.cancel()

    async def main():
        try:
            await (in_batches() if batched else one_at_a_time())
        finally:
            await roles.aclose()

    def runner():
        try:
            asyncio.run(main())
            results.put(done)
        except BaseException as exc:  # surfaced in the caller's thread
            results.put(exc)

    if pool is not None:
        pool.start()  # the workers start up while the first batch is read and transcribed
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
        if pool is not None:
            pool.close()


class AnalysisPool:
    """Runs analysis jobs [(function, args)] in `workers` processes (started on first use, spawned so that no
    thread state of this process is inherited; 0: in threads of this process). A job's exception is returned in
    its place. If the pool itself breaks (a worker killed), its jobs run in threads from then on."""

    def __init__(self, workers: int):
        self.workers = max(0, int(workers))
        self._executor = None
        self._broken = False
        self._closed = False

    def start(self):
        """Start the worker processes now (each imports the analysis code once) instead of at the first job.
        Called from the main thread, the workers are started with Ctrl-C ignored, so that a Ctrl-C to the process
        group while one is still starting up does not kill it mid-import; the driver stops them."""
        import signal
        import threading

        pool = self._pool()
        if pool is None:
            return
        main = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if main else None
        try:
            for _ in range(self.workers):  # one process is started per job submitted while none is idle
                pool.submit(_worker_ready)
        finally:
            if main:
                signal.signal(signal.SIGINT, previous)

    def _pool(self):
        if self._executor is None and self.workers > 0 and not self._broken and not self._closed:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            self._executor = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"),
                                                 initializer=_worker_init)
        return self._executor if not self._broken else None

    async def run(self, jobs) -> list:
        from concurrent.futures.process import BrokenProcessPool

        from .pipeline import timed_call

        if self._closed:  # the run is stopping: its clips will not be finished, so nothing is measured
            return [RuntimeError("the analysis pool was closed")] * len(jobs)
        pool = self._pool()
        if pool is None:
            return await asyncio.gather(*(asyncio.to_thread(timed_call, fn, args) for fn, args in jobs),
                                        return_exceptions=True)
        loop = asyncio.get_running_loop()
        out = await asyncio.gather(*(loop.run_in_executor(pool, timed_call, fn, args) for fn, args in jobs),
                                   return_exceptions=True)
        if any(isinstance(r, BrokenProcessPool) for r in out) and not self._closed:
            self._broken = True
            self._shutdown()
            redo = [i for i, r in enumerate(out) if isinstance(r, BrokenProcessPool)]
            again = await asyncio.gather(*(asyncio.to_thread(timed_call, *jobs[i]) for i in redo),
                                         return_exceptions=True)
            for i, r in zip(redo, again):
                out[i] = r
        return out

    def close(self):
        """Stop the workers (each finishes the job it is on); no job runs after this."""
        self._closed = True
        self._shutdown()

    def _shutdown(self):
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None


def _worker_init():
    import multiprocessing
    import multiprocessing.connection
    import os
    import signal
    import threading

    # Ctrl-C reaches the whole process group: the driver decides what to keep, the workers just stop with it
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    parent = multiprocessing.parent_process()
    if parent is not None:
        def exit_with_parent():
            # a killed driver never shuts the pool down, and its workers would wait for jobs forever
            multiprocessing.connection.wait([parent.sentinel])
            os._exit(0)

        threading.Thread(target=exit_with_parent, name="dataflux-exit-with-driver", daemon=True).start()


def _worker_ready():
    # the analysis code and the packages it loads lazily, imported once per worker before the first job arrives
    import parselmouth  # noqa: F401
    import scipy.linalg  # noqa: F401
    import scipy.signal  # noqa: F401
    import webrtcvad  # noqa: F401

    from . import builtin_roles, captioner, roles  # noqa: F401


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
