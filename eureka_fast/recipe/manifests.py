"""The nano recipe's data steps after the corpus: DataFlux over the training audio, then the training and
evaluation manifests.

`run_dataflux(corpus_dir, out_dir)` runs DataFlux (the package's own `eureka_fast.dataflux.run_dataflux`, so a killed
run resumes) over corpus_dir/audio/train with the settings in eureka_fast/recipe/nano/dataflux.yaml: the built-in
offline roles (signal-analysis + Whisper tiny.en captioner, template question generator, two measuring answerers, rule
judge) and the categories gender, pitch level, speaking rate, background noise and spoken words.

`build_manifests(corpus_dir, dataflux_dir, out_dir)` writes conversation-record JSONL files in the trainer's format
(docs/INTERFACES.md, read by eureka_fast/train/data.py) with the official prompts (`eureka_fast.inference.
task_messages`):
- align.jsonl: ASR of every training clip (system ASR prompt, the audio, the transcript as the target);
- joint.jsonl: the ASR records plus a caption record per clip DataFlux captioned, the caption written by
  `caption_from_facts` from the captioner's facts (gender, pitch level, speaking rate, noise) and the clip's text;
- sft.jsonl: DataFlux's verified multiple-choice questions, with their question text as DataFlux wrote it (the
  target is the option letter and its text, or with reasoning=True DataFlux's kept answer trace), mixed with the ASR
  and caption records;
- eval_asr.jsonl, eval_mc.jsonl, eval_caption.jsonl: the held-out split (held-out voices speaking held-out
  sentences). eval_mc asks one question per clip and attribute ("attribute": gender | pitch_level | speaking_rate |
  noise, task "mc_<attribute>") in DataFlux's wording (its taxonomy templates and option phrasings, options shuffled
  by seed); the gold answers come from the corpus labels, never from DataFlux. eval_caption rows carry the clip's
  labels; `facts_from_caption` reads the attributes back out of a generated caption for the caption check.
Audio paths in the manifests are relative to the manifest directory, so the whole recipe directory can move. Every
file is read back with the trainer's reader before it is returned; a record it would skip is an error. summary.json
in out_dir counts the records and how often DataFlux's facts agree with the corpus labels.

From a folder of my wavs to manifests. Put the files under MY/audio/train/ (held-out ones under MY/audio/heldout/)
and write MY/corpus.jsonl, one row per file: {"id", "audio": "audio/train/x.wav" (relative to MY), "split": "train" |
"heldout", "text": the transcript}, optionally with the labels "gender" (male | female), "pitch_level" (low | medium
| high), "speaking_rate" (slow | normal | fast) and "noise" (clean | noisy) for the held-out checks. Copy
eureka_fast/recipe/nano/dataflux.yaml, edit it (categories, rounds; any role can be an OpenAI-compatible model
server), and run DataFlux over the training audio: `eureka-audio dataflux run --audio-dir MY/audio/train --out
MY/dataflux --config my_dataflux.yaml`, or `run_dataflux("MY", "MY/dataflux", config="my_dataflux.yaml")`. Then
`python -m eureka_fast.recipe.manifests MY MY/dataflux MY/manifests` (or `build_manifests("MY", "MY/dataflux",
"MY/manifests")`) writes align, joint, sft and, with a held-out split, the eval manifests. Without a corpus.jsonl,
every file DataFlux captioned is a training clip, its ASR target is DataFlux's transcript where the second recogniser
confirmed it (a clip with an unconfirmed transcript gets captions and questions but no ASR record), and no eval
manifests are written.
"""
from __future__ import annotations

import json
import os
import random
import re
import sys

from .corpus import LABELS, _reporter, read_corpus

NANO_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "nano")
DATAFLUX_CONFIG = os.path.join(NANO_DIR, "dataflux.yaml")
QUICK_CLIPS = 6  # clips DataFlux runs over in quick mode
SESSIONS_FILE = "recipe_sessions.json"  # throughput of each run_dataflux session, in the DataFlux directory

# eval_mc: corpus label -> the DataFlux taxonomy category that asks about it
ATTRIBUTE_CATEGORIES = {"gender": "speaker_gender", "pitch_level": "pitch_level", "speaking_rate": "speaking_rate",
                        "noise": "background_noise"}
MANIFEST_NAMES = ("align", "joint", "sft", "eval_asr", "eval_mc", "eval_caption")


