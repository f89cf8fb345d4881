"""The recipe's DataFlux step and manifests: a real quick corpus, real offline DataFlux over 6 of its training clips,
manifests read back with the trainer's own reader; eval gold answers checked against the corpus labels through the
DataFlux taxonomy's own option phrasings; the caption wording round-trips every label combination."""
from __future__ import annotations

import itertools
import json
import os

import pytest

from eureka_fast.dataflux.synthetic import espeak_available
from eureka_fast.recipe.manifests import caption_from_facts, facts_from_caption

LABELS = {"gender": ("male", "female"), "pitch_level": ("low", "medium", "high"),
          "speaking_rate": ("slow", "normal", "fast"), "noise": ("clean", "noisy")}
needs_espeak = pytest.mark.skipif(not espeak_available(), reason="needs espeak-ng (program or espeakng-loader wheel)")


# ============================================================================================ captions

def _every_label_combination():
    options = [[None, *values] for values in LABELS.values()]
    for combo in itertools.product(*options):
        yield {attr: v for attr, v in zip(LABELS, combo) if v is not None}


@pytest.mark.parametrize("text", [None, "The quick brown fox jumps over the lazy dog.",
                                  "Is the man with a high pitched voice fast, slow, noisy or clean? A woman said: no."])
def test_facts_round_trip_through_the_caption_for_every_label_combination(text):
    combos = list(_every_label_combination())
    assert len(combos) == 3 * 4 * 4 * 3
    for facts in combos:
        caption = caption_from_facts(facts, text)
        assert facts_from_caption(caption) == facts, caption
        if text:
            assert caption.endswith(f'"{text}"')


def test_caption_reads_dataflux_facts_and_leaves_out_what_is_unknown():
    facts = {"has_speech": True, "gender": "unknown", "pitch_level": "high", "pitch_level_basis": "absolute bands",
             "speaking_rate": None, "noise": "noisy", "transcript": "hello there", "f0_median_hz": 240.0}
    caption = caption_from_facts(facts)
    assert facts_from_caption(caption) == {"noise": "noisy"}  # no gender, no sex-relative pitch, no rate
    facts.update(gender="female", pitch_level_basis="female range", speaking_rate="slow")
    assert facts_from_caption(caption_from_facts(facts)) == {"gender": "female", "pitch_level": "high",
                                                              "speaking_rate": "slow", "noise": "noisy"}
    assert facts_from_caption(caption_from_facts({"has_speech": False, "noise": "clean"})) == {"noise": "clean"}


def test_facts_from_caption_on_free_wording():
    assert facts_from_caption("A woman with a normal-pitched voice talks at a fast pace in a noisy room.") == {
        "gender": "female", "pitch_level": "medium", "speaking_rate": "fast", "noise": "noisy"}
    # both ways at once: not stated
    assert facts_from_caption("A male and a female speaker; the recording is clean but noisy.") == {}
    assert facts_from_caption("") == {} and facts_from_caption(None) == {}
    # the spoken words are never read as facts
    assert facts_from_caption('A speaker. The speaker says: "the male nurse has a slow pace and a low-pitched '
                              'radio, noisy"') == {}


# ============================================================================================ DataFlux + manifests

@pytest.fixture(scope="module")
def recipe_data(tmp_path_factory):
    import time

    from eureka_fast.recipe.corpus import build_corpus
    from eureka_fast.recipe.manifests import build_manifests, run_dataflux

    root = tmp_path_factory.mktemp("recipe")
    corpus_dir, flux_dir, out_dir = str(root / "corpus"), str(root / "dataflux"), str(root / "manifests")
    build_corpus(corpus_dir, quick=True, seed=0, workers=2, progress=False)
    t0 = time.perf_counter()
    lines = []
    stats = run_dataflux(corpus_dir, flux_dir, quick=True, workers=2, progress=lines.append)
    flux_seconds = time.perf_counter() - t0
    paths = build_manifests(corpus_dir, flux_dir, out_dir, seed=0)
    return {"corpus": corpus_dir, "flux": flux_dir, "out": out_dir, "stats": stats, "paths": paths, "lines": lines,
            "flux_seconds": flux_seconds}


def _read(path):
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def _corpus_rows(corpus_dir):
    from eureka_fast.recipe.corpus import read_corpus

    return {r["id"]: r for r in read_corpus(corpus_dir)}


