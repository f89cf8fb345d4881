"""The recipe's reports: one run's report.json / report.md / curves.png, and the aggregate of every run of a recipe
directory (mean and spread per metric, MoE and dense side by side: the ablation table) in DIR/report.json and
DIR/report.md (`eureka-audio recipe report DIR`)."""
from __future__ import annotations

import glob
import json
import math
import os
import time

from .nano import DATA_STEPS, MC_TARGET_ATTRIBUTES, RUN_STEPS, read_json, write_json

# The targets on the held-out voices and sentences: (metric key, comparison, threshold, what).
TARGETS = [("asr_wer", "<=", 0.20, "ASR WER on held-out sentences by held-out voices")] + [
    (f"mc_accuracy.{a}", ">=", 0.85, f"multiple-choice accuracy, {a.replace('_', ' ')}") for a in MC_TARGET_ATTRIBUTES]
FULL_RECIPE_MAX_S = 3600  # the full recipe: under 60 minutes of wall time on a 2-core machine
QUICK_MAX_S = 300  # --quick: every step at toy size in under 5 minutes
DATAFLUX_MIN_CLIPS_PER_S = 2.0


def flatten(metrics: dict, prefix: str = "") -> dict:
    """{"mc_accuracy": {"gender": 0.9}} -> {"mc_accuracy.gender": 0.9}; only numbers (None kept as None)."""
    out = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        elif value is None or (isinstance(value, (int, float)) and not isinstance(value, bool)):
            out[name] = value
    return out


def _met(value, op: str, threshold: float):
    if value is None:
        return None
    return value <= threshold if op == "<=" else value >= threshold


FRACTIONS = ("asr_wer", "asr_exact_match", "mc_accuracy", "caption_agreement", "caption_coverage")


def is_fraction(key: str) -> bool:
    """Metrics that are shares (shown as percentages); the rest are counts and seconds."""
    return key.startswith(FRACTIONS)


def _pct(value) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


