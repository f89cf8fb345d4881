"""Built-in offline roles: template query generator, two measuring answerers, rule-based judge.

The generator fills the taxonomy's templates from the captioner's facts, so the intended answer is known (kept in
provenance only; the judge decides from the caption facts, as an LLM judge would). The answerers never see the
caption: they measure the audio themselves, with methods that differ from the captioner's (Praat autocorrelation F0,
Praat Burg formants, WebRTC VAD + energy span, transcript syllables, span SNR) and from each other's:
  a: Praat cross-correlation F0, covariance-method LPC formants (Praat), energy endpoints, transcript syllables over
     its own span, frame-percentile SNR
  b: YIN F0, autocorrelation-LPC root formants (NumPy), spectral-flatness span, syllable nuclei in the signal (no
     transcript), span SNR over its own span
Both use the same literature-based sex model (acoustics.gender_decision) and abstain ("unknown") where it does.
Each trace ends its reasoning with "Conclusion: <value>." so the judge can check the trace's internal logic.
"""
from __future__ import annotations

import math
import random
import re

import numpy as np

from . import acoustics as ac
from .asr import normalize_words
from .schemas import LETTERS, format_question, parse_question, parse_trace, near_duplicate, make_trace

DURATION_FACTORS = (0.4, 0.6, 1.6, 2.5, 3.5)
_WORD_STOP = frozenset("about after again because before being could every from have here into just more most other "
                       "over some such than that their them then there these they this those through under until "
                       "very were what when where which while with would your should during".split())


def seeded_rng(*parts) -> random.Random:
    """A per-item RNG: same clip/category/round -> same questions, whatever the order clips are processed in."""
    import hashlib

    h = hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).digest()
    return random.Random(int.from_bytes(h[:8], "little"))


def _fmt_seconds(x: float) -> str:
    return f"About {x:.1f} seconds" if x < 10 else f"About {x:.0f} seconds"


def _parse_seconds(text: str) -> float | None:
    m = re.search(r"([0-9]+(?:\.[0-9]+)?)\s*seconds?", text)
    return float(m.group(1)) if m else None


_RELATIVE = re.compile(r"gender|kind of voice|same kind|voice type|for the speaker", re.IGNORECASE)


def _relative_wording(text: str) -> bool:
    """Wording that judges pitch against the speaker's own kind of voice: wrong for a level on absolute bands."""
    return bool(_RELATIVE.search(text))


def _option_word(text: str) -> str:
    return normalize_words(text)[0] if normalize_words(text) else ""


# ============================================================================================ generator

