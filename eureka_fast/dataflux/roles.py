"""The five DataFlux roles behind one async interface, each either built-in (offline) or an OpenAI-compatible model.

  captioner.caption(ctx)                                       -> (caption, facts)
  generator.generate(ctx, category, caption, facts, n, ...)    -> (reply dict, intended letters or None)
  answerer.answer(ctx, question)                               -> trace "<THINK>..</THINK><RESPONSE>X</RESPONSE>"
  judge.judge(ctx, category, caption, facts, question, a, b)   -> verdict dict (JUDGE_SCHEMA)
Model outputs that violate their strict format are re-requested up to the role's max_retries ("<role>.malformed"
events); after that the role raises BackendError(kind="malformed") so the pipeline records the item with a reason.
Built-in roles run their CPU work in a worker thread so HTTP roles of other clips keep flowing.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
from collections import Counter

import numpy as np

from .http_backend import BackendError, OpenAIChatClient, audio_part
from .schemas import (CAPTION_SCHEMA, GENERATOR_SCHEMA, JUDGE_SCHEMA, FormatError, parse_json_object, parse_trace,
                      validate_generator_output)

ROLE_NAMES = ("captioner", "query_generator", "answerer_a", "answerer_b", "judge")
ANSWER_SYSTEM = ("You are an expert audio analyst. Listen to the audio and answer the multiple-choice question. "
                 "Think step by step about what you hear, then reply exactly as "
                 "<THINK>your reasoning</THINK><RESPONSE>the option letter</RESPONSE>.")


@dataclasses.dataclass
class ClipContext:
    """Everything the roles may need about one clip, plus per-clip caches and fault counters."""

    clip_id: str
    path: str
    audio: np.ndarray
    seed: int = 0
    cache: dict = dataclasses.field(default_factory=dict)
    events: Counter = dataclasses.field(default_factory=Counter)
    locks: dict = dataclasses.field(default_factory=dict)  # asyncio locks: a measurement is made once per clip
    started: float | None = None  # time.perf_counter() when reading the clip began

    def wav_b64(self) -> str:
        if "wav_b64" not in self.cache:
            from .audio_io import wav_base64

            self.cache["wav_b64"] = wav_base64(self.audio)
        return self.cache["wav_b64"]


async def _strict(client: OpenAIChatClient, ctx: ClipContext, messages, parse, json_mode: bool):
    """Ask until the reply parses (parse raises FormatError), at most 1 + max_retries times."""
    last = None
    for _ in range(client.max_retries + 1):
        text = await client.chat(messages, ctx.events, json_mode=json_mode)
        try:
            return parse(text)
        except FormatError as exc:
            last = exc
            ctx.events[f"{client.role}.malformed"] += 1
    raise BackendError(client.role, "malformed", str(last), client.max_retries + 1)


# ================================================================================================== captioner

CAPTIONER_FACTS_KEY = "captioner-facts"  # ctx.cache entry of the built-in captioner's measured facts


def transcript_key(asr) -> str:
    """ctx.cache entry of a recogniser's transcript of the clip (the answerers read the same entry)."""
    return f"asr:{getattr(asr, 'name', id(asr))}"


def logprob_key(asr) -> str:
    """ctx.cache entry of that transcript's mean token log-probability (None when the recogniser gives none)."""
    return f"asr-logprob:{getattr(asr, 'name', id(asr))}"


def cached_transcript(ctx, asr) -> tuple[str, float | None]:
    """(transcript, mean token log-probability) of the clip by `asr`, transcribed once per clip."""
    key = transcript_key(asr)
    if ctx.cache.get(key) is None:
        text = asr.transcribe(ctx.audio)
        ctx.cache[logprob_key(asr)] = getattr(asr, "last_avg_logprob", None)
        ctx.cache[key] = text
    return ctx.cache[key], ctx.cache.get(logprob_key(asr))