# ------------------------------------------------------------------------------------------------- one run --
def _losses(stage_dir: str) -> list[dict]:
    path = os.path.join(stage_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    out = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            try:
                r = json.loads(line)
            except ValueError:
                continue
            if r.get("split") == "train" and "loss" in r:
                out.append({"step": r["step"], "loss": r["loss"], "aux_loss": r.get("aux_loss")})
    return out


def _curve(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def write_run_report(layout, data_state: dict, state: dict) -> dict:
    """DIR/runs/<run>/report.json, report.md and curves.png (when matplotlib is installed)."""
    evaluation = read_json(os.path.join(layout.eval, "metrics.json"))
    metrics = evaluation["metrics"]
    flat = flatten(metrics)
    targets = [{"metric": key, "what": what, "target": f"{op} {100 * threshold:g}%", "value": flat.get(key),
                "met": _met(flat.get(key), op, threshold)} for key, op, threshold, what in TARGETS]
    steps = {s: {"seconds": data_state["steps"][s]["seconds"], "shared": True,
                 "load_avg_1min": data_state["steps"][s].get("load_avg_1min")} for s in DATA_STEPS
             if s in data_state["steps"]}
    steps.update({s: {"seconds": state["steps"][s]["seconds"], "shared": False,
                      "load_avg_1min": state["steps"][s].get("load_avg_1min")} for s in RUN_STEPS
                  if s in state["steps"]})
    total = sum(v["seconds"] for v in steps.values())
    quick = bool(state.get("quick"))
    limit = QUICK_MAX_S if quick else FULL_RECIPE_MAX_S
    targets.append({"metric": "total_seconds", "what": "whole recipe, wall time (data steps included)",
                    "target": f"<= {limit}", "value": round(total, 1), "met": total <= limit})
    dataflux = data_state["steps"].get("dataflux", {})
    rate = dataflux.get("clips_per_s")
    targets.append({"metric": "dataflux_clips_per_s", "what": "DataFlux throughput, clips/s",
                    "target": f">= {DATAFLUX_MIN_CLIPS_PER_S:g}", "value": rate,
                    "met": _met(rate, ">=", DATAFLUX_MIN_CLIPS_PER_S)})
    losses = {stage: _losses(layout.stage_dir(stage)) for stage in ("align", "joint", "sft")}
    report = {
        "run": layout.run_name, "adapter": state["adapter"], "seed": state["seed"], "quick": quick,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "model_dir": "model",
        "metrics": metrics, "targets": targets,
        "router_load": evaluation.get("router_load"), "router_tokens": evaluation.get("router_tokens"),
        "steps": steps, "total_seconds": round(total, 1),
        "training": {s: {k: state["steps"][s].get(k) for k in ("steps", "final_loss", "resumed")}
                     for s in ("align", "joint", "sft") if s in state["steps"]},
        "dataflux": {"clips": dataflux.get("clips"), "seconds": dataflux.get("seconds"), "clips_per_s": rate,
                     "step_clips_per_s": dataflux.get("step_clips_per_s")},
        "data": data_state["steps"].get("manifests", {}).get("records"),
        "params": evaluation.get("params"), "details": evaluation.get("details"),
        "curve": _curve(layout.curve), "final_losses": {s: (v[-1]["loss"] if v else None) for s, v in losses.items()},
    }
    png = os.path.join(layout.run, "curves.png")
    report["curves_png"] = "curves.png" if plot_curves(losses, report["curve"], png) else None
    write_json(os.path.join(layout.run, "report.json"), report)
    with open(os.path.join(layout.run, "report.md"), "w", encoding="utf-8") as fh:
        fh.write(run_markdown(report))
    return report


def plot_curves(losses: dict, curve: list[dict], path: str) -> bool:
    """Training loss of the three stages end to end and the held-out WER curve; False when matplotlib is missing."""
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    offset = 0
    for stage, rows in losses.items():
        if rows:
            ax.plot([offset + r["step"] for r in rows], [r["loss"] for r in rows], lw=1, label=f"{stage} loss")
            offset += rows[-1]["step"]
            ax.axvline(offset + 0.5, color="grey", ls="--", lw=0.8)
    ax.set_xlabel("optimizer step (align, joint, sft)")
    ax.set_ylabel("training loss (assistant tokens)")
    if any(r["loss"] > 0 for rows in losses.values() for r in rows):
        ax.set_yscale("log")
    points = [c for c in curve if c.get("wer") is not None]
    if points:
        ax2 = ax.twinx()
        ax2.plot([c["global_step"] for c in points], [100 * c["wer"] for c in points], "o-", color="tab:red",
                 label="held-out WER")
        ax2.set_ylabel("held-out ASR WER (%)", color="tab:red")
        ax2.axhline(20, color="tab:red", ls=":", lw=0.8)
        lines = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    else:
        lines = ax.get_legend_handles_labels()[0]
    ax.legend(lines, [line.get_label() for line in lines], fontsize=8, loc="upper right")
    ax.set_title("recipe nano: training loss and held-out WER")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def run_markdown(r: dict) -> str:
    m = r["metrics"]
    lines = [f"# recipe nano: {r['run']}{' (--quick)' if r['quick'] else ''}", "",
             f"Adapter `{r['adapter']}`, seed {r['seed']}, {r['created']}. Model: `{r['model_dir']}/` "
             "(runs with `eureka-audio infer --model` and `eureka-audio serve --model`).", "",
             "## Targets", "", "| metric | target | value | met |", "|---|---|---|---|"]
    for t in r["targets"]:
        value = t["value"]
        shown = _pct(value) if is_fraction(t["metric"]) else ("n/a" if value is None else f"{value:g}")
        met = "n/a" if t["met"] is None else ("yes" if t["met"] else "**no**")
        lines.append(f"| {t['what']} | {t['target']} | {shown} | {met} |")
    lines += ["", "## Held-out metrics", "", "| metric | value |", "|---|---|",
              f"| ASR WER ({m.get('asr_clips')} clips) | {_pct(m['asr_wer'])} |",
              f"| ASR exact match | {_pct(m['asr_exact_match'])} |"]
    for a, v in m["mc_accuracy"].items():
        lines.append(f"| multiple choice, {a} | {_pct(v)} |")
    lines.append(f"| multiple choice, all {m.get('mc_questions')} questions | {_pct(m['mc_accuracy_overall'])} |")
    for a, v in m["caption_agreement"].items():
        lines.append(f"| caption facts agreeing with the labels, {a} (stated in "
                     f"{_pct(m['caption_coverage'].get(a))} of captions) | {_pct(v)} |")
    lines.append(f"| caption facts agreeing, all ({m.get('captions')} captions) | "
                 f"{_pct(m['caption_agreement_overall'])} |")
    lines += ["", "## Steps", "", "| step | seconds | 1-min load average at its end |", "|---|---|---|"]
    for name, s in r["steps"].items():
        shared = " (shared by every run in the directory)" if s["shared"] else ""
        lines.append(f"| {name}{shared} | {s['seconds']:.1f} | {s.get('load_avg_1min')} |")
    lines.append(f"| **total** | **{r['total_seconds']:.1f}** | |")
    df = r["dataflux"]
    lines += ["", f"DataFlux: {df.get('clips')} clips, {df.get('clips_per_s')} clips/s as DataFlux measures it "
                  f"(its processing sessions); the whole step took {df.get('seconds')} s "
                  f"({df.get('step_clips_per_s')} clips/s, model loading included)."]
    if r.get("router_load"):
        lines += ["", f"## Router load (share of routed token-slots per expert, {r['router_tokens']} held-out audio "
                      "tokens)", "", "| " + " | ".join(f"e{i}" for i in range(len(r["router_load"]))) + " |",
                  "|" + "---|" * len(r["router_load"]),
                  "| " + " | ".join(f"{x:.3f}" for x in r["router_load"]) + " |"]
    lines += ["", "## Curves", ""]
    lines.append("![training loss and held-out WER](curves.png)" if r.get("curves_png") else
                 "(no PNG: matplotlib is not installed; `pip install matplotlib` and rerun `eureka-audio recipe "
                 "report` to draw it)")
    if r["curve"]:
        lines += ["", "| stage | step | held-out WER | clips |", "|---|---|---|---|"]
        lines += [f"| {c['stage']} | {c['global_step']} | {_pct(c['wer'])} | {c['clips']} |" for c in r["curve"]]
    return "\n".join(lines) + "\n"


def summary_text(r: dict) -> str:
    """The few lines printed at the end of a run."""
    lines = [f"recipe nano {r['run']}: finished in {r['total_seconds']:.0f}s; model in "
             f"runs/{r['run']}/{r['model_dir']}; report in runs/{r['run']}/report.md"]
    for t in r["targets"]:
        value = t["value"]
        shown = _pct(value) if is_fraction(t["metric"]) else ("n/a" if value is None else f"{value:g}")
        met = "n/a" if t["met"] is None else ("met" if t["met"] else "NOT met")
        lines.append(f"  {t['what']}: {shown} (target {t['target']}: {met})")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ aggregate --
def _spread(values: list[float]) -> dict:
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else None
    return {"mean": mean, "std": std, "min": min(values), "max": max(values), "n": n}


def aggregate(out: str) -> dict:
    """Every finished run of DIR/runs: per adapter, mean / sample standard deviation / min / max of each metric."""
    runs = []
    for path in sorted(glob.glob(os.path.join(out, "runs", "*", "report.json"))):
        with open(path, encoding="utf-8") as fh:
            runs.append(json.load(fh))
    by_adapter: dict = {}
    for r in runs:
        by_adapter.setdefault(r["adapter"], []).append(r)
    table = {}
    for adapter, items in sorted(by_adapter.items()):
        values: dict = {}
        for r in items:
            flat = flatten(r["metrics"])
            flat["total_seconds"] = r["total_seconds"]
            for key, value in flat.items():
                if value is not None:
                    values.setdefault(key, []).append(float(value))
        table[adapter] = {key: _spread(v) for key, v in sorted(values.items())}
        loads = [r["router_load"] for r in items if r.get("router_load")]
        if loads:
            table[adapter]["router_load"] = [_spread([l[i] for l in loads]) for i in range(len(loads[0]))]
    return {"runs": [{"run": r["run"], "adapter": r["adapter"], "seed": r["seed"], "quick": r["quick"]}
                     for r in runs], "by_adapter": table}


def write_aggregate(out: str) -> dict:
    agg = aggregate(out)
    write_json(os.path.join(out, "report.json"), agg)
    with open(os.path.join(out, "report.md"), "w", encoding="utf-8") as fh:
        fh.write(aggregate_markdown(agg))
    return agg


def _cell(s: dict | None, key: str) -> str:
    if not s:
        return "-"
    scale, unit = (100, "%") if is_fraction(key) else (1, "")
    text = f"{scale * s['mean']:.1f}{unit}"
    if s["std"] is not None:
        text += f" ± {scale * s['std']:.1f}"
    return f"{text} (n={s['n']})"


def aggregate_markdown(agg: dict) -> str:
    adapters = [a for a in ("moe", "dense") if a in agg["by_adapter"]] + \
               [a for a in agg["by_adapter"] if a not in ("moe", "dense")]
    lines = ["# recipe nano: all runs", "",
             "Mean ± sample standard deviation over seeds (n = runs); "
             + ", ".join(f"`{r['run']}`" for r in agg["runs"]) + ".", ""]
    if not adapters:
        return "\n".join(lines + ["(no finished run yet)"]) + "\n"
    keys = sorted({k for a in adapters for k in agg["by_adapter"][a] if k != "router_load"})
    lines += ["| metric | " + " | ".join(adapters) + " |", "|---|" + "---|" * len(adapters)]
    for key in keys:
        lines.append(f"| {key} | " + " | ".join(_cell(agg["by_adapter"][a].get(key), key) for a in adapters) + " |")
    for a in adapters:
        load = agg["by_adapter"][a].get("router_load")
        if load:
            lines += ["", f"Router load of the `{a}` runs (share of routed token-slots per expert, mean over runs):",
                      "", "| " + " | ".join(f"e{i}" for i in range(len(load))) + " |", "|" + "---|" * len(load),
                      "| " + " | ".join(f"{s['mean']:.3f}" for s in load) + " |"]
    return "\n".join(lines) + "\n"


def rewrite_reports(out: str) -> dict:
    """`recipe report DIR`: rewrite the report of every run whose evaluation finished (e.g. to draw the PNG after
    installing matplotlib), then the aggregate."""
    from .nano import Layout

    data_state = read_json(os.path.join(out, "data", "state.json"))
    for path in sorted(glob.glob(os.path.join(out, "runs", "*", "state.json"))):
        state = read_json(path)
        if data_state and "eval" in state.get("steps", {}) and "report" in state["steps"]:
            write_run_report(Layout(out, state["adapter"], state["seed"]), data_state, state)
    return write_aggregate(out)
