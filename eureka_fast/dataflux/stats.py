"""The run report: per category generated / kept / hard / discarded-by-reason / agreement, plus clip and fault
totals. Computed from the committed output only, so a resumed run reports exactly what an uninterrupted one would
(timings aside)."""
from __future__ import annotations

import json
import os
from collections import Counter, defaultdict


def compute_stats(store) -> dict:
    kept = store.records("data")
    rejected = store.records("rejected")
    clips = _committed_ledger(store, "clips.jsonl")
    per = defaultdict(lambda: {"path": None, "generated": 0, "kept": 0, "hard": 0, "weak_match": 0,
                               "discarded": Counter(), "judged": 0, "agreed": 0, "units_rejected": Counter()})
    for r in kept:
        c = per[r["meta"]["category_id"]]
        c["path"] = " > ".join(r["meta"]["category"])
        c["generated"] += 1
        c["kept"] += 1
        c["judged"] += 1
        c["agreed"] += bool(r["meta"]["verdict"]["consensus"])
        c["hard"] += bool(r["meta"]["hard"])
        c["weak_match"] += r["meta"]["verdict"]["consistency_with_caption"] == "WEAK_MATCH"
    clip_failures = Counter()
    for r in rejected:
        if r.get("stage") == "clip":
            clip_failures[r["reason"]] += 1
            continue
        c = per[r["category_id"]]
        c["path"] = " > ".join(r["category"])
        if r["stage"] == "generate":
            c["units_rejected"][r["reason"]] += 1
            continue
        c["generated"] += 1
        c["discarded"][r["reason"]] += 1
        if r["stage"] == "judge":
            c["judged"] += 1
            c["agreed"] += bool(r["verdict"]["consensus"])
    categories = {}
    for cid in sorted(per):
        c = per[cid]
        categories[cid] = {
            "path": c["path"], "generated": c["generated"], "kept": c["kept"], "hard": c["hard"],
            "weak_match": c["weak_match"], "discarded": sum(c["discarded"].values()),
            "discarded_by_reason": dict(sorted(c["discarded"].items())),
            "units_rejected_by_reason": dict(sorted(c["units_rejected"].items())),
            "judged": c["judged"], "agreement_rate": round(c["agreed"] / c["judged"], 4) if c["judged"] else None,
            "keep_rate": round(c["kept"] / c["generated"], 4) if c["generated"] else None,
        }
    events = Counter()
    for line in clips:
        events.update(line.get("events") or {})
    rounds = Counter(r["meta"]["round"] for r in kept)
    total_generated = sum(v["generated"] for v in categories.values())
    return {
        "clips": {"total": len(clips), "ok": sum(1 for x in clips if x["status"] == "ok"),
                  "failed": sum(1 for x in clips if x["status"] != "ok"), "failed_by_reason": dict(clip_failures)},
        "questions": {"generated": total_generated, "kept": len(kept),
                      "hard": sum(v["hard"] for v in categories.values()),
                      "discarded": sum(v["discarded"] for v in categories.values()),
                      "kept_by_round": {str(k): v for k, v in sorted(rounds.items())}},
        "categories": categories,
        "backend_events": dict(sorted(events.items())),
    }


def _committed_ledger(store, name):
    """Ledger lines covered by the manifest (a run still in progress may have appended more)."""
    size = store.manifest["sizes"].get(name, 0)
    with open(os.path.join(store.out, name), "rb") as fh:
        data = fh.read(size)
    return [json.loads(line) for line in data.decode("utf-8").splitlines() if line.strip()]


def format_table(stats: dict) -> str:
    rows = [("category", "generated", "kept", "hard", "discarded", "agree", "top discard reasons")]
    for cid, c in stats["categories"].items():
        reasons = ", ".join(f"{k}={v}" for k, v in sorted(c["discarded_by_reason"].items(), key=lambda kv: -kv[1])[:3])
        units = ", ".join(f"unit:{k}={v}" for k, v in c["units_rejected_by_reason"].items())
        rows.append((cid, str(c["generated"]), str(c["kept"]), str(c["hard"]), str(c["discarded"]),
                     "-" if c["agreement_rate"] is None else f"{100 * c['agreement_rate']:.0f}%",
                     "; ".join(x for x in (reasons, units) if x) or "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    cl, q = stats["clips"], stats["questions"]
    lines.append("")
    lines.append(f"clips: {cl['total']} ({cl['ok']} ok, {cl['failed']} failed"
                 + (f": {cl['failed_by_reason']}" if cl["failed"] else "") + ")")
    lines.append(f"questions: {q['generated']} generated, {q['kept']} kept ({q['hard']} hard), "
                 f"{q['discarded']} discarded; kept by round {q['kept_by_round']}")
    if stats["backend_events"]:
        lines.append("backend events: " + ", ".join(f"{k}={v}" for k, v in stats["backend_events"].items()))
    return "\n".join(lines)


def write_stats(store) -> dict:
    from .store import atomic_write

    stats = compute_stats(store)
    atomic_write(os.path.join(store.out, "stats.json"), json.dumps(stats, indent=2, sort_keys=True).encode())
    atomic_write(os.path.join(store.out, "stats.txt"), (format_table(stats) + "\n").encode())
    return stats
