"""`eureka-audio recipe nano`: the paper's pipeline in miniature, one resumable command.

    corpus -> dataflux -> manifests                    DIR/data/...              (once per DIR, shared by every run)
    align -> joint -> sft -> eval -> report            DIR/runs/<adapter>-seed<N>/...   (per run)

Each step is an ordinary use of the package: the corpus and DataFlux steps are `eureka_fast.recipe.corpus` and
`eureka_fast.recipe.manifests`; the three training stages run the bundled configs (`recipe/nano/*.yaml`) through the
train API (`load_config` + `run_training`, what `eureka-audio train` runs); evaluation is `evaluate_manifest`, what
`eureka-audio eval` runs. After every finished step a state file (DIR/data/state.json for the data steps, the run's
state.json for the others) is replaced atomically, so a killed run continues from the last finished step; a training
stage killed midway continues from its latest checkpoint (the trainer's own resume).
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import time

from ..fsutil import atomic_write

DATA_STEPS = ("corpus", "dataflux", "manifests")
RUN_STEPS = ("align", "joint", "sft", "eval", "report")
STEPS = DATA_STEPS + RUN_STEPS
STAGES = ("align", "joint", "sft")
ADAPTERS = ("moe", "dense")
MANIFEST_KEYS = ("align", "joint", "sft", "eval_asr", "eval_mc", "eval_caption")
CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "nano")
# The corpus and its DataFlux output do not depend on the run's seed: every run in DIR trains on the same data.
DATA_SEED = 0
STATE_VERSION = 1

# --quick: every step at toy size, to check the wiring in a few minutes (what the tests and CI run).
_QUICK_COMMON = ["train.micro_batch_size=4", "optim.warmup_steps=1", "output.save_every=0", "output.log_every=1"]
QUICK_OVERRIDES = {"align": ["train.max_steps=3", *_QUICK_COMMON], "joint": ["train.max_steps=3", *_QUICK_COMMON],
                   "sft": ["train.max_steps=4", *_QUICK_COMMON]}
# Evaluation: greedy decoding; longest answer per set, in tokens.
EVAL_MAX_NEW_TOKENS = {"eval_asr": 48, "eval_mc": 8, "eval_caption": 64}
EVAL_BATCH = 16
QUICK_EVAL_LIMIT = 12  # --quick scores only the first records of each held-out set
# The held-out ASR curve during training: WER on the first CURVE_CLIPS held-out clips every CURVE_EVERY steps and at
# the end of every stage.
CURVE_CLIPS, QUICK_CURVE_CLIPS = 32, 4
CURVE_EVERY = 250
# The attributes the issue sets a multiple-choice target for (at least 85% each); others are reported too.
MC_TARGET_ATTRIBUTES = ("gender", "pitch_level", "speaking_rate", "noise")


class RecipeError(Exception):
    """A problem with the recipe's inputs or output directory (turned into a CommandError by the CLI)."""


# ------------------------------------------------------------------------------------------------------ state --
def read_json(path: str, default=None):
    if not os.path.exists(path):
        return default
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def write_json(path: str, obj) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    atomic_write(path, (json.dumps(obj, indent=1, default=_jsonable) + "\n").encode("utf-8"))


def _jsonable(value):
    if hasattr(value, "tolist"):
        return value.tolist()
    if hasattr(value, "__fspath__"):
        return os.fspath(value)
    return str(value)


@contextlib.contextmanager
def exclusive(path: str, what: str):
    """An exclusive lock file: two recipe processes never work in the same data or run directory at once."""
    import fcntl

    os.makedirs(os.path.dirname(path), exist_ok=True)
    fh = open(path, "a+")
    try:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RecipeError(f"another `recipe nano` process is working in {what}; wait for it to finish") from None
        yield
    finally:
        fh.close()