def caption_facts(audio, transcript: str, confidence, check_name, check_text) -> dict:
    """The built-in captioner's facts of one clip given its recognisers' output: the signal analysis plus the
    transcript's confidence and its check against the second recogniser (`check_name` None: none installed).
    A plain function of its arguments, so the batched loop can run it in a worker process."""
    from .asr import check_transcript
    from .captioner import analyse

    extra = {}
    if transcript.strip():
        if confidence is not None:
            extra["transcript_avg_logprob"] = round(float(confidence), 3)
        if check_name is not None:
            extra["transcript_check"] = check_transcript(transcript, check_text, check_name, confidence)
        else:
            extra["transcript_check"] = {"recogniser": None, "verified": False,
                                         "reason": "no second recogniser installed"}
    # syllables from the text only when a second recogniser confirms it (or, with none, when the recogniser is
    # confident): text in a language the recogniser does not know miscounts
    check = extra.get("transcript_check")
    reliable = (check["verified"] if check and check.get("recogniser")
                else confidence is None or confidence > -1.0)
    return {**analyse(audio, transcript, transcript_reliable=reliable), **extra}


class BuiltinCaptionerRole:
    def __init__(self, asr="auto", asr_window="full", **unknown):
        if unknown:
            raise ValueError(f"captioner: unknown builtin option(s) {sorted(unknown)}")
        from .asr import get_asr, second_recogniser
        from .captioner import BuiltinCaptioner

        check_asr_window("captioner", asr_window)
        self.asr = get_asr(asr, window=asr_window)
        self.check_asr = second_recogniser(self.asr)  # decodes differently: content facts are cross-checked
        self._impl = BuiltinCaptioner(self.asr)
        self.name = self._impl.name

    measures_signal = True

    def recognisers(self) -> list:
        return [a for a in (self.asr, self.check_asr) if a is not None]

    def analysis_jobs(self, ctx) -> list:
        """[(cache key, function, args)]: the facts, once the clip's transcripts are cached."""
        if CAPTIONER_FACTS_KEY in ctx.cache or ctx.cache.get(transcript_key(self.asr)) is None:
            return []
        transcript, confidence = cached_transcript(ctx, self.asr)
        check_name = check_text = None
        if self.check_asr is not None and transcript.strip():
            check_text = ctx.cache.get(transcript_key(self.check_asr))
            if check_text is None:
                return []
            check_name = self.check_asr.name
        return [(CAPTIONER_FACTS_KEY, caption_facts, (ctx.audio, transcript, confidence, check_name, check_text))]

    async def caption(self, ctx):
        from .captioner import caption_from_facts

        def work():
            facts = ctx.cache.get(CAPTIONER_FACTS_KEY)
            if facts is None:
                transcript, confidence = cached_transcript(ctx, self.asr)
                check_name = check_text = None
                if self.check_asr is not None and transcript.strip():
                    check_name, check_text = self.check_asr.name, cached_transcript(ctx, self.check_asr)[0]
                facts = caption_facts(ctx.audio, transcript, confidence, check_name, check_text)
                ctx.cache[CAPTIONER_FACTS_KEY] = facts
            return caption_from_facts(facts), facts

        return await asyncio.to_thread(work)


class HTTPCaptionerRole:
    PROMPT = ("Write a dense caption of this audio clip: sound events, environment and background, and for speech the "
              "speaker's voice (gender, pitch), pace, emotion and what is said. Reply with strict JSON "
              '{"caption": "<caption>"}.')

    def __init__(self, builtin_facts=True, asr="auto", asr_window="full", **client_opts):
        self.client = OpenAIChatClient("captioner", json_mode=True, **client_opts)
        self.builtin = BuiltinCaptionerRole(asr=asr, asr_window=asr_window) if builtin_facts else None
        self.name = self.client.name + ("+builtin-facts" if builtin_facts else "")

    @property
    def measures_signal(self) -> bool:
        return self.builtin is not None

    def recognisers(self) -> list:
        return self.builtin.recognisers() if self.builtin is not None else []

    def analysis_jobs(self, ctx) -> list:
        return self.builtin.analysis_jobs(ctx) if self.builtin is not None else []

    async def caption(self, ctx):
        messages = [{"role": "user", "content": [audio_part(ctx.wav_b64()), {"type": "text", "text": self.PROMPT}]}]
        obj = await _strict(self.client, ctx, messages, lambda t: parse_json_object(t, CAPTION_SCHEMA, "caption"),
                            True)
        facts = dict(obj.get("facts") or {})
        if self.builtin is not None:
            _, measured = await self.builtin.caption(ctx)
            facts = {**facts, **measured}  # measured facts win: the judge treats facts as ground truth
        return obj["caption"], facts


