"""Strict formats exchanged between roles: generator JSON, judge JSON, answer traces, question text.

Questions travel as one string: a stem line, then exactly four option lines "A. ...", "B. ...", "C. ...", "D. ...".
"""
from __future__ import annotations

import json
import re

LETTERS = ("A", "B", "C", "D")

GENERATOR_SCHEMA = {
    "type": "object",
    "properties": {
        "is_success": {"type": "boolean"},
        "questions": {"type": "array", "items": {"type": "string", "minLength": 1}},
    },
    "required": ["is_success", "questions"],
}

JUDGE_SCHEMA = {
    "type": "object",
    "properties": {
        "consensus": {"type": "boolean"},
        "consistency_with_caption": {"enum": ["STRONG_MATCH", "WEAK_MATCH", "CONFLICT"]},
        "winner": {"enum": ["MODEL_A", "MODEL_B", "TIE", "NONE"]},
        "reasoning": {"type": "string"},
        "final_action": {"enum": ["KEEP_USING_WINNER", "DISCARD"]},
    },
    "required": ["consensus", "consistency_with_caption", "winner", "reasoning", "final_action"],
}

CAPTION_SCHEMA = {
    "type": "object",
    "properties": {"caption": {"type": "string", "minLength": 1}, "facts": {"type": "object"}},
    "required": ["caption"],
}


class FormatError(ValueError):
    """A model output violates the expected strict format; the message says how."""


def parse_json_object(text: str, schema: dict, what: str) -> dict:
    """Strict JSON object validated against `schema`. A single ```json fence around it is tolerated (many servers
    add one even in JSON mode); anything else (prose, trailing text, wrong types) is a FormatError."""
    import jsonschema

    s = text.strip()
    fence = re.fullmatch(r"```(?:json)?\s*(.*?)\s*```", s, flags=re.S)
    if fence:
        s = fence.group(1)
    try:
        obj = json.loads(s)
    except (json.JSONDecodeError, TypeError) as exc:
        raise FormatError(f"{what}: not valid JSON ({exc.msg if hasattr(exc, 'msg') else exc})") from None
    if not isinstance(obj, dict):
        raise FormatError(f"{what}: expected a JSON object, got {type(obj).__name__}")
    try:
        jsonschema.validate(obj, schema)
    except jsonschema.ValidationError as exc:
        loc = "/".join(str(p) for p in exc.absolute_path) or "(root)"
        raise FormatError(f"{what}: schema violation at {loc}: {exc.message}") from None
    return obj


_OPTION_RE = re.compile(r"^\s*([A-D])[.)]\s+(.+?)\s*$")


def format_question(stem: str, options) -> str:
    return stem.strip() + "\n" + "\n".join(f"{L}. {o}" for L, o in zip(LETTERS, options))


def parse_question(text: str) -> tuple[str, list[str]]:
    """(stem, [4 options]) of a question string; FormatError unless it has a stem and exactly options A-D in order,
    all distinct."""
    lines = [ln for ln in str(text).strip().splitlines() if ln.strip()]
    stem_lines, options = [], []
    for ln in lines:
        m = _OPTION_RE.match(ln)
        if m:
            options.append((m.group(1), m.group(2)))
        elif options:
            raise FormatError(f"text after the options: {ln.strip()[:60]!r}")
        else:
            stem_lines.append(ln.strip())
    if not stem_lines:
        raise FormatError("question has no stem")
    if [L for L, _ in options] != list(LETTERS):
        raise FormatError(f"expected options A, B, C, D in order, got {[L for L, _ in options]}")
    texts = [o for _, o in options]
    if len({t.lower() for t in texts}) != 4:
        raise FormatError("options are not distinct")
    return " ".join(stem_lines), texts


def validate_generator_output(obj: dict, n_questions: int) -> list[tuple[str, list[str]]]:
    """Check a generator reply beyond the JSON schema: on success exactly n distinct, well-formed 4-option questions.
    Returns the parsed questions."""
    if not obj["is_success"]:
        return []
    qs = obj["questions"]
    if len(qs) != n_questions:
        raise FormatError(f"expected {n_questions} questions, got {len(qs)}")
    parsed = []
    for i, q in enumerate(qs):
        try:
            parsed.append(parse_question(q))
        except FormatError as exc:
            raise FormatError(f"question {i + 1}: {exc}") from None
    stems = [normalize_text(s) for s, _ in parsed]
    if len(set(stems)) != len(stems):
        raise FormatError("questions are not distinct")
    return parsed


_TRACE_RE = re.compile(r"^\s*<THINK>(.*?)</THINK>\s*<RESPONSE>\s*(.*?)\s*</RESPONSE>\s*$", re.S)


def parse_trace(text: str) -> tuple[str, str]:
    """(reasoning, letter) of an answer trace `<THINK>...</THINK><RESPONSE>X</RESPONSE>`; FormatError otherwise.
    The response may be the bare letter or start with it ("B", "B.", "B. A man")."""
    m = _TRACE_RE.match(str(text))
    if not m:
        raise FormatError("answer is not <THINK>...</THINK><RESPONSE>...</RESPONSE>")
    think, resp = m.group(1).strip(), m.group(2).strip()
    if not think:
        raise FormatError("empty <THINK> reasoning")
    lm = re.match(r"^\(?([A-D])\)?(?:[.):]|\s|$)", resp)
    if not lm:
        raise FormatError(f"<RESPONSE> is not an option letter: {resp[:30]!r}")
    return think, lm.group(1)


def make_trace(think: str, letter: str) -> str:
    return f"<THINK>{think.strip()}</THINK><RESPONSE>{letter}</RESPONSE>"


def normalize_text(text: str) -> str:
    return " ".join(re.findall(r"[a-z0-9']+", str(text).lower()))


_STOP = frozenset("a an the of in on to is are this that it you what which how does do be as by for with from or and "
                  "most best".split())


def stem_tokens(stem: str) -> frozenset:
    return frozenset(w for w in normalize_text(stem).split() if w not in _STOP)


def near_duplicate(a_stem: str, b_stem: str, threshold: float = 0.8) -> bool:
    """Two questions about the same clip are near-duplicates when their stems' content words overlap with
    Jaccard >= threshold (the same question reworded slightly or with options shuffled)."""
    ta, tb = stem_tokens(a_stem), stem_tokens(b_stem)
    if not ta or not tb:
        return normalize_text(a_stem) == normalize_text(b_stem)
    return len(ta & tb) / len(ta | tb) >= threshold
