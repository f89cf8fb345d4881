"""Built-in generator, answerers and judge, and the closed loop over them on labelled espeak clips (no ASR: the
known text stands in for the transcript so this stays fast)."""
import asyncio
from collections import Counter

import pytest

from eureka_fast.dataflux.builtin_roles import MeasuringAnswerer, RuleJudge, TemplateQueryGenerator
from eureka_fast.dataflux.captioner import BuiltinCaptioner
from eureka_fast.dataflux.pipeline import Settings, process_clip
from eureka_fast.dataflux.roles import BuiltinGeneratorRole, BuiltinJudgeRole, ClipContext, Roles
from eureka_fast.dataflux.schemas import LETTERS, format_question, parse_question, parse_trace, validate_generator_output
from eureka_fast.dataflux.synthetic import KnownTextASR
from eureka_fast.dataflux.taxonomy import load_taxonomy

TAX = load_taxonomy()
CAT = {c.id: c for c in TAX}


FACTS = {"has_speech": True, "gender": "female", "pitch_level": "high", "speaking_rate": "normal",
         "noise": "noisy", "duration_s": 4.2, "transcript": "Please remember to bring your umbrella today",
         "f0_median_hz": 280.0, "words_per_second": 2.9, "snr_db": 8.0, "gender_score": 0.9}


def test_generator_five_distinct_questions_randomised_positions():
    gen = TemplateQueryGenerator()
    positions = Counter()
    for cat in TAX:
        for clip in range(12):
            reply, answers = gen.generate(cat, FACTS, 5, round_idx=1, seed=0, clip_id=f"c{clip}")
            parsed = validate_generator_output(reply, 5)  # strict schema + 5 distinct 4-option questions
            assert set(reply) == {"is_success", "questions"}  # no answer key in the reply itself
            for (stem, options), letter in zip(parsed, answers):
                positions[letter] += 1
                assert "caption" not in stem.lower()
                # the intended option is what the judge derives from the facts
                assert RuleJudge._gold_letter(cat, options, FACTS) == letter, (cat.id, stem, options)
    n = sum(positions.values())
    assert set(positions) == set(LETTERS) and all(abs(v / n - 0.25) < 0.06 for v in positions.values()), positions


def test_generator_rejects_clips_that_do_not_fit():
    gen = TemplateQueryGenerator()
    silent = {"has_speech": False, "duration_s": 3.0, "noise": "clean", "transcript": ""}
    for cid in ("speaker_gender", "pitch_level", "speaking_rate", "spoken_word"):
        assert gen.generate(CAT[cid], silent, 5, round_idx=1)[0] == {"is_success": False, "questions": []}
    assert gen.generate(CAT["background_noise"], silent, 5, round_idx=1)[0]["is_success"]


def test_generator_avoids_kept_stems_and_is_deterministic():
    gen = TemplateQueryGenerator()
    first, _ = gen.generate(CAT["speaking_rate"], FACTS, 5, round_idx=1, seed=3, clip_id="x")
    again, _ = gen.generate(CAT["speaking_rate"], FACTS, 5, round_idx=1, seed=3, clip_id="x")
    assert first == again
    kept = [parse_question(q)[0] for q in first["questions"][:4]]
    more, _ = gen.generate(CAT["speaking_rate"], FACTS, 1, round_idx=2, avoid_stems=kept, seed=3, clip_id="x")
    assert parse_question(more["questions"][0])[0] not in kept


Q = format_question("Who is speaking?", ["A man", "A young child", "A woman", "A chorus of several voices"])


def trace(concl, letter):
    return f"<THINK>measured. Conclusion: {concl}.</THINK><RESPONSE>{letter}</RESPONSE>"


@pytest.mark.parametrize("a,b,consensus,winner,action", [
    (trace("female", "C"), trace("female", "C"), True, "TIE", "KEEP_USING_WINNER"),
    (trace("male", "A"), trace("female", "C"), False, "MODEL_B", "KEEP_USING_WINNER"),
    (trace("female", "C"), "C", False, "MODEL_A", "KEEP_USING_WINNER"),            # B malformed
    (trace("male", "A"), trace("male", "A"), True, "NONE", "DISCARD"),              # both contradict the caption
    (trace("male", "C"), trace("male", "A"), False, "NONE", "DISCARD"),             # A's logic contradicts its answer
])
def test_rule_judge(a, b, consensus, winner, action):
    v = RuleJudge().judge(CAT["speaker_gender"], "caption", FACTS, Q, a, b)
    assert (v["consensus"], v["winner"], v["final_action"]) == (consensus, winner, action), v
    assert v["consistency_with_caption"] == ("CONFLICT" if winner == "NONE" else "STRONG_MATCH")