# ================================================================================================== generator

class BuiltinGeneratorRole:
    def __init__(self, **unknown):
        if unknown:
            raise ValueError(f"query_generator: unknown builtin option(s) {sorted(unknown)}")
        from .builtin_roles import TemplateQueryGenerator

        self._impl = TemplateQueryGenerator()
        self.name = self._impl.name

    async def generate(self, ctx, category, caption, facts, n, *, round_idx, previous, feedback):
        reply, intended = self._impl.generate(category, facts, n, round_idx=round_idx, avoid_stems=previous,
                                              seed=ctx.seed, clip_id=ctx.clip_id)
        validate_generator_output(reply, n) if reply["is_success"] else None
        return reply, intended


class HTTPGeneratorRole:
    def __init__(self, include_facts=True, **client_opts):
        self.client = OpenAIChatClient("query_generator", json_mode=True, **client_opts)
        self.include_facts = include_facts
        self.name = self.client.name

    def prompt(self, category, caption, facts, n, previous, feedback):
        lines = [
            "You write multiple-choice questions that train audio-language models.",
            f"Category (L0 > L1 > L2 > L3): {category.path_str}",
            f"Ground-truth caption of the clip (never mention or quote it in the questions): {caption}",
        ]
        if self.include_facts and facts:
            lines.append("Measured facts: " + json.dumps({k: v for k, v in facts.items() if not isinstance(v, list)}))
        if category.examples:
            lines.append("Example questions for this category:\n" + "\n".join(f"- {e}" for e in category.examples))
        if previous:
            lines.append("Questions already kept for this clip (do not repeat them):\n" +
                         "\n".join(f"- {p}" for p in previous))
        if feedback:
            lines.append("Earlier questions were rejected for these reasons; avoid them:\n" +
                         "\n".join(f"- {f}" for f in feedback))
        lines.append(
            "First decide whether the clip fits the category. If it does not, reply "
            '{"is_success": false, "questions": []}. Otherwise write exactly ' + str(n) + " distinct questions that "
            "can be answered only by listening, each with four plausible options on their own lines, formatted "
            '"Question?\\nA. ...\\nB. ...\\nC. ...\\nD. ...", with the correct option at a random position. Never '
            "reveal the answer and never mention the caption. Reply with strict JSON only: "
            '{"is_success": true, "questions": ["...", ...]}.')
        return "\n\n".join(lines)

    async def generate(self, ctx, category, caption, facts, n, *, round_idx, previous, feedback):
        messages = [{"role": "user", "content": self.prompt(category, caption, facts, n, previous, feedback)}]

        def parse(text):
            obj = parse_json_object(text, GENERATOR_SCHEMA, "generator")
            validate_generator_output(obj, n)
            return obj

        return await _strict(self.client, ctx, messages, parse, True), None


# ================================================================================================== answerers

class _GivenTranscript:
    """A recogniser that only knows the one transcript it was given (for measuring in a worker process)."""

    name = "given-transcript"

    def __init__(self, text: str):
        self.text = text

    def transcribe(self, audio) -> str:
        return self.text


def answerer_measurements(method: str, audio, transcript: str, clip_id: str, path: str, seed: int) -> dict:
    """A built-in answerer's measurements of one clip, given the transcript its recogniser made. A plain function
    of its arguments, so the batched loop can run it in a worker process."""
    from .builtin_roles import MeasuringAnswerer

    given = _GivenTranscript(transcript)
    ctx = ClipContext(clip_id=clip_id, path=path, audio=audio, seed=seed)
    ctx.cache[transcript_key(given)] = transcript
    return MeasuringAnswerer(method, given, None).measure(ctx)