class TemplateQueryGenerator:
    name = "builtin-template-generator"

    def generate(self, category, facts: dict, n: int, *, round_idx: int, avoid_stems=(), seed=0, clip_id=""):
        """-> (reply dict in the generator schema, intended answer letters). is_success False when the clip does not
        fit the category (e.g. no speech for a speaker question, or the fact is unavailable)."""
        fail = ({"is_success": False, "questions": []}, [])
        if category.requires == "speech" and not facts.get("has_speech"):
            return fail
        value = facts.get(category.fact)
        if value in (None, "", []):
            return fail
        rng = seeded_rng(seed, clip_id, category.id, round_idx)
        absolute = facts.get(f"{category.fact}_basis") == "absolute bands"
        templates = [t for t in category.templates if not (absolute and _relative_wording(t))]
        rng.shuffle(templates)
        templates = [t for t in templates if not any(near_duplicate(t, s) for s in avoid_stems)]
        if len(templates) < n:
            # every stem was used already: re-ask used stems with fresh options rather than fail the unit
            extra = [t for t in category.templates if t not in templates and not (absolute and _relative_wording(t))]
            rng.shuffle(extra)
            templates += extra
        questions, answers = [], []
        for stem in templates[:n]:
            built = self._options(category, value, facts, rng, absolute)
            if built is None:
                return fail
            options, correct = built
            pos = rng.randrange(4)  # answer position uniform over A-D
            others = [o for o in options if o != correct]
            rng.shuffle(others)
            ordered = others[:pos] + [correct] + others[pos:]
            questions.append(format_question(stem, ordered))
            answers.append(LETTERS[pos])
        return {"is_success": True, "questions": questions}, answers

    @staticmethod
    def _options(category, value, facts, rng, absolute=False):
        if category.kind == "class":
            if value not in category.values:
                return None

            def phrasings(v):
                kept = [p for p in category.values[v] if not (absolute and _relative_wording(p))]
                return kept or list(category.values[v])

            correct = rng.choice(phrasings(value))
            pool = [rng.choice(phrasings(v)) for v in category.values if v != value]
            distractors = list(category.distractors)
            rng.shuffle(distractors)
            pool = (pool + distractors)[:3]
            return [correct] + pool, correct
        if category.kind == "duration":
            d = float(value)
            if not d > 0:
                return None
            factors = list(DURATION_FACTORS)
            rng.shuffle(factors)
            correct = _fmt_seconds(d)
            opts = [correct]
            for f in factors:
                o = _fmt_seconds(d * f)
                if o not in opts:
                    opts.append(o)
                if len(opts) == 4:
                    break
            return (opts, correct) if len(opts) == 4 else None
        if category.kind == "word":
            # what was said is a fact only where a second recogniser confirms it: no content question when the
            # recognisers disagree (or none could check), and the answer is a word both of them heard
            check = facts.get("transcript_check")
            if check is not None and not check.get("verified"):
                return None
            confirmed = set(check.get("confirmed_words", ())) if check is not None else None
            words = [w for w in normalize_words(str(value)) if len(w) >= 4 and w not in _WORD_STOP and "'" not in w
                     and (confirmed is None or w in confirmed)]
            if not words:
                return None
            spoken = set(normalize_words(str(value)))
            correct = rng.choice(sorted(set(words)))
            pool = [w for w in category.distractor_words if w not in spoken]
            if len(pool) < 3:
                return None
            return [correct] + rng.sample(pool, 3), correct
        return None


# ============================================================================================ answerers

