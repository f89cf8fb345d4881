"""Run directory layout, atomic shard commits and the resume manifest.

OUT/
  run_config.json     the resolved config of the run (resume reads it)
  manifest.json       committed state: done clip ids, shard files, byte sizes of the append-only ledgers
  captions.jsonl      one record per captioned clip (id, audio, caption, facts, provenance)
  clips.jsonl         one ledger line per processed clip (status, reason, counts, fault events, seconds)
  data/part-NNNNN.jsonl       kept training records (INTERFACES.md conversation format)
  rejected/part-NNNNN.jsonl   everything generated and not kept, and failed clips, each with `reason`
  stats.json, stats.txt       the report (written at the end of a run)

Commit protocol for finished clips (the driver commits every clip as soon as it finishes, so an interruption loses
only the clips in flight): append the clips' records to the open shard files (`part-N`, which takes `shard_size`
clips before the next one is opened) and fsync; append to the ledgers and fsync; then atomically replace
manifest.json (write temp + fsync + rename), which records every file's committed byte size. A crash before the
manifest replace leaves bytes or files the manifest does not know: on resume unknown files are deleted and shards
and ledgers truncated to the manifest's sizes, and those clips are processed again. A clip is therefore either
fully in the output exactly once or not at all.
"""
from __future__ import annotations

import json
import os
import time

from ..fsutil import atomic_write  # also used by stats.py

MANIFEST = "manifest.json"
LEDGERS = ("captions.jsonl", "clips.jsonl")
SHARD_DIRS = ("data", "rejected")
_CRASH_ENV = "EUREKA_DATAFLUX_CRASH_AT"  # test hook: "<point>:<n>" exits hard at the n-th time `point` is reached
# test hook: "<point>:<n>:<seconds>" sleeps at the n-th time `point` is reached, so an interrupt test can signal a
# run that is certainly still going (a batch commits its clips within milliseconds of each other)
_PAUSE_ENV = "EUREKA_DATAFLUX_PAUSE_AT"


def jsonl_bytes(records) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in records).encode("utf-8")


_crash_counts: dict = {}


def crash_point(name: str):
    """Test hooks for kill-at-any-point and interrupt tests; no-ops unless EUREKA_DATAFLUX_CRASH_AT or
    EUREKA_DATAFLUX_PAUSE_AT names this point."""
    pause = os.environ.get(_PAUSE_ENV)
    if pause:
        point, nth, seconds = (pause.split(":") + ["1", "30"])[:3]
        if point == name:
            key = "pause:" + name
            _crash_counts[key] = _crash_counts.get(key, 0) + 1
            if _crash_counts[key] == int(nth or 1):
                time.sleep(float(seconds))
    spec = os.environ.get(_CRASH_ENV)
    if not spec:
        return
    point, _, nth = spec.partition(":")
    if point != name:
        return
    _crash_counts[name] = _crash_counts.get(name, 0) + 1
    if _crash_counts[name] >= int(nth or 1):
        os._exit(77)  # like SIGKILL: no cleanup, no flush


def _append(path: str, data: bytes) -> None:
    with open(path, "ab") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