class BuiltinAnswererRole:
    def __init__(self, role, taxonomy, method=None, asr="auto", asr_window="full", **unknown):
        if unknown:
            raise ValueError(f"{role}: unknown builtin option(s) {sorted(unknown)}")
        from .asr import get_asr
        from .builtin_roles import MeasuringAnswerer

        check_asr_window(role, asr_window)
        method = method or ("a" if role == "answerer_a" else "b")
        self._impl = MeasuringAnswerer(method, get_asr(asr, window=asr_window), taxonomy)
        self.name = self._impl.name

    measures_signal = True

    @property
    def _measure_key(self) -> str:
        return f"answerer-{self._impl.method}"  # where MeasuringAnswerer.measure keeps its result

    def recognisers(self) -> list:
        return [self._impl.asr]

    def analysis_jobs(self, ctx) -> list:
        transcript = ctx.cache.get(transcript_key(self._impl.asr))
        if self._measure_key in ctx.cache or transcript is None:
            return []
        return [(self._measure_key, answerer_measurements,
                 (self._impl.method, ctx.audio, transcript, ctx.clip_id, ctx.path, ctx.seed))]

    async def answer(self, ctx, question):
        # the questions of a clip are answered concurrently; its measurements are made once, not once per question
        if self._measure_key not in ctx.cache:
            async with ctx.locks.setdefault(self._measure_key, asyncio.Lock()):
                if self._measure_key not in ctx.cache:
                    await asyncio.to_thread(self._impl.measure, ctx)
        return await asyncio.to_thread(self._impl.answer, ctx, question)


class HTTPAnswererRole:
    def __init__(self, role, system_prompt=ANSWER_SYSTEM, **client_opts):
        self.client = OpenAIChatClient(role, **client_opts)
        self.system = system_prompt
        self.name = self.client.name

    async def answer(self, ctx, question):
        messages = [{"role": "system", "content": self.system},
                    {"role": "user", "content": [audio_part(ctx.wav_b64()), {"type": "text", "text": question}]}]

        def parse(text):
            parse_trace(text)
            return text.strip()

        return await _strict(self.client, ctx, messages, parse, False)


# ================================================================================================== judge

class BuiltinJudgeRole:
    def __init__(self, **unknown):
        if unknown:
            raise ValueError(f"judge: unknown builtin option(s) {sorted(unknown)}")
        from .builtin_roles import RuleJudge

        self._impl = RuleJudge()
        self.name = self._impl.name

    async def judge(self, ctx, category, caption, facts, question, trace_a, trace_b):
        return self._impl.judge(category, caption, facts, question, trace_a, trace_b)


class HTTPJudgeRole:
    def __init__(self, **client_opts):
        self.client = OpenAIChatClient("judge", json_mode=True, **client_opts)
        self.name = self.client.name

    @staticmethod
    def prompt(category, caption, facts, question, trace_a, trace_b):
        return "\n\n".join([
            "You judge answers of two audio models to a multiple-choice question about an audio clip.",
            f"Category: {category.path_str}",
            f"Caption (ground truth): {caption}",
            "Measured facts (ground truth): " + json.dumps({k: v for k, v in facts.items() if not isinstance(v, list)}),
            f"Question:\n{question}",
            f"Model A:\n{trace_a}",
            f"Model B:\n{trace_b}",
            "Check consensus, the internal logic of each reasoning trace, domain rules, and consistency with the "
            "caption. One winner or both right: keep (the winner's trace becomes the training target); both wrong: "
            "discard. Reply with strict JSON only: {\"consensus\": bool, \"consistency_with_caption\": "
            "\"STRONG_MATCH\"|\"WEAK_MATCH\"|\"CONFLICT\", \"winner\": \"MODEL_A\"|\"MODEL_B\"|\"TIE\"|\"NONE\", "
            "\"reasoning\": str, \"final_action\": \"KEEP_USING_WINNER\"|\"DISCARD\"}"])

    async def judge(self, ctx, category, caption, facts, question, trace_a, trace_b):
        messages = [{"role": "user", "content": self.prompt(category, caption, facts, question, trace_a, trace_b)}]

        def parse(text):
            v = parse_json_object(text, JUDGE_SCHEMA, "judge")
            if v["final_action"] == "KEEP_USING_WINNER" and v["winner"] == "NONE":
                raise FormatError("judge: KEEP_USING_WINNER with winner NONE")
            return v

        return await _strict(self.client, ctx, messages, parse, True)


