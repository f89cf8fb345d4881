"""The closed loop for one clip: caption -> per category: generate -> dedupe -> answer x2 -> judge -> regenerate.

`process_clip` (= `load_clip` + `process_context`) returns a ClipResult holding everything the clip produced
(caption record, kept training records, rejected records with reasons, fault counters). `transcribe_batch` and
`analyse_batch` do the per-clip work of many read clips together before their loops run (batched speech
recognition, signal analysis in parallel); the loops then read the results from each clip's cache, so a clip's
records are the same whether it was prepared in a batch or not. Nothing is written here: the driver commits whole
clips atomically, which is what makes runs resumable without loss or duplication.

Accounting: every question a generator produced ends in exactly one place: a kept record (data/), or a rejected
record with `reason` (judge discard, near-duplicate, answerer/judge failure, over quota). Every (clip, category)
unit that produced no questions leaves one rejected unit record (category mismatch, generator failure).
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import os
import re
import sys
import threading
import time

from .http_backend import BackendError
from .schemas import FormatError, near_duplicate, parse_question, parse_trace

SYSTEM_PROMPT = "You are a helpful audio assistant. Listen to the audio and answer the question."


@dataclasses.dataclass
class Settings:
    rounds: int = 3
    questions_per_category: int = 5
    seed: int = 0
    categories: tuple | None = None  # restrict to these category ids


@dataclasses.dataclass
class ClipResult:
    clip_id: str
    path: str
    status: str  # ok | failed
    reason: str | None
    caption_record: dict | None
    kept: list
    rejected: list
    events: dict
    seconds: float


def clip_id_for(path: str, root: str) -> str:
    """Stable, readable, collision-free id from the path relative to the audio root."""
    rel = os.path.relpath(os.path.abspath(path), os.path.abspath(root))
    slug = re.sub(r"[^A-Za-z0-9]+", "_", os.path.splitext(rel)[0]).strip("_")[-60:] or "clip"
    digest = hashlib.sha1(rel.encode("utf-8")).hexdigest()[:8]
    return f"{slug}-{digest}"


async def process_clip(clip_id: str, path: str, roles, taxonomy, settings: Settings) -> ClipResult:
    loaded = await load_clip(clip_id, path, settings)
    if isinstance(loaded, ClipResult):
        return loaded
    return await process_context(loaded, roles, taxonomy, settings)


async def load_clip(clip_id: str, path: str, settings: Settings):
    """The clip's ClipContext, or a failed ClipResult (reason unreadable_audio / audio_too_long) when it cannot be
    read. The context remembers when reading started, so the clip's `seconds` cover its whole processing."""
    from .audio_io import ClipReadError, read_clip_or_reject
    from .roles import ClipContext

    t0 = time.perf_counter()
    abspath = os.path.abspath(path)
    try:
        audio = await asyncio.to_thread(read_clip_or_reject, abspath)
    except ClipReadError as exc:
        return _failed(clip_id, abspath, exc.reason, str(exc), {}, t0)
    return ClipContext(clip_id=clip_id, path=abspath, audio=audio, seed=settings.seed, started=t0)


async def process_context(ctx, roles, taxonomy, settings: Settings) -> ClipResult:
    """The closed loop for one read clip: caption, then every category (module docstring)."""
    clip_id, abspath = ctx.clip_id, ctx.path
    t0 = ctx.started if ctx.started is not None else time.perf_counter()
    try:
        caption, facts = await roles.captioner.caption(ctx)
    except BackendError as exc:
        return _failed(clip_id, abspath, f"captioner_{exc.kind}", str(exc), ctx.events, t0)
    except Exception as exc:  # a signal-analysis bug on one odd clip must not stop the run
        return _failed(clip_id, abspath, "captioner_error", f"{type(exc).__name__}: {exc}", ctx.events, t0)
    names = roles.names()
    caption_record = {"id": clip_id, "audio": abspath, "caption": caption, "facts": facts,
                      "provenance": {"captioner": names["captioner"]}}
    cats = [c for c in taxonomy if not settings.categories or c.id in settings.categories]
    results = await asyncio.gather(*(_run_category(ctx, c, caption, facts, roles, settings, names) for c in cats),
                                   return_exceptions=True)
    kept, rejected = [], []
    for cat, res in zip(cats, results):
        if isinstance(res, BaseException):
            if not isinstance(res, Exception):
                raise res  # KeyboardInterrupt / cancellation: stop, the clip is not committed and will be redone
            # a bug or an unexpected error in one role on one clip must not stop the run: record the whole unit
            rejected.append({"id": f"{clip_id}-{cat.id}-error", "clip_id": clip_id, "category_id": cat.id,
                             "category": list(cat.path), "stage": "generate", "round": None,
                             "reason": "internal_error", "detail": f"{type(res).__name__}: {res}"})
            ctx.events["pipeline.internal_error"] += 1
            continue
        kept += res[0]
        rejected += res[1]
    return ClipResult(clip_id, abspath, "ok", None, caption_record, kept, rejected, dict(ctx.events),
                      time.perf_counter() - t0)