class MeasuringAnswerer:
    """Answers by measuring the audio. method "a" or "b" selects the measurement methods (module docstring)."""

    def __init__(self, method: str, asr, taxonomy):
        if method not in ("a", "b"):
            raise ValueError(f"builtin answerer method must be 'a' or 'b', got {method!r}")
        self.method = method
        if method == "b":
            # b reads what a differently-decoding recogniser heard, so a mistranscription is not both answers
            from .asr import second_recogniser

            asr = second_recogniser(asr) or asr
        self.asr = asr
        self.taxonomy = taxonomy
        self.name = f"builtin-answerer-{method}+{getattr(asr, 'name', 'asr')}"

    # ---- measurements (cached per clip in ctx.cache)
    def measure(self, ctx) -> dict:
        key = f"answerer-{self.method}"
        if key not in ctx.cache:
            ctx.cache[key] = self._measure_a(ctx) if self.method == "a" else self._measure_b(ctx)
        return ctx.cache[key]

    def _transcript(self, ctx) -> str:
        key = f"asr:{getattr(self.asr, 'name', id(self.asr))}"
        if key not in ctx.cache:
            ctx.cache[key] = self.asr.transcribe(ctx.audio)
        return ctx.cache[key]

    def _voice(self, audio, span, pitch_fn, formant_fn):
        from .captioner import pitch_level_for, speaker_measurements

        v = speaker_measurements(audio, span, pitch_fn, formant_fn)
        if "dropped" in v["gender_evidence"]["f0"]:
            return None
        level, basis = pitch_level_for(v["f0_median_hz"], v)
        return {"f0": v["f0_median_hz"], "f0_range": v["f0_range_hz"], "dispersion": v["dispersion_hz"],
                "bandwidth": v["bandwidth_hz"], "gender": v["gender"], "confidence": v["gender_confidence"],
                "evidence": v["gender_evidence"], "pitch_level": level, "pitch_basis": basis,
                "times": v["times"][v["voiced"]]}

    def _measure_a(self, ctx) -> dict:
        audio = ctx.audio
        m = {"duration": audio.size / ac.SR, "snr": ac.snr_percentile(audio)}
        span = ac.speech_span_energy(audio)
        m["span"] = span
        m["transcript"] = self._transcript(ctx)
        if span is None or span[1] - span[0] < 0.1:
            return m
        v = self._voice(audio, span, lambda s: ac.praat_pitch(s, "cc", 60.0, 500.0), ac.praat_covariance_formants)
        if v:
            m.update(v)
        from .captioner import speaking_rate_measure

        rate = speaking_rate_measure(audio, span, m["transcript"], v["times"] if v else np.zeros(0))
        if rate["speaking_rate"]:
            m["rate"] = rate["speaking_rate"]
            m["rate_how"] = (f"{rate['syllable_count']} syllables ({rate['syllable_basis']}) over "
                             f"{span[1] - span[0]:.2f} s of speech (energy endpoints): "
                             f"{rate['syllables_per_second']:.2f} syllables per second")
        return m

    def _measure_b(self, ctx) -> dict:
        audio = ctx.audio
        span = ac.speech_span_flatness(audio)
        m = {"duration": audio.size / ac.SR, "snr": ac.snr_from_span(audio, span), "span": span,
             "transcript": self._transcript(ctx)}
        if span is None or span[1] - span[0] < 0.1:
            return m
        v = self._voice(audio, span, lambda s: ac.yin_pitch(s), ac.lpc_formants)
        if v:
            m.update(v)
            nuclei = ac.syllable_nuclei(audio, span, v["times"] + span[0])
            dur = span[1] - span[0]
            if dur >= ac.MIN_RATE_SPAN_S and nuclei >= ac.MIN_RATE_SYLLABLES:
                m["rate"] = ac.rate_class(nuclei / dur)
                m["rate_how"] = (f"{nuclei} syllable nuclei over {dur:.2f} s of speech (spectral-flatness span): "
                                 f"{nuclei / dur:.2f} syllables per second")
        return m

    # ---- answering
    def answer(self, ctx, question: str) -> str:
        stem, options = parse_question(question)
        m = self.measure(ctx)
        category, conclusion, think = self._decide(stem, options, m)
        if conclusion is None:
            # cannot measure: say so and pick the first option, which the judge will treat as unsupported
            return make_trace(think + " Conclusion: undetermined.", "A")
        if category.kind == "word":
            letter = answer_word_question(m.get("transcript", ""), options)
            conclusion = _option_word(options[LETTERS.index(letter)]) if letter else None
            if letter is None:
                return make_trace(think + " I hear none (or several) of the options. Conclusion: undetermined.", "A")
            return make_trace(f"{think} Of the options only \"{conclusion}\" occurs in it, option {letter}. "
                              f"Conclusion: {conclusion}.", letter)
        letter = self._pick(category, options, conclusion)
        if letter is None:
            return make_trace(think + f" None of the options matches {conclusion}. Conclusion: undetermined.", "A")
        return make_trace(f"{think} Option {letter} ({options[LETTERS.index(letter)]}) matches. "
                          f"Conclusion: {conclusion}.", letter)

    def _category_for(self, options):
        best, best_hits = None, 0
        for c in self.taxonomy:
            if c.kind != "class":
                continue
            hits = sum(c.option_value(o) is not None for o in options)
            if hits > best_hits:
                best, best_hits = c, hits
        if best is not None and best_hits >= 1:
            return best
        if all(_parse_seconds(o) is not None for o in options):
            return next((c for c in self.taxonomy if c.kind == "duration"), None)
        if all(len(normalize_words(o)) == 1 for o in options):
            return next((c for c in self.taxonomy if c.kind == "word"), None)
        return None

    def _decide(self, stem, options, m):
        c = self._category_for(options)
        tool = ("Praat cross-correlation pitch and covariance-LPC formants" if self.method == "a"
                else "YIN pitch and autocorrelation-LPC formants")
        if c is None:
            return None, None, "I cannot tell what property this question asks about."
        if c.kind == "duration":
            return c, f"{m['duration']:.2f} seconds", f"The clip is {m['duration']:.2f} s long."
        if c.kind == "word":
            return c, "transcript", f'My transcript of the speech is: "{m.get("transcript", "")}".'
        fact = c.fact
        if fact == "noise":
            snr = m["snr"]
            how = "frame-power percentiles" if self.method == "a" else "speech-span vs. pause power"
            return c, ac.noise_class(snr), f"The estimated SNR ({how}) is {snr:.1f} dB; clean needs >= 20 dB."
        if fact in ("gender", "pitch_level"):
            if "gender" not in m:
                return c, None, f"I found no voiced speech to measure with {tool}."
            ev = m["evidence"]
            cues = "; ".join(f"{k} {e['value_hz']} Hz -> " + (f"log-likelihood ratio {e['llr']:+.2f}"
                                                               if e["llr"] is not None else f"not used ({e['dropped']})")
                             for k, e in ev.items())
            think = (f"Using {tool} (effective bandwidth {m['bandwidth']:.0f} Hz): {cues}; posterior "
                     f"{m['confidence']:.2f} for the likelier sex, so the speaker's sex is {m['gender']}.")
            if fact == "gender":
                if m["gender"] == "unknown":
                    return c, None, think + " That is not confident enough to answer."
                return c, m["gender"], think
            return c, m["pitch_level"], (think + f" Median F0 {m['f0']:.0f} Hz against the {m['pitch_basis']}: "
                                                 f"the pitch is {m['pitch_level']}.")
        if fact == "speaking_rate":
            if "rate" not in m:
                return c, None, "I found too little speech to time."
            return c, m["rate"], (f"{m['rate_how']}; slow is below {ac.SLOW_SYL_PER_S} and fast above "
                                  f"{ac.FAST_SYL_PER_S}, so the pace is {m['rate']}.")
        return c, None, f"I have no measurement for {fact}."

    def _pick(self, c, options, conclusion):
        if c.kind == "class":
            for L, o in zip(LETTERS, options):
                if c.option_value(o) == conclusion:
                    return L
            return None
        if c.kind == "duration":
            d = float(conclusion.split()[0])
            vals = [_parse_seconds(o) for o in options]
            errs = [abs(math.log(v / d)) if v and v > 0 else float("inf") for v in vals]
            return LETTERS[int(np.argmin(errs))]
        return None


