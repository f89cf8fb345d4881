"""Offline replay of speaker-cue variants on the real recordings and the espeak-ng grid (bench/RESULTS.md, "What was
tried"): each clip's expensive measurements are taken once (speech span, Praat pitch, long-term spectra of the speech
and of the out-of-span noise, and the Burg formants and bandwidths of every voiced frame at a fixed set of analysis
ceilings), then each variant of band edge, frame choice, resonance check, dispersion formula and formant weighting
recomputes the cues and the decision from them. The ceiling a variant uses is the stored one at or below the clip's
measured band, so the replay of the shipped rule differs from the captioner's own by a few clips: compare rows with
each other. Nothing here sets a threshold of the captioner.

    PYTHONPATH=. python bench/dataflux_facts_replay.py [--cache measurements.pkl] [--limit N] [--grid-detail]

--grid-detail also prints, for the espeak-ng grid under the kept rule, where the captioner abstains: per espeak
pitch setting and sex, the clips answered, the median F0 and formant dispersion with their LLRs, and the
dispersion of each voice relative to its own -p 15 clips beside the formant scaling espeak-ng applies for the pitch
setting (ESPEAK_FORMANT_SCALE).
"""
from __future__ import annotations

import argparse
import math
import os
import pickle
import sys
import time
from collections import defaultdict

import numpy as np

# (ceiling Hz, formants tracked): the captioner's settings (one per 1.1 kHz) and one per 1.0 kHz
SETTINGS = {5500.0: (5.0, 5.5), 5000.0: (4.5, 5.0), 4500.0: (4.0, 4.5), 3900.0: (3.5, 4.0), 3400.0: (3.0, 3.5),
            3000.0: (3.0, 3.0)}
