"""`eureka-audio eval`: generate answers for a manifest and score them per task.

Per task: `asr` -> corpus WER (Whisper EnglishTextNormalizer, total edits / total reference words) and the share
of utterances whose normalised text matches exactly; tasks whose gold answer is an option letter (or whose user
turn lists "A. ..." options) -> multiple-choice accuracy with `extract_choice` (unparseable outputs count as wrong
and are reported); anything else with an `answer` -> normalised exact match. Records without a gold answer are
generated but not scored.
"""
from __future__ import annotations

import json
import os
import time
from collections import defaultdict

import torch

from .data import ConversationDataset, SkipCounter, read_manifest
from .metrics_text import (corpus_wer, english_normalizer, extract_choice, normalize_exact, parse_options,
                           strip_reasoning)


def _gold(record) -> str:
    if record.answer is not None:
        return record.answer
    last = record.messages[-1]
    return "".join(it.get("text", "") for it in last["content"] if it.get("type") == "text")


def _question_text(record) -> str:
    for m in reversed(record.messages):
        if m["role"] == "user":
            return "\n".join(it.get("text", "") for it in m["content"] if it.get("type") == "text")
    return ""


def score_kind(task: str, gold: str, question: str) -> str:
    if task == "asr":
        return "wer"
    if len(gold.strip()) == 1 and gold.strip().isalpha() and gold.strip().isupper():
        return "choice"
    if parse_options(question) and len(strip_reasoning(gold).strip()) == 1:
        return "choice"
    return "exact"


def score_predictions(rows: list[dict]) -> dict:
    """rows: {id, task, gold, prediction, question}. Returns {task: metrics} plus "overall"."""
    by_task: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by_task[r["task"]].append(r)
    report = {}
    for task, items in sorted(by_task.items()):
        kinds = {score_kind(task, strip_reasoning(r["gold"]), r.get("question", "")) for r in items}
        kind = "wer" if "wer" in kinds else ("choice" if kinds == {"choice"} else "exact")
        entry: dict = {"n": len(items), "metric": kind}
        if kind == "wer":
            refs = [strip_reasoning(r["gold"]) for r in items]
            hyps = [strip_reasoning(r["prediction"]) for r in items]
            w = corpus_wer(refs, hyps)
            norm = english_normalizer()
            entry.update(wer=w.wer, edits=w.edits, ref_words=w.ref_words, substitutions=w.substitutions,
                         deletions=w.deletions, insertions=w.insertions,
                         exact_match=sum(norm(a) == norm(b) for a, b in zip(refs, hyps)) / len(items))
        elif kind == "choice":
            correct = unparsed = 0
            for r in items:
                choice = extract_choice(r["prediction"], parse_options(r.get("question", "")))
                r["extracted"] = choice
                unparsed += choice is None
                correct += choice is not None and choice == strip_reasoning(r["gold"]).strip().upper()
            entry.update(accuracy=correct / len(items), correct=correct, unparsed=unparsed)
        else:
            correct = sum(normalize_exact(r["prediction"]) == normalize_exact(r["gold"]) for r in items)
            entry.update(exact_match=correct / len(items), correct=correct)
        report[task] = entry
    return report


def format_table(report: dict) -> str:
    lines = [f"{'task':<18} {'n':>6}  {'metric':<10} {'value':>8}  details", "-" * 64]
    for task, e in report.items():
        if task.startswith("_"):
            continue
        if e["metric"] == "wer":
            value = f"{100 * e['wer']:.2f}%"
            details = (f"edits {e['edits']}/{e['ref_words']} words (S {e['substitutions']} D {e['deletions']} "
                       f"I {e['insertions']}), exact {100 * e['exact_match']:.1f}%")
            name = "WER"
        elif e["metric"] == "choice":
            value, details, name = f"{100 * e['accuracy']:.2f}%", f"{e['correct']} correct, {e['unparsed']} unparsed", "accuracy"
        else:
            value, details, name = f"{100 * e['exact_match']:.2f}%", f"{e['correct']} correct", "exact"
        lines.append(f"{task:<18} {e['n']:>6}  {name:<10} {value:>8}  {details}")
    return "\n".join(lines)


