"""Fit the offline captioner's gender model (acoustics.GENDER_MODEL) on the espeak-ng development set.

    python bench/dataflux_gender_fit.py [--limit N] [--features-json cache.json] [--lam 1.0]

The development set is eureka_fast.dataflux.synthetic.dev_grid(): 108 clips, disjoint from the evaluation grid that
bench/dataflux_captioner.py reports on (other texts, espeak pitch settings, speeds and SNRs). This script never
touches the evaluation grid. It measures each clip's cues with the captioner's own code (captioner.voice_measurements
on the WebRTC-VAD speech span), fits an L2-regularised logistic regression (Newton's method on standardised cues),
and prints:
- for several cue subsets: accuracy on the development set and leave-one-voice-variant-out accuracy (fit on 11
  variants, test on the 12th, all 12 in turn), which estimates accuracy on variants the model has not seen;
- the GENDER_MODEL constant for the full model, to paste into eureka_fast/dataflux/acoustics.py.
"""
from __future__ import annotations

import argparse
import json
import math
import sys

import numpy as np

CUES = ("log_f0", "log_dispersion", "high_band_db", "log_f0_range")
SUBSETS = (("log_f0", "log_dispersion"), ("log_f0", "log_dispersion", "high_band_db"),
           ("log_f0", "log_f0_range"), ("log_f0", "log_dispersion", "log_f0_range"), CUES)


def measure(clips):
    from eureka_fast.dataflux import acoustics as ac
    from eureka_fast.dataflux.captioner import voice_measurements

    rows = []
    for c in clips:
        span = ac.speech_span_vad(c.audio)
        vm = voice_measurements(c.audio, span)
        feats = ac.gender_features(vm["f0_median_hz"], vm["dispersion_hz"], vm["f0_range_hz"], vm["high_band_db"])
        rows.append({"clip": c.clip_id, "voice": c.voice, "female": c.labels["gender"] == "female", **feats})
    return rows


def fit_logistic(x: np.ndarray, y: np.ndarray, lam: float = 1.0):
    """L2-regularised logistic regression on standardised columns (intercept unpenalised). Returns (intercept,
    weights, means) for score = intercept + sum(weights * (x - means)) on the raw columns."""
    mu, sd = x.mean(axis=0), x.std(axis=0)
    sd = np.where(sd > 0, sd, 1.0)
    z = np.c_[np.ones(len(x)), (x - mu) / sd]
    w = np.zeros(z.shape[1])
    reg = lam * np.eye(z.shape[1])
    reg[0, 0] = 0.0
    for _ in range(100):
        p = 1.0 / (1.0 + np.exp(-z @ w))
        grad = z.T @ (p - y) + reg @ w
        hess = (z * (p * (1 - p))[:, None]).T @ z + reg
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.max(np.abs(step)) < 1e-10:
            break
    return float(w[0]), w[1:] / sd, mu


def matrix(rows, cues):
    """Cue matrix; a missing cue takes the column mean (it then contributes 0, as in acoustics.gender_evidence)."""
    x = np.array([[np.nan if r[c] is None else r[c] for c in cues] for r in rows], dtype=np.float64)
    col_mean = np.nanmean(x, axis=0)
    return np.where(np.isfinite(x), x, col_mean)


def evaluate(rows, cues, lam):
    x, y = matrix(rows, cues), np.array([r["female"] for r in rows], dtype=np.float64)
    b, w, mu = fit_logistic(x, y, lam)
    dev_acc = float(np.mean(((b + (x - mu) @ w) > 0) == (y > 0)))
    voices = sorted({r["voice"] for r in rows})
    hits, wrong = 0, []
    for v in voices:
        tr = np.array([r["voice"] != v for r in rows])
        bb, ww, mm = fit_logistic(x[tr], y[tr], lam)
        pred = (bb + (x[~tr] - mm) @ ww) > 0
        hits += int(np.sum(pred == (y[~tr] > 0)))
        wrong += [r["clip"] for r, p in zip([r for r in rows if r["voice"] == v], pred) if p != r["female"]]
    return {"cues": list(cues), "dev_accuracy": dev_acc, "leave_one_variant_out_accuracy": hits / len(rows),
            "lovo_errors": wrong, "intercept": b, "weights": dict(zip(cues, w.tolist())),
            "means": dict(zip(cues, mu.tolist()))}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--limit", type=int)
    ap.add_argument("--lam", type=float, default=1.0)
    ap.add_argument("--features-json", help="cache of the measured cues (read if it exists, else written)")
    args = ap.parse_args(argv)
    rows = None
    if args.features_json:
        try:
            with open(args.features_json) as fh:
                rows = json.load(fh)
        except FileNotFoundError:
            pass
    if rows is None:
        from eureka_fast.dataflux.synthetic import dev_grid

        rows = measure(dev_grid(limit=args.limit))
        if args.features_json:
            with open(args.features_json, "w") as fh:
                json.dump(rows, fh)
    n_f = sum(r["female"] for r in rows)
    print(f"development set: {len(rows)} clips ({len(rows) - n_f} male, {n_f} female)\n")
    print("| cues | dev accuracy | leave-one-variant-out |\n|---|---|---|")
    results = [evaluate(rows, s, args.lam) for s in SUBSETS]
    for r in results:
        print(f"| {' + '.join(r['cues'])} | {100 * r['dev_accuracy']:.1f}% | "
              f"{100 * r['leave_one_variant_out_accuracy']:.1f}% |")
    full = results[-1]
    print(f"\nleave-one-variant-out errors of the full model: {full['lovo_errors']}")
    print("\nGENDER_MODEL = {")
    print(f'    "intercept": {full["intercept"]:.4f},')
    print('    "weights": {' + ", ".join(f'"{k}": {v:.4f}' for k, v in full["weights"].items()) + "},")
    print('    "means": {' + ", ".join(f'"{k}": {v:.4f}' for k, v in full["means"].items()) + "},")
    print("}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