def answer_word_question(transcript: str, options) -> str | None:
    spoken = set(normalize_words(transcript))
    hits = [L for L, o in zip(LETTERS, options) if _option_word(o) in spoken]
    return hits[0] if len(hits) == 1 else None


# ============================================================================================ judge

BORDERLINE = {"f0_median_hz": 0.04, "syllables_per_second": 0.06, "snr_db": 2.0, "gender_confidence": 0.95}


class RuleJudge:
    """Decides from the caption's facts (the ground truth, as in the paper's judge prompt) and each trace's logic."""

    name = "builtin-rule-judge"

    def judge(self, category, caption: str, facts: dict, question: str, trace_a: str, trace_b: str) -> dict:
        try:
            stem, options = parse_question(question)
        except ValueError as exc:
            return self._verdict(False, "CONFLICT", "NONE", f"malformed question: {exc}")
        gold = self._gold_letter(category, options, facts)
        notes, correct, letters = [], {}, {}
        for name, trace in (("A", trace_a), ("B", trace_b)):
            try:
                think, letter = parse_trace(trace)
            except ValueError as exc:
                notes.append(f"model {name}: invalid trace ({exc})")
                correct[name], letters[name] = False, None
                continue
            letters[name] = letter
            logic_ok, why = self._logic_ok(category, options, think, letter)
            if not logic_ok:
                notes.append(f"model {name}: reasoning contradicts its answer ({why})")
            correct[name] = logic_ok and gold is not None and letter == gold
            notes.append(f"model {name} answered {letter}" + (" (matches caption)" if correct[name] else ""))
        consensus = letters.get("A") is not None and letters.get("A") == letters.get("B")
        if gold is None:
            return self._verdict(consensus, "CONFLICT", "NONE",
                                 "; ".join(notes + ["the caption facts support none of the options"]))
        notes.append(f"caption facts support {gold}")
        winner = ("TIE" if correct["A"] and correct["B"] else "MODEL_A" if correct["A"]
                  else "MODEL_B" if correct["B"] else "NONE")
        if winner == "NONE":
            return self._verdict(consensus, "CONFLICT", winner, "; ".join(notes + ["both answers wrong"]))
        strength = "WEAK_MATCH" if self._borderline(category, facts) else "STRONG_MATCH"
        if strength == "WEAK_MATCH":
            notes.append("the deciding measurement is close to a class threshold")
        return self._verdict(consensus, strength, winner, "; ".join(notes))

    @staticmethod
    def _verdict(consensus, consistency, winner, reasoning):
        keep = winner in ("MODEL_A", "MODEL_B", "TIE") and consistency != "CONFLICT"
        return {"consensus": bool(consensus), "consistency_with_caption": consistency, "winner": winner,
                "reasoning": reasoning, "final_action": "KEEP_USING_WINNER" if keep else "DISCARD"}

    @staticmethod
    def _gold_letter(category, options, facts):
        value = facts.get(category.fact)
        if value in (None, ""):
            return None
        if category.kind == "class":
            hits = [L for L, o in zip(LETTERS, options) if category.option_value(o) == value]
            return hits[0] if len(hits) == 1 else None
        if category.kind == "duration":
            vals = [_parse_seconds(o) for o in options]
            if any(v is None or v <= 0 for v in vals):
                return None
            errs = [abs(math.log(v / float(value))) for v in vals]
            best = int(np.argmin(errs))
            return LETTERS[best] if errs[best] < math.log(1.25) else None
        if category.kind == "word":
            return answer_word_question(str(value), options)
        return None

    @staticmethod
    def _logic_ok(category, options, think, letter):
        m = re.search(r"Conclusion:\s*([^.]+(?:\.\d+)?[^.]*)\.?\s*$", think)
        if not m:
            return True, ""  # free-form reasoning (e.g. an LLM answerer): nothing checkable
        concl = m.group(1).strip()
        if concl == "undetermined":
            return False, "it could not determine an answer"
        chosen = options[LETTERS.index(letter)]
        if category.kind == "class":
            ok = category.option_value(chosen) == concl
        elif category.kind == "duration":
            d, v = _parse_seconds(concl), _parse_seconds(chosen)
            ok = d is not None and v is not None and abs(math.log(v / d)) < math.log(1.25)
        else:
            ok = _option_word(chosen) == concl.strip('"').lower()
        return ok, "" if ok else f"concluded {concl!r} but chose {chosen!r}"

    @staticmethod
    def _borderline(category, facts):
        f = category.fact
        if f == "pitch_level" and facts.get("f0_median_hz"):
            bands = {"male": ac.MALE_PITCH_BANDS, "female": ac.FEMALE_PITCH_BANDS}.get(facts.get("gender"),
                                                                                        ac.ABSOLUTE_PITCH_BANDS)
            return any(abs(facts["f0_median_hz"] / b - 1) < BORDERLINE["f0_median_hz"] for b in bands)
        if f == "speaking_rate" and facts.get("syllables_per_second"):
            return any(abs(facts["syllables_per_second"] / b - 1) < BORDERLINE["syllables_per_second"]
                       for b in (ac.SLOW_SYL_PER_S, ac.FAST_SYL_PER_S))
        if f == "noise" and facts.get("snr_db") is not None:
            return abs(facts["snr_db"] - ac.CLEAN_SNR_DB) < BORDERLINE["snr_db"]
        if f == "gender" and facts.get("gender_confidence") is not None:
            return facts["gender_confidence"] < BORDERLINE["gender_confidence"]
        return False