MAX_FRAMES = 200
# espeak-ng raises every formant of a voice when the pitch setting is above 50 (wavegen.c, SetPitchFormants:
# factor = 256 + 25 * (p - 50) / 50 in 1/256 units, integer arithmetic), to suit the higher voice: +8.2% at -p 92.
ESPEAK_FORMANT_SCALE = {p: (256 + (25 * (p - 50)) // 50) / 256 if p > 50 else 1.0 for p in (15, 55, 60, 92)}
KEPT = {"band": "level", "frames": "all", "max_bw": 700.0}
NFFT = 512


def build_clips(limit=None):
    from eureka_fast.dataflux import real_speech as rs
    from eureka_fast.dataflux.synthetic import labelled_grid

    base = rs.find_clips(per_source=12)
    clips = rs.with_conditions(base)
    for c in base:
        if c.condition in ("studio", "wideband") or c.source.sex == "male":
            clips.append(rs.RealClip(c.source, c.path, "expressive (derived)", rs.shift_pitch(c.audio, None)))
    out = []
    for c in clips:
        cond = c.condition.split(" (")[0]
        cond = {"studio": "clean", "wideband": "clean", "telephone": "band-limited"}.get(cond, cond)
        out.append(dict(set="real", id=c.source.id, cond="noisy" if cond.startswith("noisy") else cond,
                        sex=c.source.sex, audio=c.audio))
    for c in labelled_grid():
        out.append(dict(set="grid", id=c.clip_id, cond="clean" if c.snr_db is None else f"{int(c.snr_db)} dB",
                        sex=c.labels["gender"], audio=c.audio, labels=c.labels, reference=c.reference))
    return out[:limit] if limit else out


def _spectra(audio, span):
    from eureka_fast.dataflux.acoustics import SR

    x = np.asarray(audio, np.float64)
    hop = NFFT // 2
    n = 1 + (x.size - NFFT) // hop
    power = np.abs(np.fft.rfft(x[np.arange(NFFT)[None, :] + hop * np.arange(n)[:, None]] * np.hanning(NFFT),
                               axis=1)) ** 2
    t = (np.arange(n) * hop + NFFT / 2) / SR
    inside = (t >= span[0]) & (t <= span[1])
    speech = power[inside]
    speech = speech[speech.sum(axis=1) >= np.quantile(speech.sum(axis=1), 0.5)].mean(axis=0)
    outside = (t < span[0] - 0.05) | (t > span[1] + 0.05)
    energy = power.sum(axis=1)
    return {"speech": speech, "noise_out": power[outside].mean(axis=0) if outside.sum() >= 8 else None,
            "noise_quiet": power[energy <= np.quantile(energy, 0.1)].mean(axis=0)}


def measure(clip):
    """The expensive part, once per clip."""
    import parselmouth

    from eureka_fast.dataflux import acoustics as ac

    a = clip["audio"]
    r = {k: v for k, v in clip.items() if k != "audio"}
    span = ac.speech_span_vad(a)
    r["span"] = span
    if span is None:
        return r
    lo, hi = int(span[0] * ac.SR), int(math.ceil(span[1] * ac.SR))
    seg = a[lo:hi]
    times, f0 = ac.praat_pitch(seg, "ac", 60.0, 500.0)
    vt = times[f0 > 0]
    if vt.size > MAX_FRAMES:
        vt = vt[np.linspace(0, vt.size - 1, MAX_FRAMES).astype(int)]
    power = ac.frame_power(seg)
    r.update(f0=f0, band_level=ac.effective_bandwidth_hz(a, span), clipped=ac.clipped_fraction(seg),
             spectra=_spectra(a, span), frame_energy=power[np.clip((vt * 100).astype(int), 0, power.size - 1)])
    snd = parselmouth.Sound(np.asarray(ac.spectral_subtract(a, span)[lo:hi], np.float64), ac.SR)
    r["burg"] = {}
    for ceiling, counts in SETTINGS.items():
        for count in set(counts):
            fm = snd.to_formant_burg(max_number_of_formants=count, maximum_formant=ceiling)
            r["burg"][ceiling, count] = (
                np.array([[fm.get_value_at_time(i, float(t)) for t in vt] for i in range(1, 6)]),
                np.array([[fm.get_bandwidth_at_time(i, float(t)) for t in vt] for i in range(1, 6)]))
    return r


def band_edge(r, v):
    """The variant's band: the captioner's level rule, or the speech spectrum v['margin'] dB over a noise spectrum."""
    if v["band"] == "level":
        return r["band_level"]
    sp = r["spectra"]
    smooth = np.convolve(sp["speech"], np.ones(5) / 5, mode="same")
    noise = sp["noise_out"] if v["band"] == "out-of-span" else sp["noise_quiet"]
    if noise is None or noise.max() <= 1e-20:
        return r["band_level"]
    db = 10 * np.log10(np.maximum(smooth, 1e-30))
    ndb = 10 * np.log10(np.maximum(np.convolve(noise, np.ones(5) / 5, mode="same"), 1e-30))
    idx = np.nonzero((db >= db.max() - 60) & (db >= ndb + v["margin"]))[0]
    return float(np.fft.rfftfreq(NFFT, 1 / 16000)[idx[-1]]) if idx.size else float("nan")


def cues(r, v):
    """(median F0, dispersion, median F1, dropped cues) under variant v."""
    from eureka_fast.dataflux import acoustics as ac

    f0 = r["f0"]
    voiced = f0 > 0
    f0m = float(np.median(f0[voiced])) if voiced.sum() >= 3 else float("nan")
    dropped = {"f0"} if voiced.sum() < ac.MIN_VOICED_FRAMES else set()
    bw = band_edge(r, v)
    ceiling = next((c for c in SETTINGS if math.isfinite(bw) and bw >= 3000 and c <= bw), None)
    if ceiling is None or r["clipped"] > ac.MAX_CLIPPED_FRACTION:
        return f0m, float("nan"), float("nan"), dropped | {"dispersion"}
    count = SETTINGS[ceiling][1 if v.get("slots") == "1.0 kHz" else 0]
    use = 4 if ceiling >= 4500 else 3
    F, B = r["burg"][ceiling, count]
    sel = np.all(np.isfinite(F[:use]), axis=0)
    if v["frames"] == "loudest 30%":
        sel &= r["frame_energy"] >= np.quantile(r["frame_energy"], 0.7)
    if v.get("max_bw"):
        sel &= np.all(B[:use] < v["max_bw"], axis=0)
    if sel.sum() < ac.MIN_FORMANT_FRAMES:
        return f0m, float("nan"), float("nan"), dropped | {"dispersion"}
    k = np.arange(use) + 0.5
    fit = v.get("fit", "tube")
    first = 1 if fit == "tube F2.." else 0

    def disp(f):
        if fit == "spacing":
            return (f[use - 1] - f[0]) / (use - 1)
        return float(np.sum(f[first:use] * k[first:]) / np.sum(k[first:] ** 2))

    if v.get("pool") == "per frame":
        d = float(np.median([disp(F[:, j]) for j in np.nonzero(sel)[0]]))
    else:
        d = disp(np.median(F[:, sel], axis=1))
    return f0m, d, float(np.median(F[0, sel])), dropped


def _llr(cue, value, v):
    """The cue's uncapped LLR from the captioner's reference values, or the variant's (v["refs"][cue])."""
    from eureka_fast.dataflux import acoustics as ac

    ref = {**ac.SEX_CUES[cue], **v.get("refs", {}).get(cue, {})}
    mu_m, mu_f = math.log(ref["male_hz"]), math.log(ref["female_hz"])
    return (mu_f - mu_m) / ref["log_sd"] ** 2 * (math.log(value) - 0.5 * (mu_m + mu_f))


def decide(r, v):
    """(likelier sex, posterior) under variant v; None without a speech span."""
    from eureka_fast.dataflux import acoustics as ac

    if r["span"] is None or "f0" not in r:
        return None
    f0m, d, f1, dropped = cues(r, v)
    total = 0.0
    if "f0" not in dropped and ac.cue_llr("f0", f0m) is not None:
        cap = v.get("f0_cap", ac.SEX_CUES["f0"]["llr_cap"])
        total += float(np.clip(_llr("f0", f0m, v), -cap, cap))
    if "dispersion" not in dropped and ac.cue_llr("dispersion", d) is not None:
        w = 1.0
        if v.get("trust") and math.isfinite(f1) and f0m > 0:
            lo, hi = v["trust"]
            w = float(np.clip((f1 / f0m - lo) / (hi - lo), 0.0, 1.0))
        cap = v.get("dispersion_cap", ac.SEX_CUES["dispersion"]["llr_cap"])
        total += w * float(np.clip(_llr("dispersion", d, v), -cap, cap))
    p = 1 / (1 + math.exp(-total))
    return ("female" if p > 0.5 else "male"), max(p, 1 - p)


def evaluate(rows, v):
    from eureka_fast.dataflux import acoustics as ac

    real, grid = defaultdict(lambda: [0, 0, 0]), defaultdict(lambda: [0, 0, 0, 0, 0])
    for r in rows:
        got = decide(r, v)
        sex, conf = got if got else ("unknown", 0.5)
        named = sex if conf >= ac.GENDER_MIN_CONFIDENCE else None
        for key in (r["cond"], "all"):
            t = (real if r["set"] == "real" else grid)[key]
            t[0] += 1
            t[1] += named is not None
            t[2] += named == r["sex"]
            if r["set"] == "grid" and got and "f0" in r and (r["f0"] > 0).sum() >= 3:
                t[3] += 1
                t[4] += ac.pitch_class(float(np.median(r["f0"][r["f0"] > 0])), named) == r["labels"]["pitch_level"]
    return real, grid


VARIANTS = {
    "before: loudest 30% of voiced frames, band edge by level": {"band": "level", "frames": "loudest 30%"},
    "band edge 3 dB over the out-of-span noise": {"band": "out-of-span", "margin": 3.0, "frames": "loudest 30%"},
    "band edge 6 dB over the out-of-span noise": {"band": "out-of-span", "margin": 6.0, "frames": "loudest 30%"},
    "band edge 3 dB over the quietest tenth of frames": {"band": "quietest", "margin": 3.0, "frames": "loudest 30%"},
    "resonance check only (bandwidth < 700 Hz)": {"band": "level", "frames": "loudest 30%", "max_bw": 700.0},
    "resonance check only (bandwidth < 500 Hz)": {"band": "level", "frames": "loudest 30%", "max_bw": 500.0},
    "all voiced frames": {"band": "level", "frames": "all"},
    "all voiced frames + resonance check < 700 Hz (kept)": {"band": "level", "frames": "all", "max_bw": 700.0},
    "the same, resonance check < 1000 Hz": {"band": "level", "frames": "all", "max_bw": 1000.0},
    "kept + band edge 3 dB over the out-of-span noise": {"band": "out-of-span", "margin": 3.0, "frames": "all",
                                                         "max_bw": 700.0},
    "kept + band edge 1 dB over the out-of-span noise": {"band": "out-of-span", "margin": 1.0, "frames": "all",
                                                         "max_bw": 700.0},
    "kept, tube fit over F2.. only (F1 left out)": {"band": "level", "frames": "all", "max_bw": 700.0,
                                                    "fit": "tube F2.."},
    "loudest 30%, mean spacing (F_n - F_1) / (n - 1) instead of the tube fit": {"band": "level",
                                                                                "frames": "loudest 30%",
                                                                                "fit": "spacing"},
    "loudest 30%, tube fit per frame then median": {"band": "level", "frames": "loudest 30%", "pool": "per frame"},
    "kept + formant cue weighted by F1/F0 (0 at 1.5, 1 from 2.5)": {"band": "level", "frames": "all",
                                                                    "max_bw": 700.0, "trust": (1.5, 2.5)},
    "kept + formant cue weighted by F1/F0 (0 at 2, 1 from 3)": {"band": "level", "frames": "all", "max_bw": 700.0,
                                                                "trust": (2.0, 3.0)},
    "kept + F0 cap 1.5 instead of 2.0": {"band": "level", "frames": "all", "max_bw": 700.0, "f0_cap": 1.5},
    "all voiced frames, one formant slot per 1.0 kHz (not 1.1)": {"band": "level", "frames": "all",
                                                                  "slots": "1.0 kHz"},
    "kept, no caps (the joint likelihood of two independent lognormal cues)": {**KEPT, "f0_cap": math.inf,
                                                                               "dispersion_cap": math.inf},
    "kept, F0 references at the citation-form means (135 / 225 Hz)": {**KEPT, "refs": {
        "f0": {"male_hz": 135.0, "female_hz": 225.0}}},
    "kept, F0 references 110 / 200 Hz (lower running-speech means)": {**KEPT, "refs": {
        "f0": {"male_hz": 110.0, "female_hz": 200.0}}},
    "kept, dispersion spread 0.06 instead of 0.08 (a steeper formant cue)": {**KEPT, "refs": {
        "dispersion": {"log_sd": 0.06}}},
}


def grid_detail(rows):
    """Where the grid abstains under the kept rule, per sex and espeak pitch setting (see the module docstring)."""
    from eureka_fast.dataflux import acoustics as ac

    grid = [r for r in rows if r["set"] == "grid" and r.get("span") is not None and "f0" in r]
    per = defaultdict(list)
    for r in grid:
        voice, pitch = r["id"].split("-")[1], int(r["id"].split("-")[2][1:])
        f0, d, _, dropped = cues(r, KEPT)
        sex, conf = decide(r, KEPT)
        per[r["sex"], pitch].append(dict(voice=voice, f0=f0, d=d if "dispersion" not in dropped else float("nan"),
                                         named=conf >= ac.GENDER_MIN_CONFIDENCE, right=sex == r["sex"],
                                         cond=r["cond"], label=r["labels"]["pitch_level"]))
    base = defaultdict(list)
    for (sex, pitch), xs in per.items():
        if pitch == 15:
            for x in xs:
                base[x["voice"]].append(x["d"])
    base = {v: float(np.nanmedian(ds)) for v, ds in base.items()}
    print("\n| sex | espeak -p | clips | answered | right where answered | median F0 (LLR) | median dispersion (LLR) "
          "| dispersion / the voice's -p 15 | espeak formant scale | pitch labels |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for (sex, pitch), xs in sorted(per.items()):
        named = [x for x in xs if x["named"]]
        f0 = float(np.median([x["f0"] for x in xs]))
        d = float(np.nanmedian([x["d"] for x in xs]))
        rel = float(np.nanmedian([x["d"] / base[x["voice"]] for x in xs]))
        labels = ", ".join(f"{k} {sum(x['label'] == k for x in xs)}" for k in ("low", "medium", "high")
                           if any(x["label"] == k for x in xs))
        print(f"| {sex} | {pitch} | {len(xs)} | {len(named)} | {sum(x['right'] for x in named)} | "
              f"{f0:.0f} Hz ({ac.cue_llr('f0', f0):+.2f}) | {d:.0f} Hz ({ac.cue_llr('dispersion', d):+.2f}) | "
              f"{rel:.3f} | {ESPEAK_FORMANT_SCALE[pitch]:.3f} | {labels} |")
    print("\nAnswered per voice and pitch setting (answered / clips):")
    for (sex, pitch), xs in sorted(per.items()):
        voices = defaultdict(list)
        for x in xs:
            voices[x["voice"]].append(x["named"])
        print(f"- {sex} -p {pitch}: " + ", ".join(f"{v} {sum(n)}/{len(n)}" for v, n in sorted(voices.items())))
    conds = defaultdict(list)
    for xs in per.values():
        for x in xs:
            conds[x["cond"]].append(x["named"])
    print("- by noise: " + ", ".join(f"{k} {sum(n)}/{len(n)}" for k, n in sorted(conds.items())))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cache", help="pickle of the per-clip measurements: read if it exists, else written")
    ap.add_argument("--limit", type=int, help="only the first N clips (a smoke run)")
    ap.add_argument("--grid-detail", action="store_true", help="where the grid abstains (see above)")
    args = ap.parse_args(argv)
    if args.cache and os.path.exists(args.cache):
        with open(args.cache, "rb") as fh:
            rows = pickle.load(fh)
    else:
        t0 = time.perf_counter()
        rows = [measure(c) for c in build_clips(args.limit)]
        print(f"measured {len(rows)} clips in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        if args.cache:
            with open(args.cache, "wb") as fh:
                pickle.dump(rows, fh)

    def cell(t):
        return f"{100 * t[1] / t[0]:.0f} / {100 * t[2] / max(1, t[1]):.0f} ({t[1] - t[2]})" if t[0] else "-"

    conds = ("clean", "noisy", "band-limited", "expressive", "all")
    print("| variant | " + " | ".join(conds) + " | grid gender | grid answered / right | grid pitch |")
    print("|---|" + "---|" * (len(conds) + 3))
    for name, v in VARIANTS.items():
        real, grid = evaluate(rows, v)
        g = grid["all"]
        gcells = (f"{100 * g[2] / g[0]:.0f}% | {100 * g[1] / g[0]:.0f} / {100 * g[2] / max(1, g[1]):.0f} | "
                  f"{100 * g[4] / max(1, g[3]):.0f}%") if g[0] else "- | - | -"
        print(f"| {name} | " + " | ".join(cell(real[c]) for c in conds) + f" | {gcells} |")
    if args.grid_detail:
        grid_detail(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