class RunStore:
    def __init__(self, out_dir: str):
        self.out = os.path.abspath(out_dir)
        self.manifest = {"version": 1, "done": [], "failed": [], "shards": [], "sizes": {k: 0 for k in LEDGERS},
                         "next_shard": 0, "shard_clips": 0, "complete": False}

    # ---------------------------------------------------------------- setup / recovery
    def exists(self) -> bool:
        return os.path.exists(os.path.join(self.out, MANIFEST))

    def create(self, run_config: dict):
        os.makedirs(self.out, exist_ok=True)
        for d in SHARD_DIRS:
            os.makedirs(os.path.join(self.out, d), exist_ok=True)
        atomic_write(os.path.join(self.out, "run_config.json"),
                     json.dumps(run_config, indent=2, sort_keys=True).encode())
        for name in LEDGERS:
            atomic_write(os.path.join(self.out, name), b"")
        self._write_manifest()

    def load_config(self) -> dict:
        with open(os.path.join(self.out, "run_config.json"), encoding="utf-8") as fh:
            return json.load(fh)

    def recover(self) -> dict:
        """Load the manifest and roll the directory back to it. Returns a summary of what was cleaned up."""
        with open(os.path.join(self.out, MANIFEST), encoding="utf-8") as fh:
            self.manifest = json.load(fh)
        known = set(self.manifest["shards"])
        removed = []
        for d in SHARD_DIRS:
            full = os.path.join(self.out, d)
            os.makedirs(full, exist_ok=True)
            for fn in os.listdir(full):
                rel = f"{d}/{fn}"
                if rel not in known:  # uncommitted shard or leftover temp file
                    os.remove(os.path.join(full, fn))
                    removed.append(rel)
        truncated = {}
        sizes = self.manifest["sizes"]
        # ledgers always; shards when the manifest records their size (an appended, still open shard)
        for name in list(LEDGERS) + [rel for rel in self.manifest["shards"] if rel in sizes]:
            path = os.path.join(self.out, name)
            size = sizes.get(name, 0)
            if not os.path.exists(path):
                if name not in LEDGERS:
                    raise RuntimeError(f"{path} is missing but the manifest lists it as committed; "
                                       "the run directory was modified outside DataFlux")
                open(path, "wb").close()
            actual = os.path.getsize(path)
            if actual != size:
                if actual < size:
                    raise RuntimeError(f"{path} is shorter ({actual} B) than the manifest records ({size} B); "
                                       "the run directory was modified outside DataFlux")
                with open(path, "r+b") as fh:
                    fh.truncate(size)
                    fh.flush()
                    os.fsync(fh.fileno())
                truncated[name] = actual - size
        for fn in os.listdir(self.out):
            if ".tmp-" in fn:
                os.remove(os.path.join(self.out, fn))
        return {"removed_files": removed, "truncated_bytes": truncated}

    @property
    def done_ids(self) -> set:
        return set(self.manifest["done"])

    # ---------------------------------------------------------------- commit
    def commit(self, results, shard_size: int | None = None):
        """Commit finished ClipResults atomically (see module docstring). shard_size: clips per shard file; the
        records are appended to the open shard until it holds that many clips. None: each call writes its own
        shard."""
        if not results:
            return
        n = self.manifest["next_shard"]
        kept = [r for res in results for r in res.kept]
        rejected = [r for res in results for r in res.rejected]
        sizes = dict(self.manifest["sizes"])
        new_shards = []
        for d, records in (("data", kept), ("rejected", rejected)):
            if records:
                rel = f"{d}/part-{n:05d}.jsonl"
                path = os.path.join(self.out, rel)
                if shard_size is None:
                    atomic_write(path, jsonl_bytes(records))
                else:
                    _append(path, jsonl_bytes(records))
                    sizes[rel] = os.path.getsize(path)
                if rel not in self.manifest["shards"]:
                    new_shards.append(rel)
                crash_point("after_shard")
        captions = [res.caption_record for res in results if res.caption_record is not None]
        ledger = [{"id": res.clip_id, "audio": res.path, "status": res.status, "reason": res.reason,
                   "kept": len(res.kept), "rejected": len(res.rejected), "events": res.events,
                   "seconds": round(res.seconds, 3)} for res in results]
        for name, records in (("captions.jsonl", captions), ("clips.jsonl", ledger)):
            path = os.path.join(self.out, name)
            _append(path, jsonl_bytes(records))
            sizes[name] = os.path.getsize(path)
            crash_point("after_ledger")
        self.manifest["done"] += [res.clip_id for res in results]
        self.manifest["failed"] += [res.clip_id for res in results if res.status != "ok"]
        self.manifest["shards"] += new_shards
        self.manifest["sizes"] = sizes
        in_shard = self.manifest.get("shard_clips", 0) + len(results)
        if shard_size is None or in_shard >= shard_size:
            self.manifest["next_shard"], self.manifest["shard_clips"] = n + 1, 0
        else:
            self.manifest["shard_clips"] = in_shard
        self._write_manifest()
        crash_point("after_manifest")

    def mark_complete(self, complete: bool = True):
        self.manifest["complete"] = complete
        self._write_manifest()

    def _write_manifest(self):
        atomic_write(os.path.join(self.out, MANIFEST), json.dumps(self.manifest, sort_keys=True).encode())

    # ---------------------------------------------------------------- reading back
    def read_jsonl(self, rel: str):
        """Records of a file, only its committed part where the manifest records a size (a run still going may
        have appended past it)."""
        path = os.path.join(self.out, rel)
        size = self.manifest.get("sizes", {}).get(rel)
        with open(path, "rb") as fh:
            data = fh.read() if size is None else fh.read(size)
        return [json.loads(line) for line in data.decode("utf-8").splitlines() if line.strip()]

    def records(self, kind: str):
        out = []
        for rel in self.manifest["shards"]:
            if rel.startswith(kind + "/"):
                out += self.read_jsonl(rel)
        return out