def test_rule_judge_weak_match_near_threshold():
    facts = dict(FACTS, gender="male", pitch_level="medium", f0_median_hz=96.0)
    q = format_question("How high?", ["A notably high pitch", "An average, mid-range pitch", "A deep, low pitch",
                                      "Whispered, with no audible pitch"])
    v = RuleJudge().judge(CAT["pitch_level"], "c", facts, q, trace("medium", "B"), trace("low", "C"))
    assert v["winner"] == "MODEL_A" and v["consistency_with_caption"] == "WEAK_MATCH"
    assert v["final_action"] == "KEEP_USING_WINNER" and not v["consensus"]


def test_answerers_measure_labelled_clips(small_clips):
    clips, _, _ = small_clips
    asr = KnownTextASR(clips)
    answerers = [MeasuringAnswerer(m, asr, TAX) for m in ("a", "b")]
    hits = Counter()
    clips = [clips[i] for i in (0, 3, 5, 6)]  # both genders, clean / 5 dB / 5 dB / 30 dB
    for c in clips:
        ctx = ClipContext(c.clip_id, "", c.audio)
        for cat_id in ("speaker_gender", "background_noise"):
            cat = CAT[cat_id]
            value = c.labels[cat.fact]
            options = [cat.values[value][0]] + [ph[0] for v, ph in cat.values.items() if v != value]
            options = (options + list(cat.distractors))[:4]
            q = format_question(cat.templates[0], options)
            for ans in answerers:
                _, letter = parse_trace(ans.answer(ctx, q))
                hits[(ans.method, cat_id)] += letter == "A"
    # method a is the stronger one on gender; both are reliable on noise
    assert hits[("a", "speaker_gender")] == len(clips), hits
    assert hits[("a", "background_noise")] == hits[("b", "background_noise")] == len(clips), hits
    assert hits[("b", "speaker_gender")] >= len(clips) - 1, hits


def test_closed_loop_builtin_roles(small_clips):
    clips, paths, _ = small_clips
    asr = KnownTextASR(clips)

    class Cap:
        name = "builtin-captioner+known-text"

        async def caption(self, ctx):
            return BuiltinCaptioner(asr).caption(ctx.audio)

    class Ans:
        def __init__(self, m):
            self.impl = MeasuringAnswerer(m, asr, TAX)
            self.name = self.impl.name

        async def answer(self, ctx, q):
            return self.impl.answer(ctx, q)

    roles = Roles(Cap(), BuiltinGeneratorRole(), Ans("a"), Ans("b"), BuiltinJudgeRole())
    c = clips[5]  # f3, noisy
    res = asyncio.run(process_clip(c.clip_id, paths[c.clip_id], roles, TAX, Settings(rounds=3)))
    assert res.status == "ok"
    by_cat = Counter(r["meta"]["category_id"] for r in res.kept)
    assert all(v == 5 for v in by_cat.values()) and len(by_cat) == 6, by_cat
    for r in res.kept:
        # the kept answer is the one the facts support, and the record is the training format
        assert r["answer"] == r["meta"]["intended_answer"]
        assert r["messages"][2]["content"][0]["text"].endswith(f"<RESPONSE>{r['answer']}</RESPONSE>")
    assert res.caption_record["facts"]["gender"] == "female"


def test_role_bugs_are_recorded_not_fatal(small_clips):
    """An exception inside a role (not a backend error) costs only the affected items, each with a reason."""
    clips, paths, _ = small_clips
    asr = KnownTextASR(clips)

    class Cap:
        name = "cap"

        async def caption(self, ctx):
            return BuiltinCaptioner(asr).caption(ctx.audio)

    class Broken:
        name = "broken"

        async def answer(self, ctx, q):
            raise RuntimeError("answerer bug")

    class Gen(BuiltinGeneratorRole):
        async def generate(self, ctx, category, *a, **k):
            if category.id == "pitch_level":
                raise ZeroDivisionError("generator bug")
            return await super().generate(ctx, category, *a, **k)

    class Ans:
        name = "a"

        async def answer(self, ctx, q):
            return MeasuringAnswerer("a", asr, TAX).answer(ctx, q)

    c = clips[0]
    both_broken = Roles(Cap(), Gen(), Broken(), Broken(), BuiltinJudgeRole())
    res = asyncio.run(process_clip(c.clip_id, paths[c.clip_id], both_broken, TAX, Settings(rounds=2)))
    assert res.status == "ok" and not res.kept
    reasons = Counter(r["reason"] for r in res.rejected)
    assert reasons["generator_error"] == 2  # pitch_level, both rounds
    assert reasons["answerers_failed"] == 5 * 2 * 5  # 5 other categories x 2 rounds x 5 questions
    one_broken = Roles(Cap(), BuiltinGeneratorRole(), Ans(), Broken(), BuiltinJudgeRole())
    res = asyncio.run(process_clip(c.clip_id, paths[c.clip_id], one_broken, TAX,
                                   Settings(rounds=1, categories=("clip_duration",))))
    assert len(res.kept) == 5 and all(r["meta"]["winner"] == "MODEL_A" and not r["meta"]["hard"] for r in res.kept)
    assert res.events["answerer_b.failed_item"] == 5