class ManifestError(RuntimeError):
    """The inputs of a manifest build are missing or inconsistent (the message says which and how to fix it)."""


# ============================================================================================ captions

_PITCH_BASES = (None, "male range", "female range")


def _caption_values(facts: dict) -> dict:
    """The four caption attributes of a facts dict (corpus labels or DataFlux facts); unknown ones left out. A
    DataFlux pitch level read on absolute bands (sex unknown) is left out: the labels are relative to the sex."""
    out = {}
    if facts.get("gender") in LABELS["gender"]:
        out["gender"] = facts["gender"]
    if facts.get("pitch_level") in LABELS["pitch_level"] and facts.get("pitch_level_basis") in _PITCH_BASES:
        out["pitch_level"] = facts["pitch_level"]
    if facts.get("speaking_rate") in LABELS["speaking_rate"]:
        out["speaking_rate"] = facts["speaking_rate"]
    if facts.get("noise") in LABELS["noise"]:
        out["noise"] = facts["noise"]
    return out


def caption_from_facts(facts: dict, text: str | None = None) -> str:
    """The caption the recipe trains on: who speaks (gender), the pitch level and pace, the background, and what is
    said. `facts` holds corpus labels or DataFlux captioner facts; attributes that are missing or unknown are left
    out of the caption (never guessed). `facts_from_caption` reads them back."""
    if facts.get("has_speech") is False:
        first = "A recording with no detectable speech."
    else:
        v = _caption_values(facts)
        first = f"A {v['gender']} speaker" if "gender" in v else "A speaker"
        if "pitch_level" in v:
            first += f" with a {v['pitch_level']}-pitched voice"
        if "speaking_rate" in v:
            first += f", speaking at a {v['speaking_rate']} pace"
        elif "pitch_level" not in v:
            first += " is talking"
        first += "."
    noise = facts.get("noise")
    parts = [first]
    if noise == "clean":
        parts.append("The recording is clean, with no audible background noise.")
    elif noise == "noisy":
        parts.append("There is clearly audible background noise.")
    if text and text.strip() and facts.get("has_speech") is not False:
        parts.append(f'The speaker says: "{text.strip()}"')
    return " ".join(parts)


_SAID = re.compile(r"\b(?:says|said|saying)\s*:.*$", re.S | re.I)
_QUOTED = re.compile(r"\"[^\"]*\"|“[^”]*”")


def facts_from_caption(caption: str) -> dict:
    """gender / pitch_level / speaking_rate / noise as a caption states them, in the label words (pitch "normal"
    counts as "medium"); an attribute the caption does not state, or states both ways, is absent. What the speaker
    says (after "says:", or in quotes) is not read, so spoken words never count as facts."""
    text = _QUOTED.sub(" ", _SAID.sub(" ", str(caption or ""))).lower()
    out = {}

    def one(found: set, attr: str):
        if len(found) == 1:
            out[attr] = found.pop()

    genders = set(re.findall(r"\b(female|male)\b", text))
    if not genders:
        genders = {"female" if w == "woman" else "male" for w in re.findall(r"\b(woman|man)\b", text)}
    one(genders, "gender")
    one({"medium" if w in ("normal", "mid", "middle") else w
         for w in re.findall(r"\b(low|medium|mid|middle|normal|high)[- ]pitch(?:ed)?\b", text)}, "pitch_level")
    one(set(re.findall(r"\b(slow|normal|fast)\s+(?:pace|speed|rate|tempo|speaking rate)\b", text)), "speaking_rate")
    noise = set()
    if re.search(r"\bclearly audible (?:background )?noise|\bnoisy\b|\bbackground noise is audible", text):
        noise.add("noisy")
    if re.search(r"\bno audible (?:background )?noise|\brecording is clean\b|\bnoise-free\b", text):
        noise.add("clean")
    one(noise, "noise")
    return out


# ============================================================================================ DataFlux

def _dataflux_audio_dir(corpus_dir: str) -> str:
    train = os.path.join(corpus_dir, "audio", "train")
    return train if os.path.isdir(train) else corpus_dir


