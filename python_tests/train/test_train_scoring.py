"""WER, multiple-choice extraction and per-task scoring against hand-computed cases."""
from __future__ import annotations

import pytest

from eureka_fast.train.evaluate import format_table, score_predictions
from eureka_fast.train.metrics_text import (corpus_wer, extract_choice, normalize_exact, parse_options,
                                            strip_reasoning, word_edit_distance)


def test_word_edit_distance_hand_cases():
    assert word_edit_distance("a b c".split(), "a b c".split()) == (0, 0, 0)
    assert word_edit_distance("a b c".split(), "a x c".split()) == (1, 0, 0)
    assert word_edit_distance("a b c".split(), "a c".split()) == (0, 1, 0)
    assert word_edit_distance("a b c".split(), "a b c d".split()) == (0, 0, 1)
    assert word_edit_distance([], "x y".split()) == (0, 0, 2)
    assert word_edit_distance("x y".split(), []) == (0, 2, 0)
    # kitten -> sitting at word level: 3 edits (2 substitutions, 1 insertion)
    s, d, i = word_edit_distance("k i t t e n".split(), "s i t t i n g".split())
    assert (s, d, i) == (2, 0, 1)


def test_corpus_wer_is_total_edits_over_total_reference_words():
    refs = ["the cat sat", "hello world how are you today"]  # 3 + 6 words
    hyps = ["the cat sat down", "hello word how are you today"]  # 1 insertion, 1 substitution
    w = corpus_wer(refs, hyps, normalize=False)
    assert (w.edits, w.ref_words, w.insertions, w.substitutions) == (2, 9, 1, 1)
    assert w.wer == pytest.approx(2 / 9)
    # the mean of per-utterance WERs would be (1/3 + 1/6) / 2 = 0.25: corpus WER is not that
    assert w.wer != pytest.approx(0.25)


def test_corpus_wer_uses_whisper_english_normaliser():
    # case, punctuation, contractions and British spellings are normalised away
    w = corpus_wer(["Hello, World! It's colour."], ["hello world it is color"])
    assert w.edits == 0 and w.ref_words == 5
    assert corpus_wer(["Mr. Smith"], ["mister smith"]).wer == 0.0


@pytest.mark.parametrize("output,expected", [
    ("B", "B"), ("(C)", "C"), ("D.", "D"), ("A) a dog barking", "A"), ("c", None),
    ("The answer is B.", "B"), ("Answer: (d)", "D"), ("I think the correct answer is option C", "C"),
    ("<THINK>A seems wrong, B maybe</THINK><RESPONSE>C</RESPONSE>", "C"),
    ("<THINK>considering A and B</THINK><RESPONSE>B. Rain</RESPONSE>", "B"),
    ("It is a dog barking.", "A"),  # matched by the option text
    ("Either A or B", None),  # ambiguous
    ("", None),
])
def test_extract_choice(output, expected):
    options = parse_options("What is heard?\nA. A dog barking\nB. Rain\nC. A car horn\nD. Silence")
    assert extract_choice(output, options) == expected


def test_parse_options_and_strip_reasoning():
    assert parse_options("Q?\nA. x\n(B) y\nC) z") == {"A": "x", "B": "y", "C": "z"}
    assert strip_reasoning("<THINK>hmm</THINK><RESPONSE> yes </RESPONSE>") == "yes"
    assert strip_reasoning("<THINK>hmm</THINK> plain") == "plain"
    assert normalize_exact("4 7, 1-9!") == "4719"


def test_score_predictions_per_task():
    rows = [
        {"id": "1", "task": "asr", "gold": "the cat sat", "prediction": "the cat sat", "question": ""},
        {"id": "2", "task": "asr", "gold": "a b", "prediction": "a", "question": ""},
        {"id": "3", "task": "qa", "gold": "B", "prediction": "<RESPONSE>B</RESPONSE>", "question": "Q\nA. x\nB. y"},
        {"id": "4", "task": "qa", "gold": "A", "prediction": "no idea", "question": "Q\nA. x\nB. y"},
        {"id": "5", "task": "digits", "gold": "4 7 1", "prediction": "471", "question": ""},
    ]
    report = score_predictions(rows)
    assert report["asr"]["wer"] == pytest.approx(1 / 5) and report["asr"]["exact_match"] == 0.5
    assert report["qa"]["accuracy"] == 0.5 and report["qa"]["unparsed"] == 1
    assert report["digits"]["exact_match"] == 1.0
    table = format_table(report)
    assert "20.00%" in table and "50.00%" in table and "digits" in table