def _failed(clip_id, path, reason, detail, events, t0):
    rec = {"id": clip_id, "clip_id": clip_id, "audio": path, "stage": "clip", "reason": reason, "detail": detail}
    return ClipResult(clip_id, path, "failed", reason, None, [], [rec], dict(events), time.perf_counter() - t0)


async def _run_category(ctx, category, caption, facts, roles, settings, names):
    target = settings.questions_per_category
    kept, rejected = [], []
    kept_stems: list[str] = []
    feedback: list[str] = []
    unit = f"{ctx.clip_id}-{category.id}"
    base_meta = {"clip_id": ctx.clip_id, "category_id": category.id, "category": list(category.path),
                 "backends": names}
    serial = 0
    for round_idx in range(1, settings.rounds + 1):
        need = target - len(kept)
        if need <= 0:
            break
        try:
            reply, intended = await roles.query_generator.generate(
                ctx, category, caption, facts, need, round_idx=round_idx, previous=list(kept_stems),
                feedback=feedback[-5:])
        except Exception as exc:  # BackendError, FormatError (invalid built-in output) or a generator bug
            kind = exc.kind if isinstance(exc, BackendError) else "malformed" if isinstance(exc, FormatError) \
                else "error"
            feedback.append(f"generator failed: {kind}")
            rejected.append({"id": f"{unit}-r{round_idx}", **base_meta, "stage": "generate", "round": round_idx,
                             "reason": f"generator_{kind}", "detail": str(exc)})
            continue
        if not reply["is_success"]:
            rejected.append({"id": f"{unit}-r{round_idx}", **base_meta, "stage": "generate", "round": round_idx,
                             "reason": "category_mismatch", "detail": "generator: the clip does not fit the category"})
            break  # the clip does not fit; asking again would not change that
        questions = reply["questions"]
        intended = intended or [None] * len(questions)
        # near-duplicate removal before spending answerer calls
        fresh = []
        for q, gold in zip(questions, intended):
            serial += 1
            qid = f"{unit}-g{serial}"
            stem, _ = parse_question(q)
            if any(near_duplicate(stem, s) for s in kept_stems + [parse_question(f[1])[0] for f in fresh]):
                rejected.append({"id": qid, **base_meta, "stage": "dedupe", "round": round_idx, "question": q,
                                 "reason": "near_duplicate"})
                continue
            fresh.append((qid, q, gold))
        outcomes = await asyncio.gather(*(_answer_and_judge(ctx, category, caption, facts, q, roles)
                                          for _, q, _ in fresh))
        for (qid, q, gold), (verdict, traces, error) in zip(fresh, outcomes):
            meta = {**base_meta, "round": round_idx, "intended_answer": gold}
            if error is not None:
                feedback.append(error)
                rejected.append({"id": qid, **meta, "stage": "answer_judge", "question": q,
                                 "reason": error.split(":")[0], "detail": error, "traces": traces})
                continue
            if verdict["final_action"] != "KEEP_USING_WINNER":
                feedback.append(f"discarded: {verdict['reasoning'][:200]}")
                rejected.append({"id": qid, **meta, "stage": "judge", "question": q,
                                 "reason": f"judge_discard_{verdict['consistency_with_caption'].lower()}",
                                 "verdict": verdict, "traces": traces})
                continue
            if len(kept) >= target:  # concurrent answers may overshoot the quota; keep order deterministic
                rejected.append({"id": qid, **meta, "stage": "quota", "question": q, "reason": "over_quota"})
                continue
            kept.append(_training_record(f"{unit}-q{len(kept) + 1}", ctx.path, category, q, verdict, traces, meta))
            kept_stems.append(parse_question(q)[0])
    return kept, rejected


async def _answer_and_judge(ctx, category, caption, facts, question, roles):
    """-> (verdict, traces, error string or None)."""
    traces = {}
    answers = await asyncio.gather(roles.answerer_a.answer(ctx, question), roles.answerer_b.answer(ctx, question),
                                   return_exceptions=True)
    for name, ans in zip(("A", "B"), answers):
        if isinstance(ans, Exception):  # BackendError after retries, or an error inside a built-in answerer
            traces[name] = None
            ctx.events[f"answerer_{name.lower()}.failed_item"] += 1
        elif isinstance(ans, BaseException):
            raise ans
        else:
            traces[name] = ans
    if traces["A"] is None and traces["B"] is None:
        return None, traces, f"answerers_failed: {answers[0]}; {answers[1]}"
    try:
        verdict = await roles.judge.judge(ctx, category, caption, facts, question,
                                          traces["A"] or "(no answer: backend failed)",
                                          traces["B"] or "(no answer: backend failed)")
    except BackendError as exc:
        return None, traces, f"judge_{exc.kind}: {exc}"
    except Exception as exc:  # a built-in judge bug on one item is recorded, not fatal
        return None, traces, f"judge_error: {type(exc).__name__}: {exc}"
    winner = verdict["winner"]
    if verdict["final_action"] == "KEEP_USING_WINNER":
        pick = "A" if winner in ("MODEL_A", "TIE") else "B"
        if traces.get(pick) is None:  # a judge may name a side that has no answer; that is not keepable
            return None, traces, f"judge_inconsistent: winner {winner} has no answer"
    return verdict, traces, None