def run_dataflux(corpus_dir: str, out_dir: str, *, quick: bool = False, workers: int = 2, progress=None,
                 config: str | None = None, limit: int | None = None) -> dict:
    """DataFlux over corpus_dir/audio/train (corpus_dir itself when it has no audio/train) into out_dir, with the
    settings of `config` (default: the recipe's nano/dataflux.yaml) and `workers` clips in flight. An existing run
    in out_dir is resumed (finished clips are kept, the rest processed). quick: only the first QUICK_CLIPS clips;
    limit: only the first `limit` clips (sorted by path). Returns DataFlux's stats plus "clips_per_second" over
    every session that processed clips, and "clips" (clips committed). progress: None (DataFlux's progress bar and
    lines on stderr), False (silent) or a callable given each line."""
    from ..dataflux.runner import load_config
    from ..dataflux.runner import run_dataflux as dataflux_run
    from ..dataflux.store import RunStore
    from ..fsutil import atomic_write

    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    limit = QUICK_CLIPS if quick and limit is None else limit
    say = _reporter(progress)
    bar = progress is None
    if RunStore(out_dir).exists():
        say(f"dataflux: resuming the run in {out_dir}")
        stats = dataflux_run(None, out_dir, resume=True, progress=bar, limit=limit, log=say)
    else:
        audio_dir = _dataflux_audio_dir(corpus_dir)
        cfg = load_config(config or DATAFLUX_CONFIG, overrides={"workers": workers})
        stats = dataflux_run(audio_dir, out_dir, cfg, progress=bar, limit=limit, log=say)
    sessions_path = os.path.join(out_dir, SESSIONS_FILE)
    sessions = []
    if os.path.exists(sessions_path):
        with open(sessions_path, encoding="utf-8") as fh:
            sessions = json.load(fh)
    run = stats.get("run") or {}
    if run.get("clips_this_session"):
        sessions.append({"clips": run["clips_this_session"], "seconds": run["seconds"], "workers": workers})
        atomic_write(sessions_path, json.dumps(sessions, indent=1).encode())
    clips = sum(s["clips"] for s in sessions)
    seconds = sum(s["seconds"] for s in sessions)
    stats["clips_per_second"] = round(clips / seconds, 3) if clips and seconds > 0 else None
    stats["clips"] = _committed_clips(out_dir)
    return stats


def _committed_clips(out_dir: str) -> int:
    with open(os.path.join(out_dir, "manifest.json"), encoding="utf-8") as fh:
        return len(json.load(fh)["done"])


def _open_dataflux(dataflux_dir: str):
    """The committed output of a finished DataFlux run: (store, captions, kept records, run config)."""
    from ..dataflux.store import MANIFEST, RunStore

    store = RunStore(dataflux_dir)
    if not store.exists():
        raise ManifestError(f"{dataflux_dir}: no DataFlux run there (no {MANIFEST}); run the DataFlux step first")
    with open(os.path.join(store.out, MANIFEST), encoding="utf-8") as fh:
        store.manifest = json.load(fh)
    if not store.manifest.get("complete"):
        raise ManifestError(f"{dataflux_dir}: the DataFlux run is not complete; finish it with `eureka-audio dataflux "
                            f"resume --out {dataflux_dir}` (or rerun the recipe's DataFlux step)")
    return store, store.read_jsonl("captions.jsonl"), store.records("data"), store.load_config()


# ============================================================================================ manifests

def _key(path: str) -> str:
    return os.path.realpath(path)


def _assistant(text: str) -> dict:
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


def _record(rid: str, task: str, messages: list, target: str, answer: str | None = None, **extra) -> dict:
    rec = {"id": rid, "task": task, "messages": messages + [_assistant(target)]}
    if answer is not None:
        rec["answer"] = answer
    rec.update(extra)
    return rec


def _question_from_dataflux(rec: dict, audio: str, reasoning: bool, clip_id: str | None = None) -> dict:
    """A DataFlux kept record as an official-format qa record: the question text exactly as DataFlux wrote it, the
    target its option letter and text (or DataFlux's answer trace with reasoning=True)."""
    from ..dataflux.schemas import parse_question
    from ..inference import task_messages

    user = next(m for m in rec["messages"] if m["role"] == "user")
    question = "".join(it.get("text", "") for it in user["content"] if it.get("type") == "text")
    letter = rec["answer"]
    _, options = parse_question(question)
    if reasoning:
        target = "".join(it.get("text", "") for it in rec["messages"][-1]["content"] if it.get("type") == "text")
    else:
        target = f"{letter}. {options['ABCD'.index(letter)]}"
    meta = rec.get("meta", {})
    return _record(f"dataflux-{rec['id']}", rec["task"], task_messages("qa", audio, question), target, letter,
                   meta={"clip_id": clip_id or meta.get("clip_id"), "category_id": meta.get("category_id"),
                         "hard": meta.get("hard"), "dataflux_id": rec["id"]})