def _prompt_messages(messages: list) -> list:
    """The conversation up to (not including) the final assistant turn: what the model answers."""
    cut = len(messages)
    while cut and messages[cut - 1]["role"] == "assistant":
        cut -= 1
    return messages[:cut]


@torch.no_grad()
def generate_answers(model, processor, items: list[dict], max_new_tokens: int = 128, batch_size: int = 8,
                     repetition_penalty: float = 1.0, device: torch.device | str = "cpu",
                     progress: bool = False) -> list[str]:
    """Greedy answers for dataset items (dicts from ConversationDataset). Left-padded batches. progress: a bar
    over the records on stderr."""
    from tqdm import tqdm

    model.eval()
    outputs: list[str] = []
    eos = getattr(processor, "eos_token_ids", None)
    bar = tqdm(total=len(items), unit="record", desc="eval", disable=not progress, dynamic_ncols=True)
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        enc = processor([_prompt_messages(it["messages"]) for it in chunk], return_tensors="pt",
                        add_generation_prompt=True)
        enc = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in dict(enc).items()}
        prompt_len = enc["input_ids"].shape[1]
        generated = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                   repetition_penalty=repetition_penalty, eos_token_id=eos,
                                   pad_token_id=processor.pad_token_id)
        outputs.extend(s.strip() for s in processor.batch_decode(generated[:, prompt_len:]))
        bar.update(len(chunk))
    bar.close()
    return outputs


def evaluate_manifest(model, processor, manifest: str, *, max_new_tokens: int = 128, batch_size: int = 8,
                      limit: int | None = None, repetition_penalty: float = 1.0,
                      device: torch.device | str = "cpu", check_audio: bool = True,
                      progress: bool = False) -> tuple[dict, list[dict]]:
    """Score `model` on a manifest. Returns (report, rows); report["_skipped"] lists bad records."""
    skips = SkipCounter()
    records = read_manifest(manifest, skips, check_audio=check_audio)
    if limit:
        records = records[:limit]
    dataset = ConversationDataset(records)
    rows, good_items, good_records = [], [], []
    for i, rec in enumerate(records):
        item = dataset[i]
        if hasattr(item, "reason"):
            skips.add(item.reason, item.id, item.detail)
            continue
        good_items.append(item)
        good_records.append(rec)
    t0 = time.time()
    predictions = generate_answers(model, processor, good_items, max_new_tokens=max_new_tokens,
                                   batch_size=batch_size, repetition_penalty=repetition_penalty, device=device,
                                   progress=progress)
    elapsed = time.time() - t0
    for rec, pred in zip(good_records, predictions):
        rows.append({"id": rec.id, "task": rec.task, "gold": _gold(rec), "prediction": pred,
                     "question": _question_text(rec)})
    report = score_predictions(rows)
    report["_skipped"] = skips.as_dict()
    report["_timing"] = {"records": len(rows), "generate_s": round(elapsed, 2)}
    return report, rows


def run_eval(model_dir: str, manifest: str, output: str | None = None, **kwargs) -> dict:
    from eureka_fast.models import EurekaAudioForCausalLM, EurekaAudioProcessor

    device = kwargs.pop("device", None) or ("cuda" if torch.cuda.is_available() else "cpu")
    model = EurekaAudioForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device)
    processor = EurekaAudioProcessor.from_pretrained(model_dir)
    report, rows = evaluate_manifest(model, processor, manifest, device=device, **kwargs)
    print(format_table(report))
    if report["_skipped"]["total"]:
        print(f"skipped {report['_skipped']['total']} bad record(s): {report['_skipped']['by_reason']}")
    if output:
        os.makedirs(os.path.dirname(os.path.abspath(output)) or ".", exist_ok=True)
        with open(output, "w", encoding="utf-8") as fh:
            json.dump({"model": model_dir, "data": manifest, "report": report}, fh, indent=1)
        with open(os.path.splitext(output)[0] + ".predictions.jsonl", "w", encoding="utf-8") as fh:
            for r in rows:
                fh.write(json.dumps(r, ensure_ascii=False) + "\n")
    return report
