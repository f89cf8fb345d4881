"""DataFlux speaker facts on recordings of real speakers found installed (eureka_fast.dataflux.real_speech), per
condition: clean (studio and wideband recordings), noisy (pink noise at 10 dB, derived), band-limited (8 kHz PBX
prompts, and telephone-band copies of the wideband clips), expressive (derived: the same vocal tract with F0 raised
7 semitones and its excursions widened 1.5x, by Praat PSOLA; all male clips and the wideband female ones).

    PYTHONPATH=. python bench/dataflux_real.py [--per-source N] [--asr none|auto|eureka|faster-whisper] [--json F]

Per condition: clips, gender answered (not "unknown"), gender correct where answered (the packager's documented
sex), pitch level consistent with a reference (Praat cross-correlation F0 in the documented sex's range, classed on
the basis the captioner used), and the built-in answerers' gender on the same clips. Speaking rate: agreement of the
captioner's class with answerer b's (syllable nuclei over a spectral-flatness span, an independent measurement).
Nothing here feeds back into a threshold.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict


def reference_pitch_level(audio, sex, basis_sex):
    import numpy as np
    import parselmouth

    from eureka_fast.dataflux import acoustics as ac

    floor, ceiling = (60.0, 250.0) if sex == "male" else (100.0, 500.0)
    pitch = parselmouth.Sound(audio.astype(np.float64), 16000).to_pitch_cc(pitch_floor=floor, pitch_ceiling=ceiling)
    f0 = pitch.selected_array["frequency"]
    if (f0 > 0).sum() < 3:
        return None
    return ac.pitch_class(float(np.median(f0[f0 > 0])), basis_sex)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--per-source", type=int, default=12)
    ap.add_argument("--asr", default="none")
    ap.add_argument("--json")
    ap.add_argument("--no-answerers", action="store_true", help="the captioner only (the answerer columns stay empty)")
    args = ap.parse_args(argv)

    from eureka_fast.dataflux import real_speech as rs
    from eureka_fast.dataflux.asr import get_asr
    from eureka_fast.dataflux.builtin_roles import MeasuringAnswerer
    from eureka_fast.dataflux.captioner import analyse

    base = rs.find_clips(per_source=args.per_source)
    if not base:
        print("no real recordings installed: " + "; ".join(rs.missing_sources()))
        return 1
    clips = rs.with_conditions(base)
    for c in base:
        # expressive delivery: F0 raised 7 semitones with 1.5x wider excursions, the vocal tract unchanged
        if c.condition in ("studio", "wideband") or c.source.sex == "male":
            clips.append(rs.RealClip(c.source, c.path, "expressive (derived)", rs.shift_pitch(c.audio, None)))
    asr = get_asr(args.asr)

    class Ctx:
        def __init__(self, audio):
            self.audio, self.cache = audio, {}

    answerers = {m: MeasuringAnswerer(m, asr, []) for m in ("a", "b")}
    rows = []
    t0 = time.perf_counter()
    for c in clips:
        facts = analyse(c.audio, asr.transcribe(c.audio))
        ctx = Ctx(c.audio)
        meas = {m: ({} if args.no_answerers else a.measure(ctx)) for m, a in answerers.items()}
        basis = facts["gender"] if facts.get("gender") in ("male", "female") else None
        cond = c.condition.split(" (")[0]
        cond = {"studio": "clean", "wideband": "clean", "telephone": "band-limited"}.get(cond, cond)
        cond = "noisy" if cond.startswith("noisy") else cond
        rows.append({"source": c.source.id, "path": c.path, "condition": cond, "sex": c.source.sex,
                     "language": c.source.language, "gender": facts.get("gender"),
                     "confidence": facts.get("gender_confidence"), "llr": facts.get("gender_llr"),
                     "f0": facts.get("f0_median_hz"),
                     "dispersion": facts.get("formant_dispersion_hz"), "bandwidth": facts.get("bandwidth_hz"),
                     "pitch_level": facts.get("pitch_level"),
                     "pitch_ref": reference_pitch_level(c.audio, c.source.sex, basis),
                     "rate": facts.get("speaking_rate"), "rate_b": meas["b"].get("rate"),
                     "sps": facts.get("syllables_per_second"),
                     "gender_a": meas["a"].get("gender"), "gender_b": meas["b"].get("gender")})
    secs = time.perf_counter() - t0
    table = summarise(rows)
    reliability = reliability_table(rows)
    print(markdown(table, len(rows), secs, args.asr))
    print()
    print(reliability_markdown(reliability))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"rows": rows, "table": table, "reliability": reliability, "seconds": secs}, fh, indent=2)
    return 0


def summarise(rows):
    by = defaultdict(list)
    for r in rows:
        by[r["condition"]].append(r)
        by["all"].append(r)
    out = {}
    for cond, rs_ in by.items():
        answered = [r for r in rs_ if r["gender"] in ("male", "female")]
        pitch = [r for r in rs_ if r["pitch_level"] and r["pitch_ref"]]
        rate = [r for r in rs_ if r["rate"] and r["rate_b"]]

        def side(key):
            ans = [r for r in rs_ if r[key] in ("male", "female")]
            return len(ans) / len(rs_), (sum(r[key] == r["sex"] for r in ans) / len(ans) if ans else None)

        out[cond] = {
            "clips": len(rs_), "male_clips": sum(r["sex"] == "male" for r in rs_),
            "answered": len(answered) / len(rs_),
            "correct_where_answered": (sum(r["gender"] == r["sex"] for r in answered) / len(answered)
                                       if answered else None),
            "wrong": sum(r["gender"] in ("male", "female") and r["gender"] != r["sex"] for r in rs_),
            "pitch_consistent": (sum(r["pitch_level"] == r["pitch_ref"] and r["gender"] in (r["sex"], "unknown")
                                     for r in pitch) / len(pitch) if pitch else None),
            "rate_agrees_with_b": sum(r["rate"] == r["rate_b"] for r in rate) / len(rate) if rate else None,
            "answerer_a": side("gender_a"), "answerer_b": side("gender_b"),
        }
    return out


RELIABILITY_BINS = (0.5, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0001)


def reliability_table(rows, sex_key="sex"):
    """Calibration of gender_confidence: per posterior bin, the clips whose evidence gave a posterior in the bin
    (answered or not) and the share of them on which the likelier sex (the sign of gender_llr) is the true one.
    Calibrated means that share is about the bin's posterior."""
    out = []
    for lo, hi in zip(RELIABILITY_BINS[:-1], RELIABILITY_BINS[1:]):
        inbin = [r for r in rows if r.get("confidence") is not None and r.get("llr") is not None
                 and lo <= r["confidence"] < hi]
        right = sum(("female" if r["llr"] > 0 else "male") == r[sex_key] for r in inbin)
        mean = sum(r["confidence"] for r in inbin) / len(inbin) if inbin else None
        out.append({"bin": f"{lo:.2f}-{min(hi, 1.0):.2f}", "clips": len(inbin), "mean_confidence": mean,
                    "right": right / len(inbin) if inbin else None})
    return out