def _eval_questions(row: dict, audio: str, taxonomy: dict, seed: int) -> list[dict]:
    """One multiple-choice record per labelled attribute of a held-out clip, built by DataFlux's own template
    generator from the corpus label (so the wording and option phrasings are DataFlux's and the gold is the label)."""
    from ..dataflux.builtin_roles import TemplateQueryGenerator
    from ..dataflux.schemas import parse_question
    from ..inference import task_messages

    generator = TemplateQueryGenerator()
    out = []
    for attr, category_id in ATTRIBUTE_CATEGORIES.items():
        value = row.get(attr)
        category = taxonomy.get(category_id)
        if value is None or category is None or value not in category.values:
            continue
        facts = {"has_speech": True, category.fact: value}
        reply, letters = generator.generate(category, facts, 1, round_idx=1, seed=seed, clip_id=row["id"])
        if not reply["is_success"]:
            continue
        question, letter = reply["questions"][0], letters[0]
        _, options = parse_question(question)
        out.append(_record(f"{row['id']}-mc-{attr}", f"mc_{attr}", task_messages("qa", audio, question),
                           f"{letter}. {options['ABCD'.index(letter)]}", letter, attribute=attr, gold_value=value,
                           meta={"clip_id": row["id"], "category_id": category_id, "voice": row.get("voice")}))
    return out


def _labels(row: dict) -> dict:
    return {attr: row[attr] for attr in LABELS if row.get(attr) is not None}