# ================================================================================================== assembly

@dataclasses.dataclass
class Roles:
    captioner: object
    query_generator: object
    answerer_a: object
    answerer_b: object
    judge: object

    def names(self) -> dict:
        return {r: getattr(self, r).name for r in ROLE_NAMES}

    def measures_signal(self) -> bool:
        """Whether any role analyses the audio itself (and so has analysis jobs for a batch)."""
        return any(getattr(getattr(self, r), "measures_signal", False) for r in ROLE_NAMES)

    def recognisers(self) -> list:
        """The speech recognisers the roles read transcripts from, one per cache entry."""
        found = {}
        for r in ROLE_NAMES:
            for asr in getattr(getattr(self, r), "recognisers", lambda: [])():
                found.setdefault(transcript_key(asr), asr)
        return list(found.values())

    def analysis_jobs(self, ctx) -> list:
        """[(cache key, function, args)]: the roles' per-clip signal analysis, each a plain function of picklable
        arguments whose result the role reads from ctx.cache[key] instead of measuring itself."""
        jobs = {}
        for r in ROLE_NAMES:
            for key, fn, args in getattr(getattr(self, r), "analysis_jobs", lambda _ctx: [])(ctx):
                jobs.setdefault(key, (key, fn, args))
        return list(jobs.values())

    async def aclose(self):
        for r in ROLE_NAMES:
            client = getattr(getattr(self, r), "client", None)
            if client is not None:
                await client.aclose()


ASR_WINDOW_ROLES = ("captioner", "answerer_a", "answerer_b")  # the built-in roles that run speech recognition


def check_asr_window(role: str, value) -> None:
    """A clear error for a roles.<role>.asr_window that is not one of full | trimmed."""
    from .asr import ASR_WINDOWS

    if not isinstance(value, str) or value not in ASR_WINDOWS:
        raise ValueError(f"roles.{role}.asr_window must be one of {', '.join(ASR_WINDOWS)}, got {value!r}")


def check_role_options(role_config: dict | None) -> None:
    """The checks of the roles section that need no model: each asr_window given is full or trimmed."""
    for role, opts in (role_config or {}).items():
        if isinstance(opts, dict) and "asr_window" in opts:
            if role not in ASR_WINDOW_ROLES:
                raise ValueError(f"roles.{role}.asr_window: only {', '.join(ASR_WINDOW_ROLES)} run speech "
                                 f"recognition")
            check_asr_window(role, opts["asr_window"])


def build_roles(role_config: dict | None, taxonomy) -> Roles:
    """Roles from the `roles:` section of a config ({} -> all built-in). The built-in answerers transcribe over the
    captioner's `asr_window` unless they set their own, so that answerer a reads the captioner's transcript and
    answerer b its second recogniser's, with no recogniser run twice."""
    cfg = dict(role_config or {})
    unknown = set(cfg) - set(ROLE_NAMES)
    if unknown:
        raise ValueError(f"unknown role(s) {sorted(unknown)}; roles are {list(ROLE_NAMES)}")
    check_role_options(cfg)
    captioner_window = (cfg.get("captioner") or {}).get("asr_window", "full")
    built = {}
    for role in ROLE_NAMES:
        opts = dict(cfg.get(role) or {})
        backend = opts.pop("backend", "builtin")
        if role.startswith("answerer") and backend == "builtin":
            opts.setdefault("asr_window", captioner_window)
        if backend not in ("builtin", "openai"):
            raise ValueError(f"{role}: backend must be 'builtin' or 'openai', got {backend!r}")
        http = backend == "openai"
        if role == "captioner":
            built[role] = HTTPCaptionerRole(**opts) if http else BuiltinCaptionerRole(**opts)
        elif role == "query_generator":
            built[role] = HTTPGeneratorRole(**opts) if http else BuiltinGeneratorRole(**opts)
        elif role.startswith("answerer"):
            built[role] = HTTPAnswererRole(role, **opts) if http else BuiltinAnswererRole(role, taxonomy, **opts)
        else:
            built[role] = HTTPJudgeRole(**opts) if http else BuiltinJudgeRole(**opts)
    return Roles(**built)
