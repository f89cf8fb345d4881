"""Scoring: corpus WER with Whisper's English normaliser, multiple-choice answer extraction, exact match.

Conventions (docs/training.md#evaluation): hypothesis and reference both go through `EnglishTextNormalizer`; corpus
WER is the total word edit distance divided by the total number of reference words (not a mean of per-utterance
WERs).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

_NORMALIZER = None


def english_normalizer():
    """Whisper's EnglishTextNormalizer, as transformers ships it (the same rules as openai-whisper's, without
    that package and the triton it pulls in), with Whisper's British -> American spelling table."""
    global _NORMALIZER
    if _NORMALIZER is None:
        from transformers.models.whisper.english_normalizer import EnglishTextNormalizer

        _NORMALIZER = EnglishTextNormalizer(_english_spelling_mapping())
    return _NORMALIZER


def _english_spelling_mapping() -> dict:
    """Whisper's British -> American spelling table (english.json), as the whisper-normalizer package (the `all`
    extra) or openai-whisper ship it."""
    import json
    import os
    from importlib.util import find_spec

    for package, parts in (("whisper_normalizer", ("normalizers", "english.json")),
                           ("whisper", ("normalizers", "english.json"))):
        try:
            spec = find_spec(package)
        except (ImportError, ValueError):
            spec = None
        if spec is None or not spec.origin:
            continue
        path = os.path.join(os.path.dirname(spec.origin), *parts)
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as fh:
                return json.load(fh)
    raise ImportError("WER scoring needs Whisper's English spelling table: pip install whisper-normalizer")


def strip_reasoning(text: str) -> str:
    """The answer part of a `<THINK>...</THINK><RESPONSE>...</RESPONSE>` output (the whole text if untagged)."""
    m = re.search(r"<RESPONSE>(.*?)(?:</RESPONSE>|$)", text, flags=re.S | re.I)
    if m:
        return m.group(1).strip()
    return re.sub(r"<THINK>.*?(?:</THINK>|$)", "", text, flags=re.S | re.I).strip()


def word_edit_distance(ref: list[str], hyp: list[str]) -> tuple[int, int, int]:
    """(substitutions, deletions, insertions) of a minimum-edit alignment (Levenshtein over words)."""
    n, m = len(ref), len(hyp)
    # cost table of (total, subs, dels, ins), row by row
    prev = [(j, 0, 0, j) for j in range(m + 1)]
    for i in range(1, n + 1):
        cur = [(i, 0, i, 0)] + [None] * m
        for j in range(1, m + 1):
            if ref[i - 1] == hyp[j - 1]:
                cur[j] = prev[j - 1]
                continue
            s, d, ins = prev[j - 1], prev[j], cur[j - 1]
            best = min((s[0], 0), (d[0], 1), (ins[0], 2))
            if best[1] == 0:
                cur[j] = (s[0] + 1, s[1] + 1, s[2], s[3])
            elif best[1] == 1:
                cur[j] = (d[0] + 1, d[1], d[2] + 1, d[3])
            else:
                cur[j] = (ins[0] + 1, ins[1], ins[2], ins[3] + 1)
        prev = cur
    _, subs, dels, ins = prev[m]
    return subs, dels, ins


@dataclass
class WERResult:
    wer: float
    edits: int
    ref_words: int
    substitutions: int
    deletions: int
    insertions: int
    utterances: int


def corpus_wer(references: list[str], hypotheses: list[str], normalize: bool = True) -> WERResult:
    """Total edits / total reference words. With `normalize`, both sides go through EnglishTextNormalizer."""
    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} references but {len(hypotheses)} hypotheses")
    norm = english_normalizer() if normalize else (lambda s: s)
    subs = dels = ins = words = 0
    for ref, hyp in zip(references, hypotheses):
        r, h = norm(ref).split(), norm(hyp).split()
        s, d, i = word_edit_distance(r, h)
        subs, dels, ins, words = subs + s, dels + d, ins + i, words + len(r)
    edits = subs + dels + ins
    return WERResult(wer=edits / words if words else (0.0 if edits == 0 else float("inf")), edits=edits,
                     ref_words=words, substitutions=subs, deletions=dels, insertions=ins,
                     utterances=len(references))


_OPTION_LINE = re.compile(r"^\s*\(?([A-Z])[\.\):]\s*(.+?)\s*$", re.M)


def parse_options(question: str) -> dict[str, str]:
    """Options written as lines "A. text" / "(B) text" / "C) text" in the question."""
    return {m.group(1): m.group(2) for m in _OPTION_LINE.finditer(question or "")}


def extract_choice(output: str, options: dict[str, str] | None = None, letters: str = "ABCD") -> str | None:
    """The option letter a model chose, or None when it cannot be told.

    In order: the <RESPONSE> part if tagged; an explicit "answer is (B)" / "Answer: B"; the output being just a
    letter ("B", "(B)", "B.", "B) text", "B: text"); a single standalone capital option letter in the text; the
    text of exactly one option appearing in the output (case-insensitive).
    """
    if not output:
        return None
    text = strip_reasoning(output)
    allowed = set(letters) | set(options or {})
    cls = "".join(sorted(allowed))
    m = re.search(rf"answer\s*(?:is|:)?\s*(?:option\s*)?[\(\[]?\s*([{cls}])\s*[\)\]]?(?![A-Za-z])", text, re.I)
    if m and m.group(1).upper() in allowed:
        return m.group(1).upper()
    m = re.match(rf"^\s*[\(\[]?([{cls}])(?:[\)\]\.:,]|\s*$|\s)", text)
    if m:
        return m.group(1)
    standalone = set(re.findall(rf"(?<![A-Za-z])[\(\[]?([{cls}])[\)\]\.]?(?![A-Za-z'])", text))
    # "A" and "I" are also English words; a lone capital letter counts only when it is the only one.
    if len(standalone) == 1:
        return standalone.pop()
    if options:
        lowered = text.lower()
        hits = [k for k, v in options.items() if v and v.lower().strip(" .") in lowered]
        if len(hits) == 1:
            return hits[0]
    return None


def normalize_exact(text: str) -> str:
    """For exact-match tasks: the answer part, lowercase, punctuation and spacing removed."""
    text = strip_reasoning(text).lower()
    return re.sub(r"[^0-9a-z]+", "", text)