def test_content_questions_need_a_second_recogniser_that_agrees():
    from eureka_fast.dataflux.asr import check_transcript

    gen = TemplateQueryGenerator()
    said = "Please remember to bring your umbrella today"
    # the second recogniser heard the same words (punctuation and case aside): verified, every word confirmed
    same = check_transcript(said, "please remember to bring your umbrella today.", "other")
    assert same["verified"] and same["agreement"] == 1.0 and "umbrella" in same["confirmed_words"]
    # a mistranscription: 3 of 7 words differ -> agreement 4/7, no content question at all
    bad = check_transcript(said, "Please remember to ring a roundfire stump", "other")
    assert bad["agreement"] == pytest.approx(1 - 4 / 7, abs=1e-3) and not bad["verified"]
    reply, _ = gen.generate(CAT["spoken_word"], dict(FACTS, transcript_check=bad), 5, round_idx=1)
    assert reply == {"is_success": False, "questions": []}
    # no second recogniser could check: no content question either
    unchecked = {"recogniser": None, "verified": False, "reason": "no second recogniser installed"}
    assert not gen.generate(CAT["spoken_word"], dict(FACTS, transcript_check=unchecked), 5, round_idx=1)[0][
        "is_success"]
    # mostly agreeing (one word differs): the answer is always a word both recognisers heard
    close = check_transcript(said, "Please remember to bring your umbrella toady", "other")
    assert close["verified"] and "today" not in close["confirmed_words"]
    for clip in range(20):
        reply, answers = gen.generate(CAT["spoken_word"], dict(FACTS, transcript_check=close), 1, round_idx=1,
                                      clip_id=f"c{clip}")
        _, options = parse_question(reply["questions"][0])
        assert options[LETTERS.index(answers[0])] in close["confirmed_words"]


def test_answerer_b_reads_the_second_recogniser(monkeypatch):
    from eureka_fast.dataflux import asr as asr_mod

    class Named:
        def __init__(self, name, text):
            self.name, self.text = name, text

        def transcribe(self, audio):
            return self.text

    first, second = Named("first", "a roundfire stump"), Named("second", "a round fire stand")
    monkeypatch.setattr(asr_mod, "second_recogniser", lambda primary: second if primary is first else None)
    a, b = MeasuringAnswerer("a", first, TAX), MeasuringAnswerer("b", first, TAX)
    assert a.asr is first and b.asr is second
    import numpy as np

    ctx = ClipContext("c", "", np.zeros(16000, np.float32))
    q = format_question(CAT["spoken_word"].templates[0], ["roundfire", "volcano", "pencil", "mirror"])
    _, letter_a = parse_trace(a.answer(ctx, q))
    trace_b = b.answer(ctx, q)
    assert letter_a == "A" and "undetermined" in trace_b  # b did not hear "roundfire": the answers disagree


def test_pitch_questions_on_absolute_bands_do_not_compare_with_the_speakers_kind():
    gen = TemplateQueryGenerator()
    facts = dict(FACTS, gender="unknown", pitch_level="medium", pitch_level_basis="absolute bands")
    assert not gen.generate(CAT["speaker_gender"], facts, 5, round_idx=1)[0]["is_success"]  # no gender question
    for clip in range(10):
        reply, answers = gen.generate(CAT["pitch_level"], facts, 5, round_idx=1, clip_id=f"c{clip}")
        for (stem, options), letter in zip(validate_generator_output(reply, 5), answers):
            assert not any(w in stem.lower() for w in ("same kind", "voice type"))
            assert "gender" not in options[LETTERS.index(letter)] and "kind of voice" not in options[
                LETTERS.index(letter)]
            assert RuleJudge._gold_letter(CAT["pitch_level"], options, facts) == letter


def test_captioner_role_cross_checks_the_transcript(small_clips):
    from eureka_fast.dataflux.roles import BuiltinCaptionerRole

    clips, _, _ = small_clips
    clip = clips[1]  # slow, 10 dB

    class Fixed:
        def __init__(self, name, text):
            self.name, self.text = name, text

        def transcribe(self, audio):
            return self.text

    def caption(first, second):
        role = BuiltinCaptionerRole.__new__(BuiltinCaptionerRole)
        role.asr, role.check_asr = first, second
        return asyncio.run(role.caption(ClipContext(clip.clip_id, "", clip.audio)))[1]

    agree = caption(Fixed("first", clip.text), Fixed("second", clip.text.upper()))
    assert agree["transcript_check"]["verified"] and agree["syllable_basis"] == "transcript"
    assert agree["speaking_rate"] == clip.labels["speaking_rate"]
    # the recognisers disagree (as on speech in a language they do not know): no content question, and the
    # syllables are counted in the signal instead of in a text nobody confirmed
    other = caption(Fixed("first", clip.text), Fixed("second", "completely different words were heard here"))
    assert not other["transcript_check"]["verified"] and other["syllable_basis"] == "syllable nuclei"
    reply, _ = TemplateQueryGenerator().generate(CAT["spoken_word"], other, 5, round_idx=1)
    assert not reply["is_success"]