def reliability_markdown(table):
    lines = ["| posterior | clips | mean posterior | likelier sex right |", "|---|---|---|---|"]
    for b in table:
        lines.append(f"| {b['bin']} | {b['clips']} | " + ("-" if b["mean_confidence"] is None else
                     f"{b['mean_confidence']:.3f}") + " | " + ("-" if b["right"] is None else
                     f"{100 * b['right']:.0f}%") + " |")
    return "\n".join(lines)


def markdown(table, n, secs, asr):
    def pct(x):
        return "-" if x is None else f"{100 * x:.0f}%"

    lines = [f"Real recordings: {n} clips (ASR: {asr}), {secs:.0f} s", "",
             "| condition | clips (male) | gender answered | correct where answered | wrong | pitch level consistent "
             "| rate class = answerer b | answerer a answered / correct | answerer b answered / correct |",
             "|---|---|---|---|---|---|---|---|---|"]
    for cond in ("clean", "noisy", "band-limited", "expressive", "all"):
        if cond not in table:
            continue
        t = table[cond]
        lines.append(f"| {cond} | {t['clips']} ({t['male_clips']}) | {pct(t['answered'])} | "
                     f"{pct(t['correct_where_answered'])} | {t['wrong']} | {pct(t['pitch_consistent'])} | "
                     f"{pct(t['rate_agrees_with_b'])} | {pct(t['answerer_a'][0])} / {pct(t['answerer_a'][1])} | "
                     f"{pct(t['answerer_b'][0])} / {pct(t['answerer_b'][1])} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