class Layout:
    """Where everything of a recipe directory lives."""

    def __init__(self, out: str, adapter: str, seed: int):
        self.out = os.path.abspath(out)
        self.data = os.path.join(self.out, "data")
        self.corpus = os.path.join(self.data, "corpus")
        self.dataflux = os.path.join(self.data, "dataflux")
        self.manifests = os.path.join(self.data, "manifests")
        self.encoder_cache = os.path.join(self.data, "encoder_cache")
        self.data_state = os.path.join(self.data, "state.json")
        self.run_name = f"{adapter}-seed{seed}"
        self.run = os.path.join(self.out, "runs", self.run_name)
        self.run_state = os.path.join(self.run, "state.json")
        self.model = os.path.join(self.run, "model")
        self.eval = os.path.join(self.run, "eval")
        self.curve = os.path.join(self.run, "curve.jsonl")

    def stage_dir(self, stage: str) -> str:
        return os.path.join(self.run, stage)


class Progress:
    """One line per step: `[n/N] name: ...` with the step's time and the time since the command started."""

    def __init__(self, stream=None):
        self.t0 = time.time()
        self.stream = stream or sys.stdout

    def line(self, step: str, text: str) -> None:
        n = STEPS.index(step) + 1
        print(f"recipe nano [{n}/{len(STEPS)}] {step}: {text} (elapsed {time.time() - self.t0:.1f}s)",
              file=self.stream, flush=True)