def _training_record(rid, audio_path, category, question, verdict, traces, meta):
    winner = verdict["winner"]
    pick = "A" if winner in ("MODEL_A", "TIE") else "B"
    _, letter = parse_trace(traces[pick])
    letters = {}
    for name in ("A", "B"):
        try:
            letters[name] = parse_trace(traces[name])[1] if traces.get(name) else None
        except ValueError:
            letters[name] = None
    return {
        "id": rid,
        "task": category.task,
        "messages": [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": [{"type": "audio_url", "audio_url": {"url": audio_path}},
                                         {"type": "text", "text": question}]},
            {"role": "assistant", "content": [{"type": "text", "text": traces[pick]}]},
        ],
        "answer": letter,
        # hard example: both answerers answered and disagreed (a failed answerer is not a disagreement)
        "meta": {**meta, "hard": bool(letters["A"] and letters["B"] and letters["A"] != letters["B"]),
                 "winner": winner, "answers": letters,
                 "target_from": f"answerer_{pick.lower()}", "verdict": verdict},
    }


async def transcribe_batch(ctxs, roles, *, batch_size: int, timings=None) -> None:
    """Every recogniser's transcript of every clip into the clips' caches, as the roles would make them one clip at
    a time: a recogniser with `transcribe_batch` takes the clips together (`batch_size` Whisper windows per encoder
    call), and the recognisers run at the same time. A clip that cannot be transcribed is left out: its role then
    transcribes it in the clip's own loop and fails that clip alone, with the reason the one-clip loop gives.
    Each recogniser runs its torch work on one thread: the recognisers run side by side, and beside them the
    previous batch's analysis processes, so more threads per recogniser would only make them wait on each other."""
    from .asr import transcribe_many
    from .roles import logprob_key, transcript_key

    def recognise(asr):
        t = time.perf_counter()
        todo = [c for c in ctxs if c.cache.get(transcript_key(asr)) is None]
        with _torch_threads(1):
            out = transcribe_many(asr, [c.audio for c in todo], batch_size=batch_size) if todo else []
        for ctx, got in zip(todo, out):
            if not isinstance(got, BaseException):
                ctx.cache[logprob_key(asr)] = got[1]
                ctx.cache[transcript_key(asr)] = got[0]
        _add_time(timings, f"asr {getattr(asr, 'name', 'asr')}", time.perf_counter() - t)

    if ctxs:
        await asyncio.gather(*(asyncio.to_thread(recognise, asr) for asr in roles.recognisers()))


async def analyse_batch(ctxs, roles, *, run_jobs, timings=None) -> None:
    """The roles' signal analysis of every clip (`roles.analysis_jobs`, which need the cached transcripts) into the
    clips' caches, handed to `run_jobs([(function, args)]) -> [(value, seconds) or exception]` (a process pool or
    threads). A job that fails is left out: its role then measures in the clip's own loop and fails that clip alone
    the way the one-clip loop would."""
    jobs = [(ctx, key, fn, args) for ctx in ctxs for key, fn, args in roles.analysis_jobs(ctx)]
    if not jobs:
        return
    results = await run_jobs([(fn, args) for _, _, fn, args in jobs])
    for (ctx, key, fn, _), result in zip(jobs, results):
        if isinstance(result, BaseException):
            continue
        value, seconds = result
        ctx.cache[key] = value
        _add_time(timings, f"analysis {fn.__name__}", seconds)


@contextlib.contextmanager
def _torch_threads(count: int):
    """torch's intra-op threads of the calling thread set to `count` inside the block (nothing without torch)."""
    torch = sys.modules.get("torch")
    if torch is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def timed_call(fn, args):
    """(fn(*args), seconds it took): what a worker process returns for one analysis job."""
    t = time.perf_counter()
    value = fn(*args)
    return value, time.perf_counter() - t


_TIMINGS_LOCK = threading.Lock()


def _add_time(timings, stage, seconds):
    if timings is not None:
        with _TIMINGS_LOCK:
            timings[stage] = timings.get(stage, 0.0) + seconds