@needs_espeak
@pytest.mark.slow
def test_dataflux_over_six_training_clips_writes_records(recipe_data):
    from eureka_fast.dataflux.store import RunStore
    from eureka_fast.recipe.manifests import QUICK_CLIPS

    flux = recipe_data["flux"]
    with open(os.path.join(flux, "manifest.json"), encoding="utf-8") as fh:
        manifest = json.load(fh)
    assert manifest["complete"] and len(manifest["done"]) == QUICK_CLIPS == recipe_data["stats"]["clips"]
    store = RunStore(flux)
    store.manifest = manifest
    captions = store.read_jsonl("captions.jsonl")
    kept = store.records("data")
    assert len(captions) == QUICK_CLIPS
    train_dir = os.path.realpath(os.path.join(recipe_data["corpus"], "audio", "train"))
    assert all(os.path.dirname(os.path.realpath(c["audio"])) == train_dir for c in captions)  # training audio only
    assert len(kept) >= QUICK_CLIPS  # verified questions, several per clip
    assert {r["meta"]["category_id"] for r in kept} >= {"speaker_gender", "background_noise"}
    assert recipe_data["stats"]["clips_per_second"] > 0
    assert any("dataflux" in line for line in recipe_data["lines"])
    # a second call resumes the finished run: nothing redone, same records
    from eureka_fast.recipe.manifests import run_dataflux

    again = run_dataflux(recipe_data["corpus"], flux, quick=True, progress=False)
    assert again["clips"] == QUICK_CLIPS and again["run"]["clips_this_session"] == 0
    assert store.records("data") == kept


@needs_espeak
@pytest.mark.slow
def test_manifests_parse_with_the_trainers_reader_with_nothing_skipped(recipe_data):
    from eureka_fast.train.data import SkipCounter, read_manifest

    paths = recipe_data["paths"]
    assert set(paths) == {"align", "joint", "sft", "eval_asr", "eval_mc", "eval_caption"}
    for name, path in paths.items():
        skips = SkipCounter()
        records = read_manifest(path, skips, check_audio=True)
        assert skips.total == 0, (name, skips.as_dict())
        assert len(records) == len(_read(path)) > 0
        for rec in records:
            assert all(os.path.exists(a) for a in rec.audio) and len(rec.audio) == 1
        # relative audio paths: the recipe directory can move
        assert all(not os.path.isabs(m["content"][0]["audio_url"]["url"]) for r in _read(path)
                   for m in r["messages"] if m["role"] == "user")


@needs_espeak
@pytest.mark.slow
def test_manifest_contents_follow_the_official_prompts_and_the_corpus(recipe_data):
    from eureka_fast.inference import ASR_SYSTEM_PROMPT, CAPTION_PROMPT

    rows = _corpus_rows(recipe_data["corpus"])
    paths = recipe_data["paths"]
    train = {i for i, r in rows.items() if r["split"] == "train"}
    held = {i for i, r in rows.items() if r["split"] == "heldout"}

    align = _read(paths["align"])
    assert {r["meta"]["clip_id"] for r in align} == train and len(align) == len(train)
    for r in align:
        assert r["task"] == "asr" and r["messages"][0] == {"role": "system", "content": ASR_SYSTEM_PROMPT}
        assert [it["type"] for it in r["messages"][1]["content"]] == ["audio_url"]
        assert r["messages"][-1]["content"][0]["text"] == rows[r["meta"]["clip_id"]]["text"] == r["answer"]

    joint = _read(paths["joint"])
    captions = [r for r in joint if r["task"] == "caption"]
    assert len(captions) == 6 and len(joint) == len(train) + 6
    for r in captions:
        assert r["messages"][0]["content"][1] == {"type": "text", "text": CAPTION_PROMPT}
        assert rows[r["meta"]["clip_id"]]["text"] in r["messages"][-1]["content"][0]["text"]

    sft = _read(paths["sft"])
    questions = [r for r in sft if r["id"].startswith("dataflux-")]
    assert questions and {r["task"] for r in sft} >= {"asr", "caption", "paralinguistic", "qa"}
    from eureka_fast.dataflux.store import RunStore

    store = RunStore(recipe_data["flux"])
    with open(os.path.join(recipe_data["flux"], "manifest.json"), encoding="utf-8") as fh:
        store.manifest = json.load(fh)
    by_id = {r["id"]: r for r in store.records("data")}
    assert len(questions) == len(by_id)
    for r in questions:
        source = by_id[r["meta"]["dataflux_id"]]
        asked = r["messages"][0]["content"][1]["text"]
        assert asked == source["messages"][1]["content"][1]["text"]  # DataFlux's question, verbatim
        assert r["messages"][0]["role"] == "user" and len(r["messages"]) == 2  # the official qa prompt
        assert r["answer"] == source["answer"] and r["messages"][-1]["content"][0]["text"].startswith(
            f"{source['answer']}. ")
    assert not any(r["meta"]["clip_id"] in held for r in align + joint)