# ------------------------------------------------------------------------------------------------------ steps --
def _step_record(seconds: float, **extra) -> dict:
    load = os.getloadavg() if hasattr(os, "getloadavg") else (0.0, 0.0, 0.0)
    return {"seconds": round(seconds, 2), "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "load_avg_1min": round(load[0], 2), **extra}


def _count_lines(path: str) -> int:
    with open(path, encoding="utf-8") as fh:
        return sum(1 for line in fh if line.strip())


def run_data_steps(layout: Layout, *, quick: bool, workers: int, progress: Progress, stop_after: str | None) -> dict:
    """corpus -> dataflux -> manifests, each skipped when DIR/data/state.json says it finished. Returns the state."""
    state = read_json(layout.data_state) or {"version": STATE_VERSION, "quick": quick, "seed": DATA_SEED,
                                              "steps": {}}
    if state.get("quick") != quick:
        built = "with --quick" if state.get("quick") else "without --quick"
        raise RecipeError(f"{layout.data} was built {built}; a run {'with' if quick else 'without'} --quick needs "
                          f"its own --out directory")
    for step in DATA_STEPS:
        if step in state["steps"]:
            progress.line(step, f"done earlier ({state['steps'][step]['seconds']:.1f}s), kept")
        else:
            progress.line(step, "running")
            t = time.time()
            extra = _DATA_STEP_FUNCS[step](layout, quick=quick, workers=workers, state=state)
            state["steps"][step] = _step_record(time.time() - t, **extra)
            write_json(layout.data_state, state)
            progress.line(step, f"finished in {time.time() - t:.1f}s")
        if stop_after == step:
            return state
    return state


def _corpus_step(layout: Layout, *, quick: bool, workers: int, state: dict) -> dict:
    from .corpus import build_corpus

    summary = build_corpus(layout.corpus, quick=quick, seed=DATA_SEED, workers=workers, progress=None)
    return {"summary": summary}


def _dataflux_step(layout: Layout, *, quick: bool, workers: int, state: dict) -> dict:
    from .manifests import run_dataflux

    t = time.time()
    stats = run_dataflux(layout.corpus, layout.dataflux, quick=quick, workers=workers, progress=None)
    seconds = time.time() - t
    clips = stats.get("clips")
    # DataFlux's own rate (its sessions' clips over their seconds) and the whole step's, model loading included
    return {"clips": clips, "clips_per_s": stats.get("clips_per_second"),
            "step_clips_per_s": round(clips / seconds, 3) if clips and seconds > 0 else None,
            "stats": stats}


def _manifests_step(layout: Layout, *, quick: bool, workers: int, state: dict) -> dict:
    from .manifests import build_manifests

    paths = build_manifests(layout.corpus, layout.dataflux, layout.manifests, seed=DATA_SEED)
    missing = [k for k in MANIFEST_KEYS if k not in paths]
    if missing:
        raise RecipeError(f"build_manifests gave no {missing} manifest(s)")
    paths = {k: os.path.abspath(paths[k]) for k in MANIFEST_KEYS}
    for key, path in paths.items():
        if _count_lines(path) == 0:
            raise RecipeError(f"the {key} manifest {path} is empty: the corpus or DataFlux step produced no usable "
                              f"record for it")
    return {"paths": paths, "records": {k: _count_lines(p) for k, p in paths.items()}}


_DATA_STEP_FUNCS = {"corpus": _corpus_step, "dataflux": _dataflux_step, "manifests": _manifests_step}


# ---------------------------------------------------------------------------------------------------- training --
def stage_overrides(layout: Layout, stage: str, manifests: dict, *, adapter: str, seed: int,
                    quick: bool) -> list[str]:
    """The `--set` overrides the recipe adds to the bundled stage config (the rest is the YAML as shipped)."""
    out = [f"data.train.0.path={_quoted(manifests[stage])}", f"output.dir={_quoted(layout.stage_dir(stage))}",
           f"train.seed={seed}", f"train.encoder_cache_dir={_quoted(layout.encoder_cache)}"]
    if stage == "sft":  # sft.yaml's second source: the ASR records again, for the paper's ASR-heavy SFT mix
        out.append(f"data.train.1.path={_quoted(manifests['align'])}")
    if stage == "align":
        out.append(f"model.overrides.adapter_config.adapter_type={adapter}")
    else:
        previous = os.path.join(layout.stage_dir(STAGES[STAGES.index(stage) - 1]), "final")
        out.append(f"model.pretrained={_quoted(previous)}")
    if quick:
        out += QUICK_OVERRIDES[stage]
    return out


def _quoted(path: str) -> str:
    """A path as a single-quoted YAML scalar (override values are read as YAML: ': ' or ' #' would change them)."""
    return "'" + path.replace("'", "''") + "'"


def stage_config_path(stage: str) -> str:
    return os.path.join(CONFIG_DIR, f"{stage}.yaml")


class HeldoutCurve:
    """Held-out ASR WER on a few clips during training (every CURVE_EVERY steps and at the end of each stage), kept
    in the run's curve.jsonl so a resumed run keeps the points of the part already done."""

    def __init__(self, layout: Layout, manifest: str, clips: int, every: int, step_offset: int, stage: str):
        self.layout, self.manifest, self.clips, self.every = layout, manifest, clips, every
        self.step_offset, self.stage = step_offset, stage

    def __call__(self, trainer, step: int, record: dict) -> None:
        last = step == trainer.cfg.train.max_steps
        if not (last or (self.every and step % self.every == 0)):
            return
        from ..train.evaluate import evaluate_manifest

        model = trainer.base_model
        lm_config = getattr(getattr(model, "language_model", None), "config", None)
        use_cache = getattr(lm_config, "use_cache", None)
        if lm_config is not None:
            lm_config.use_cache = True  # the trainer turns the KV cache off; generation needs it to be fast
        t = time.time()
        try:
            report, _ = evaluate_manifest(model, trainer.processor, self.manifest, limit=self.clips,
                                          max_new_tokens=EVAL_MAX_NEW_TOKENS["eval_asr"], batch_size=EVAL_BATCH,
                                          device=trainer.device, check_audio=False)
        finally:
            if lm_config is not None:
                lm_config.use_cache = use_cache
            model.train()
        asr = report.get("asr") or next((v for k, v in report.items() if not k.startswith("_")), {})
        point = {"stage": self.stage, "step": step, "global_step": self.step_offset + step,
                 "wer": asr.get("wer"), "clips": asr.get("n"), "train_loss": record.get("loss"),
                 "eval_s": round(time.time() - t, 2), "time": round(time.time(), 2)}
        with open(self.layout.curve, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(point) + "\n")


def run_stage(layout: Layout, stage: str, manifests: dict, *, adapter: str, seed: int, quick: bool,
              step_offset: int) -> dict:
    """One training stage through the train API; resumes from the stage's latest checkpoint when one exists."""
    from ..train import checkpoint as ckpt
    from ..train.config import load_config
    from ..train.trainer import run_training

    cfg = load_config(stage_config_path(stage),
                      stage_overrides(layout, stage, manifests, adapter=adapter, seed=seed, quick=quick))
    resume = "auto" if ckpt.latest_checkpoint(cfg.output.dir) else None
    if resume is None and os.path.exists(os.path.join(cfg.output.dir, "metrics.jsonl")):
        os.remove(os.path.join(cfg.output.dir, "metrics.jsonl"))  # a stage restarted from step 0 logs afresh
    curve = HeldoutCurve(layout, manifests["eval_asr"], QUICK_CURVE_CLIPS if quick else CURVE_CLIPS,
                         0 if quick else CURVE_EVERY, step_offset, stage)
    result = run_training(cfg, resume=resume, callbacks=[curve])
    return {"steps": result.steps, "final_loss": result.losses[-1] if result.losses else None,
            "resumed": bool(resume), "train_seconds": round(result.elapsed_s, 2)}


def publish_model(layout: Layout) -> None:
    """DIR/runs/<run>/model: a copy of the sft stage's final/ (model + processor), replaced atomically."""
    source = os.path.join(layout.stage_dir("sft"), "final")
    tmp = layout.model + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(source, tmp)
    shutil.rmtree(layout.model, ignore_errors=True)
    os.replace(tmp, layout.model)


# -------------------------------------------------------------------------------------------------- evaluation --
def _raw_rows(manifest: str) -> dict:
    rows = {}
    with open(manifest, encoding="utf-8") as fh:
        for i, line in enumerate(fh):
            if line.strip():
                row = json.loads(line)
                # the same fallback id as the trainer's manifest reader gives a record without one
                rows[str(row.get("id") or f"{os.path.basename(manifest)}:{i + 1}")] = row
    return rows


def _field(row: dict, name: str):
    """A row's field, at the top level or under meta."""
    if name in row:
        return row[name]
    meta = row.get("meta") or {}
    return meta.get(name)


def mc_accuracy_by_attribute(rows: list[dict], raw: dict) -> dict:
    """{attribute: {accuracy, correct, n, unparsed}} from evaluate_manifest rows of the multiple-choice set."""
    from ..train.metrics_text import extract_choice, parse_options, strip_reasoning

    out: dict = {}
    for r in rows:
        attribute = _field(raw.get(r["id"], {}), "attribute") or "unknown"
        entry = out.setdefault(attribute, {"correct": 0, "n": 0, "unparsed": 0})
        choice = extract_choice(r["prediction"], parse_options(r.get("question", "")))
        entry["n"] += 1
        entry["unparsed"] += choice is None
        entry["correct"] += choice is not None and choice == strip_reasoning(r["gold"]).strip().upper()
    for entry in out.values():
        entry["accuracy"] = entry["correct"] / entry["n"]
    return dict(sorted(out.items()))


def caption_agreement(rows: list[dict], raw: dict, facts_from_caption) -> dict:
    """Per attribute: of the generated captions that state a fact about it, the share whose fact agrees with the
    clip's label (agreement), and the share of captions that state it at all (coverage)."""
    per: dict = {}
    for r in rows:
        labels = _field(raw.get(r["id"], {}), "labels") or {}
        facts = facts_from_caption(r["prediction"]) or {}
        for attribute, label in labels.items():
            entry = per.setdefault(attribute, {"stated": 0, "agree": 0, "captions": 0})
            entry["captions"] += 1
            if attribute in facts and facts[attribute] is not None:
                entry["stated"] += 1
                entry["agree"] += str(facts[attribute]).strip().lower() == str(label).strip().lower()
    for entry in per.values():
        entry["agreement"] = entry["agree"] / entry["stated"] if entry["stated"] else None
        entry["coverage"] = entry["stated"] / entry["captions"] if entry["captions"] else None
    stated = sum(e["stated"] for e in per.values())
    overall = sum(e["agree"] for e in per.values()) / stated if stated else None
    return {"by_attribute": dict(sorted(per.items())), "agreement": overall, "facts_stated": stated,
            "captions": len(rows)}


class RouterLoadMeter:
    """Counts the expert choices of every audio token the MoE adapter routes while installed (evaluation runs it
    once per held-out clip, at prefill)."""

    def __init__(self, adapter):
        import torch

        self.adapter = adapter
        self.counts = torch.zeros(adapter.num_experts, dtype=torch.float64)
        self.tokens = 0
        self._mix = adapter.mix

        def counting_mix(x):
            out = self._mix(x)
            if out.expert_ids is not None and out.expert_ids.numel():
                self.counts += torch.bincount(out.expert_ids.reshape(-1).long().cpu(),
                                              minlength=adapter.num_experts).double()
                self.tokens += out.expert_ids.shape[0]
            return out

        adapter.mix = counting_mix

    def remove(self) -> None:
        del self.adapter.mix

    def load(self) -> list[float] | None:
        total = float(self.counts.sum())
        return [round(float(c) / total, 4) for c in self.counts] if total else None


def run_evaluation(layout: Layout, manifests: dict, *, quick: bool) -> dict:
    """Scores DIR/runs/<run>/model on the three held-out sets; writes eval/metrics.json and the predictions."""
    import torch

    from ..models import EurekaAudioForCausalLM, EurekaAudioProcessor
    from ..train.encoder_cache import install_encoder_cache
    from ..train.evaluate import evaluate_manifest
    from .manifests import facts_from_caption

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = EurekaAudioForCausalLM.from_pretrained(layout.model, dtype=torch.float32).to(device).eval()
    processor = EurekaAudioProcessor.from_pretrained(layout.model)
    model.audio_encoder.requires_grad_(False)  # evaluation trains nothing; frozen, its outputs can be cached
    install_encoder_cache(model, layout.encoder_cache)  # held-out clips are encoded once for every run in DIR
    meter = RouterLoadMeter(model.adapter) if hasattr(model.adapter, "num_experts") else None
    limit = QUICK_EVAL_LIMIT if quick else None
    os.makedirs(layout.eval, exist_ok=True)
    results, timings = {}, {}
    try:
        for key in ("eval_asr", "eval_mc", "eval_caption"):
            t = time.time()
            report, rows = evaluate_manifest(model, processor, manifests[key], limit=limit, device=device,
                                             max_new_tokens=EVAL_MAX_NEW_TOKENS[key], batch_size=EVAL_BATCH,
                                             repetition_penalty=1.0)
            timings[key] = round(time.time() - t, 2)
            results[key] = (report, rows)
            with open(os.path.join(layout.eval, f"{key}.predictions.jsonl"), "w", encoding="utf-8") as fh:
                fh.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    finally:
        if meter is not None:
            meter.remove()
    asr_report, _ = results["eval_asr"]
    asr = next((v for k, v in asr_report.items() if not k.startswith("_") and v.get("metric") == "wer"), None)
    if asr is None:
        raise RecipeError(f"the eval_asr manifest {manifests['eval_asr']} holds no record of task 'asr'")
    mc = mc_accuracy_by_attribute(results["eval_mc"][1], _raw_rows(manifests["eval_mc"]))
    caption = caption_agreement(results["eval_caption"][1], _raw_rows(manifests["eval_caption"]),
                                facts_from_caption)
    mc_n = sum(e["n"] for e in mc.values())
    metrics = {
        "asr_wer": asr["wer"], "asr_exact_match": asr["exact_match"], "asr_clips": asr["n"],
        "mc_accuracy": {a: e["accuracy"] for a, e in mc.items()},
        "mc_accuracy_overall": sum(e["correct"] for e in mc.values()) / mc_n if mc_n else None,
        "mc_questions": mc_n,
        "caption_agreement": {a: e["agreement"] for a, e in caption["by_attribute"].items()},
        "caption_coverage": {a: e["coverage"] for a, e in caption["by_attribute"].items()},
        "caption_agreement_overall": caption["agreement"], "captions": caption["captions"],
    }
    for attribute in MC_TARGET_ATTRIBUTES:  # every target attribute has a key, None when the set had none
        metrics["mc_accuracy"].setdefault(attribute, None)
    out = {"metrics": metrics, "details": {"asr": asr, "mc": mc, "caption": caption},
           "router_load": meter.load() if meter is not None else None,
           "router_tokens": meter.tokens if meter is not None else 0,
           "params": {name: sum(p.numel() for p in m.parameters()) for name, m in model.named_children()},
           "eval_seconds": timings, "limit": limit}
    out["params"]["total"] = sum(out["params"].values())
    write_json(os.path.join(layout.eval, "metrics.json"), out)
    return out


# ------------------------------------------------------------------------------------------------------- the run --
def run_nano(out: str, *, quick: bool = False, adapter: str = "moe", seed: int = 0, workers: int = 2,
             stop_after: str | None = None, stream=None) -> dict:
    """The whole recipe (or what is left of it). Returns the run's report (None when stopped by `stop_after`)."""
    from . import report as reporting

    if adapter not in ADAPTERS:
        raise RecipeError(f"adapter {adapter!r}: choose from {', '.join(ADAPTERS)}")
    layout = Layout(out, adapter, seed)
    progress = Progress(stream)
    with exclusive(os.path.join(layout.data, ".lock"), layout.data):
        data_state = run_data_steps(layout, quick=quick, workers=workers, progress=progress, stop_after=stop_after)
    if stop_after in DATA_STEPS:
        return None
    manifests = data_state["steps"]["manifests"]["paths"]
    with exclusive(os.path.join(layout.run, ".lock"), layout.run):
        state = read_json(layout.run_state) or {"version": STATE_VERSION, "adapter": adapter, "seed": seed,
                                                 "quick": quick, "steps": {}}
        offset = 0
        for step in RUN_STEPS:
            if step in state["steps"]:
                progress.line(step, f"done earlier ({state['steps'][step]['seconds']:.1f}s), kept")
            else:
                progress.line(step, "running")
                t = time.time()
                if step in STAGES:
                    extra = run_stage(layout, step, manifests, adapter=adapter, seed=seed, quick=quick,
                                      step_offset=offset)
                    if step == "sft":
                        publish_model(layout)
                elif step == "eval":
                    extra = {"summary": _eval_summary(run_evaluation(layout, manifests, quick=quick))}
                else:
                    extra = {}
                state["steps"][step] = _step_record(time.time() - t, **extra)
                if step == "report":
                    write_json(layout.run_state, state)  # the report's step table includes its own entry
                    reporting.write_run_report(layout, data_state, state)
                    reporting.write_aggregate(layout.out)
                write_json(layout.run_state, state)
                if step in STAGES:
                    # the next stage starts from final/: the stage's optimizer checkpoints are no longer needed
                    shutil.rmtree(os.path.join(layout.stage_dir(step), "checkpoints"), ignore_errors=True)
                progress.line(step, f"finished in {time.time() - t:.1f}s")
            if step in STAGES:
                offset += int(state["steps"][step].get("steps") or 0)
            if stop_after == step:
                return None
    report = read_json(os.path.join(layout.run, "report.json"))
    print(reporting.summary_text(report), file=progress.stream, flush=True)
    return report


def _eval_summary(result: dict) -> dict:
    m = result["metrics"]
    return {"asr_wer": m["asr_wer"], "mc_accuracy_overall": m["mc_accuracy_overall"],
            "caption_agreement_overall": m["caption_agreement_overall"]}
