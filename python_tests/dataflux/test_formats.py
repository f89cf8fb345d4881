"""Strict formats, taxonomy loading, near-duplicate detection."""
import json

import pytest

from eureka_fast.dataflux.schemas import (FormatError, GENERATOR_SCHEMA, JUDGE_SCHEMA, format_question,
                                          near_duplicate, parse_json_object, parse_question, parse_trace,
                                          validate_generator_output)
from eureka_fast.dataflux.taxonomy import TaxonomyError, load_taxonomy

Q = "What do you hear?\nA. a dog\nB. a cat\nC. a bird\nD. rain"


def test_parse_question_roundtrip():
    stem, opts = parse_question(format_question("What do you hear?", ["a dog", "a cat", "a bird", "rain"]))
    assert stem == "What do you hear?" and opts == ["a dog", "a cat", "a bird", "rain"]


@pytest.mark.parametrize("bad,why", [
    ("What?\nA. x\nB. y\nC. z", "A, B, C, D"),
    ("What?\nA. x\nB. y\nD. z\nC. w", "A, B, C, D"),
    ("A. x\nB. y\nC. z\nD. w", "no stem"),
    ("What?\nA. x\nB. x\nC. z\nD. w", "not distinct"),
    ("What?\nA. x\nB. y\nC. z\nD. w\nanswer: A", "after the options"),
])
def test_parse_question_rejects(bad, why):
    with pytest.raises(FormatError, match=why):
        parse_question(bad)


def test_parse_trace():
    assert parse_trace("<THINK>because</THINK><RESPONSE>B</RESPONSE>") == ("because", "B")
    assert parse_trace(" <THINK>x</THINK>\n<RESPONSE>C. a bird</RESPONSE> ")[1] == "C"
    for bad in ("B", "<THINK></THINK><RESPONSE>B</RESPONSE>", "<THINK>x</THINK><RESPONSE>E</RESPONSE>",
                "<THINK>x</THINK><RESPONSE>B</RESPONSE> trailing", "<RESPONSE>B</RESPONSE>"):
        with pytest.raises(FormatError):
            parse_trace(bad)


def test_generator_json_strict():
    good = json.dumps({"is_success": True, "questions": [Q.replace("hear", w) for w in "abcde"]})
    obj = parse_json_object(good, GENERATOR_SCHEMA, "gen")
    assert len(validate_generator_output(obj, 5)) == 5
    assert parse_json_object("```json\n" + good + "\n```", GENERATOR_SCHEMA, "gen") == obj
    with pytest.raises(FormatError, match="not valid JSON"):
        parse_json_object("Sure! " + good, GENERATOR_SCHEMA, "gen")
    with pytest.raises(FormatError, match="schema violation"):
        parse_json_object('{"is_success": "yes", "questions": []}', GENERATOR_SCHEMA, "gen")
    with pytest.raises(FormatError, match="expected 5 questions"):
        validate_generator_output({"is_success": True, "questions": [Q] * 4}, 5)
    with pytest.raises(FormatError, match="not distinct"):
        validate_generator_output({"is_success": True, "questions": [Q] * 5}, 5)
    assert validate_generator_output({"is_success": False, "questions": []}, 5) == []


def test_judge_schema():
    v = {"consensus": True, "consistency_with_caption": "STRONG_MATCH", "winner": "TIE", "reasoning": "ok",
         "final_action": "KEEP_USING_WINNER"}
    assert parse_json_object(json.dumps(v), JUDGE_SCHEMA, "judge") == v
    with pytest.raises(FormatError):
        parse_json_object(json.dumps({**v, "winner": "MODEL_C"}), JUDGE_SCHEMA, "judge")
    with pytest.raises(FormatError):
        parse_json_object(json.dumps({k: v[k] for k in list(v)[:3]}), JUDGE_SCHEMA, "judge")


def test_near_duplicate():
    assert near_duplicate("How fast is the person speaking?", "How fast is the person speaking")
    assert near_duplicate("How fast is the person speaking?", "how FAST is this person speaking?")
    assert not near_duplicate("How fast is the person speaking?", "Which word does the speaker say?")


def test_default_taxonomy_levels_and_templates():
    cats = load_taxonomy()
    assert {c.id for c in cats} >= {"speaker_gender", "pitch_level", "speaking_rate", "background_noise",
                                    "clip_duration", "spoken_word"}
    for c in cats:
        assert len(c.path) == 4 and len(set(c.templates)) >= 5
        for i, a in enumerate(c.templates):  # templates of a category must not be near-duplicates of each other
            assert not any(near_duplicate(a, b) for b in c.templates[i + 1:]), (c.id, a)
    g = next(c for c in cats if c.id == "speaker_gender")
    assert g.path_str == "Speech > Paralinguistics > Speaker traits > Gender"
    assert g.option_value("a man.") == "male" and g.option_value("A young child") is None


def test_taxonomy_errors(tmp_path):
    p = tmp_path / "t.yaml"
    p.write_text("taxonomy:\n  A:\n    B:\n      C:\n        D:\n          id: x\n          kind: class\n"
                 "          fact: f\n          templates: [a, b]\n")
    with pytest.raises(TaxonomyError, match="at least 5 distinct templates"):
        load_taxonomy(str(p))
    p.write_text("taxonomy:\n  A:\n    B:\n      id: x\n      kind: class\n")
    with pytest.raises(TaxonomyError, match="expected L3"):
        load_taxonomy(str(p))
    with pytest.raises(TaxonomyError, match="cannot read"):
        load_taxonomy(str(tmp_path / "missing.yaml"))