def _write_jsonl(path: str, records: list[dict]) -> None:
    from ..fsutil import atomic_write

    atomic_write(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8"))


def build_manifests(corpus_dir: str, dataflux_dir: str, out_dir: str, *, seed: int = 0,
                    reasoning: bool = False) -> dict[str, str]:
    """Write the training and evaluation manifests (module docstring) into out_dir and return {name: path} for
    align, joint, sft and, when the corpus has a held-out split, eval_asr, eval_caption and (for clips with labels)
    eval_mc. seed orders the records and shuffles the eval question options. reasoning: sft question targets are
    DataFlux's answer traces instead of the option letter and text."""
    _, captions, kept, run_config = _open_dataflux(dataflux_dir)
    from ..dataflux.taxonomy import load_taxonomy
    from ..inference import task_messages  # the official prompts (imports torch: after the cheap checks)
    corpus_file = os.path.join(corpus_dir, "corpus.jsonl")
    rows = read_corpus(corpus_dir) if os.path.exists(corpus_file) else None
    os.makedirs(out_dir, exist_ok=True)
    out_abs = os.path.abspath(out_dir)

    def rel(path: str) -> str:
        return os.path.relpath(os.path.abspath(path), out_abs)

    caption_by_audio = {_key(c["audio"]): c for c in captions}
    if rows is not None:
        for r in rows:
            if not os.path.exists(r["audio_path"]):
                raise ManifestError(f"{corpus_file}: the audio of {r['id']} ({r['audio_path']}) does not exist")
        train = [r for r in rows if r["split"] == "train"]
        heldout = [r for r in rows if r["split"] == "heldout"]
        known = {_key(r["audio_path"]) for r in train}
        strangers = [c["audio"] for c in captions if _key(c["audio"]) not in known]
        if strangers:
            raise ManifestError(f"{dataflux_dir} captioned {len(strangers)} file(s) that are not training clips of "
                                f"{corpus_file} (e.g. {strangers[0]}): it was run over other audio")
    else:
        heldout = []
        train = []
        for c in captions:
            check = c["facts"].get("transcript_check") or {}
            verified = bool(check.get("verified")) and bool(c["facts"].get("transcript"))
            train.append({"id": c["id"], "audio_path": c["audio"], "split": "train",
                          "text": c["facts"]["transcript"] if verified else None})
    if not train:
        raise ManifestError(f"no training clips: {corpus_file if rows is not None else dataflux_dir} lists none")

    asr, captions_out, agreement = [], [], {attr: {"compared": 0, "agree": 0} for attr in LABELS}
    for r in train:
        audio = rel(r["audio_path"])
        if r.get("text"):
            asr.append(_record(f"{r['id']}-asr", "asr", task_messages("asr", audio), r["text"], r["text"],
                               meta={"clip_id": r["id"]}))
        cap = caption_by_audio.get(_key(r["audio_path"]))
        if cap is None:
            continue
        facts = cap["facts"]
        captions_out.append(_record(f"{r['id']}-caption", "caption", task_messages("caption", audio),
                                    caption_from_facts(facts, r.get("text") or facts.get("transcript")),
                                    meta={"clip_id": r["id"], "from": "dataflux captioner facts"}))
        measured = _caption_values(facts)
        for attr, value in _labels(r).items():
            agreement[attr]["compared"] += 1
            agreement[attr]["agree"] += measured.get(attr) == value
    clip_ids = {_key(r["audio_path"]): r["id"] for r in train}
    questions = [_question_from_dataflux(rec, rel(_record_audio(rec)), reasoning,
                                         clip_ids.get(_key(_record_audio(rec)))) for rec in kept]

    rng = random.Random(f"eureka-recipe-manifests-{seed}")

    def mixed(*parts):
        out = [rec for part in parts for rec in part]
        rng.shuffle(out)
        return out

    manifests = {"align": mixed(asr), "joint": mixed(asr, captions_out), "sft": mixed(questions, asr, captions_out)}
    if heldout:
        taxonomy = {c.id: c for c in load_taxonomy(run_config.get("config", {}).get("pipeline", {}).get("taxonomy"))}
        manifests["eval_asr"] = [_record(f"{r['id']}-asr", "asr", task_messages("asr", rel(r["audio_path"])),
                                         r["text"], r["text"], meta={"clip_id": r["id"], "voice": r.get("voice")})
                                 for r in heldout]
        manifests["eval_mc"] = [q for r in heldout for q in _eval_questions(r, rel(r["audio_path"]), taxonomy, seed)]
        manifests["eval_caption"] = [
            _record(f"{r['id']}-caption", "caption", task_messages("caption", rel(r["audio_path"])),
                    caption_from_facts(_labels(r), r["text"]), labels=_labels(r), text=r["text"],
                    meta={"clip_id": r["id"], "voice": r.get("voice")})
            for r in heldout]
    paths = {}
    for name, records in manifests.items():
        if not records and name.startswith("eval_"):
            continue  # e.g. eval_mc of a held-out split without labels
        if not records:
            raise ManifestError(f"the {name} manifest would be empty (inputs: {corpus_dir}, {dataflux_dir})")
        path = os.path.join(out_abs, f"{name}.jsonl")
        _write_jsonl(path, records)
        _check_readable(path, len(records))
        paths[name] = path
    summary = {"records": {name: len(recs) for name, recs in manifests.items() if name in paths},
               "dataflux_questions": len(questions), "captions": len(captions_out), "asr": len(asr),
               "dataflux_vs_labels": {a: {**v, "share": round(v["agree"] / v["compared"], 3) if v["compared"]
                                          else None} for a, v in agreement.items()},
               "seed": seed, "reasoning_targets": reasoning}
    with open(os.path.join(out_abs, "summary.json"), "w", encoding="utf-8") as fh:
        json.dump(summary, fh, indent=1)
    return paths


def _record_audio(rec: dict) -> str:
    for m in rec["messages"]:
        if m["role"] == "user" and isinstance(m["content"], list):
            for it in m["content"]:
                if it.get("type") == "audio_url":
                    url = it["audio_url"]["url"] if isinstance(it["audio_url"], dict) else it["audio_url"]
                    return url[len("file://"):] if url.startswith("file://") else url
    raise ManifestError(f"DataFlux record {rec.get('id')} has no audio")


def _check_readable(path: str, expected: int) -> None:
    """Read a written manifest back with the trainer's reader: every record must be usable."""
    from ..train.data import SkipCounter, read_manifest

    skips = SkipCounter()
    records = read_manifest(path, skips)
    if skips.total or len(records) != expected:
        raise ManifestError(f"{path}: the trainer's reader skips {skips.total} of {expected} records "
                            f"({skips.as_dict()['by_reason']}, e.g. {skips.as_dict()['examples']})")


def _main(argv=None) -> int:
    """python -m eureka_fast.recipe.manifests CORPUS DATAFLUX OUT: the manifests of a finished corpus + DataFlux."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m eureka_fast.recipe.manifests", description=_main.__doc__)
    p.add_argument("corpus_dir")
    p.add_argument("dataflux_dir")
    p.add_argument("out_dir")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    try:
        paths = build_manifests(args.corpus_dir, args.dataflux_dir, args.out_dir, seed=args.seed)
    except (ManifestError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for name, path in paths.items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(_main())