@needs_espeak
@pytest.mark.slow
def test_eval_mc_gold_answers_are_the_corpus_labels(recipe_data):
    from eureka_fast.dataflux.schemas import parse_question
    from eureka_fast.dataflux.taxonomy import load_taxonomy

    categories = {c.id: c for c in load_taxonomy()}
    which = {"gender": "speaker_gender", "pitch_level": "pitch_level", "speaking_rate": "speaking_rate",
             "noise": "background_noise"}
    rows = _corpus_rows(recipe_data["corpus"])
    mc = _read(recipe_data["paths"]["eval_mc"])
    held = [i for i, r in rows.items() if r["split"] == "heldout"]
    assert len(mc) == 4 * len(held)
    letters = set()
    for r in mc:
        clip = rows[r["meta"]["clip_id"]]
        assert clip["split"] == "heldout" and r["task"] == f"mc_{r['attribute']}"
        stem, options = parse_question(r["messages"][0]["content"][1]["text"])
        assert stem in categories[which[r["attribute"]]].templates  # DataFlux's wording
        chosen = options["ABCD".index(r["answer"])]
        assert categories[which[r["attribute"]]].option_value(chosen) == clip[r["attribute"]] == r["gold_value"]
        letters.add(r["answer"])
    assert len(letters) >= 3  # options are shuffled, the answer is not always in one place
    cap = _read(recipe_data["paths"]["eval_caption"])
    asr = _read(recipe_data["paths"]["eval_asr"])
    assert {r["meta"]["clip_id"] for r in cap} == {r["meta"]["clip_id"] for r in asr} == set(held)
    for r in cap:
        clip = rows[r["meta"]["clip_id"]]
        assert r["labels"] == {a: clip[a] for a in LABELS}
        assert facts_from_caption(r["messages"][-1]["content"][0]["text"]) == r["labels"]


@needs_espeak
@pytest.mark.slow
def test_manifests_refuse_foreign_or_unfinished_dataflux_output(recipe_data, tmp_path):
    import shutil

    from eureka_fast.recipe.manifests import ManifestError, build_manifests

    with pytest.raises(ManifestError, match="no DataFlux run"):
        build_manifests(recipe_data["corpus"], str(tmp_path / "nothing"), str(tmp_path / "m1"))
    unfinished = str(tmp_path / "unfinished")
    shutil.copytree(recipe_data["flux"], unfinished)
    with open(os.path.join(unfinished, "manifest.json"), encoding="utf-8") as fh:
        manifest = json.load(fh)
    manifest["complete"] = False
    with open(os.path.join(unfinished, "manifest.json"), "w", encoding="utf-8") as fh:
        json.dump(manifest, fh)
    with pytest.raises(ManifestError, match="not complete"):
        build_manifests(recipe_data["corpus"], unfinished, str(tmp_path / "m2"))
    other = str(tmp_path / "other")  # the same corpus elsewhere: DataFlux ran over other files
    shutil.copytree(recipe_data["corpus"], other)
    with pytest.raises(ManifestError, match="not training clips"):
        build_manifests(other, recipe_data["flux"], str(tmp_path / "m3"))


@needs_espeak
@pytest.mark.slow
def test_a_folder_of_wavs_without_corpus_file_or_labels(recipe_data, tmp_path):
    """The user path: no corpus.jsonl -> DataFlux's captioned clips train, with confirmed transcripts as ASR
    targets and no eval manifests; a corpus.jsonl without labels -> eval manifests without eval_mc."""
    from eureka_fast.recipe.manifests import build_manifests
    from eureka_fast.train.data import SkipCounter, read_manifest

    paths = build_manifests(str(tmp_path / "no-corpus-here"), recipe_data["flux"], str(tmp_path / "m1"))
    assert set(paths) == {"align", "joint", "sft"}
    with open(os.path.join(recipe_data["flux"], "captions.jsonl"), encoding="utf-8") as fh:
        captions = [json.loads(line) for line in fh]
    confirmed = {os.path.realpath(c["audio"]): c["facts"]["transcript"] for c in captions
                 if c["facts"].get("transcript_check", {}).get("verified")}
    skips = SkipCounter()
    align = read_manifest(paths["align"], skips)
    assert skips.total == 0 and len(align) == len(confirmed) > 0
    for rec in align:
        assert rec.answer == confirmed[os.path.realpath(rec.audio[0])]
    assert len([r for r in _read(paths["joint"]) if r["task"] == "caption"]) == len(captions)

    bare = tmp_path / "bare"
    (bare / "audio").mkdir(parents=True)
    rows = list(_corpus_rows(recipe_data["corpus"]).values())
    import shutil

    shutil.copytree(os.path.join(recipe_data["corpus"], "audio", "heldout"), bare / "audio" / "heldout")
    with open(bare / "corpus.jsonl", "w", encoding="utf-8") as fh:
        for r in rows:
            audio = r["audio"] if r["split"] == "heldout" else r["audio_path"]  # train clips: where DataFlux saw them
            fh.write(json.dumps({"id": r["id"], "audio": audio, "split": r["split"], "text": r["text"]}) + "\n")
    paths = build_manifests(str(bare), recipe_data["flux"], str(tmp_path / "m2"))
    assert set(paths) == {"align", "joint", "sft", "eval_asr", "eval_caption"}
    assert all(r["labels"] == {} for r in _read(paths["eval_caption"]))
