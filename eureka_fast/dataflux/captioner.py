"""The built-in offline captioner: signal analysis plus Whisper ASR -> structured facts and a dense caption.

Facts: duration_s, transcript, loudness_dbfs, snr_db, noise, clipped_fraction, f0_median_hz, gender (male, female
or unknown) with gender_confidence, gender_llr and gender_evidence (per cue: value, log-likelihood ratio, or why it
was dropped), pitch_level with pitch_level_basis, syllables_per_second, words_per_second, words_per_minute,
speaking_rate; plus supporting measurements (speech span, effective bandwidth, voiced ratio, pauses, F0 spread,
formants and their dispersion). The DataFlux captioner role adds transcript_check (a second recogniser's reading).
docs/dataflux-facts.md describes each and its references.
"""
from __future__ import annotations

import math

import numpy as np

from . import acoustics as ac
from .asr import normalize_words

MAX_FORMANT_FRAMES = 150  # formant medians settle long before this; caps Praat's per-frame query cost


def _round(x, nd=2):
    return None if x is None or (isinstance(x, float) and not math.isfinite(x)) else round(float(x), nd)


def formant_frame_times(voiced_times: np.ndarray) -> np.ndarray:
    """All voiced frames (every vowel and voiced consonant the clip has, so the per-formant medians pool the whole
    vowel space), evenly thinned to MAX_FORMANT_FRAMES."""
    if voiced_times.size > MAX_FORMANT_FRAMES:
        return voiced_times[np.linspace(0, voiced_times.size - 1, MAX_FORMANT_FRAMES).astype(int)]
    return voiced_times


def speaker_measurements(audio: np.ndarray, span: tuple[float, float], pitch_fn=None, formant_fn=None) -> dict:
    """F0 track, its median and 10-90% spread, the clip's effective bandwidth and clipping, formants and their
    dispersion, and the sex decision, measured inside the speech span. A cue the clip cannot carry (too little
    voicing, a band too narrow for the formants, clipping) is dropped with the reason instead of being read.
    pitch_fn(seg) -> (times, f0) and formant_fn(audio, times, ceiling, count, use) -> F1..F4 pick the methods
    (defaults: Praat autocorrelation pitch and Praat Burg formants, the captioner's own)."""
    pitch_fn = pitch_fn or (lambda x: ac.praat_pitch(x, "ac", 60.0, 500.0))
    formant_fn = formant_fn or ac.praat_formants
    lo, hi = int(span[0] * ac.SR), int(math.ceil(span[1] * ac.SR))
    seg = audio[lo:hi]
    times, f0 = pitch_fn(seg)
    voiced = f0 > 0
    bandwidth = ac.effective_bandwidth_hz(audio, span)
    clipped = ac.clipped_fraction(seg)
    dropped = {}
    if int(voiced.sum()) < ac.MIN_VOICED_FRAMES:
        dropped["f0"] = f"{int(voiced.sum())} voiced frames, fewer than {ac.MIN_VOICED_FRAMES}"
    settings = ac.formant_settings(bandwidth)
    formants = np.full(4, np.nan)
    if settings is None:
        dropped["dispersion"] = (f"effective bandwidth {bandwidth:.0f} Hz: F3 does not fit below "
                                 f"{ac.FORMANT_MIN_BANDWIDTH_HZ:.0f} Hz" if math.isfinite(bandwidth)
                                 else "no spectrum to measure")
    elif clipped > ac.MAX_CLIPPED_FRACTION:
        dropped["dispersion"] = f"{100 * clipped:.1f}% of samples clipped"
    else:
        vt = formant_frame_times(times[voiced])
        # formants on a spectrally-subtracted copy: broadband noise drags F3/F4 (and so the dispersion) upward
        den = ac.spectral_subtract(audio, span)[lo:hi]
        formants = formant_fn(den, vt, *settings)
        if not math.isfinite(ac.formant_dispersion(formants)):
            dropped["dispersion"] = "too few vowel frames with formants"
    dispersion = ac.formant_dispersion(formants)
    f0_med = ac.voiced_median(f0)
    decision = ac.gender_decision(f0_med, dispersion, dropped)
    return {"times": times, "f0": f0, "voiced": voiced, "f0_median_hz": f0_med, "f0_range_hz": ac.f0_range(f0),
            "bandwidth_hz": bandwidth, "clipped_fraction": clipped, "formant_settings": settings,
            "formants_hz": formants, "dispersion_hz": dispersion, **decision}


def pitch_level_for(f0_hz: float, decision: dict) -> tuple[str, str]:
    """(pitch level, basis): against the sex's range only when the sex is named (confidently), else the absolute
    bands."""
    gender = decision["gender"] if decision["gender"] in ("male", "female") else None
    return ac.pitch_class(f0_hz, gender), (f"{gender} range" if gender else "absolute bands")


def speaking_rate_measure(audio: np.ndarray, span: tuple[float, float], transcript: str, voiced_times,
                          transcript_reliable: bool = True) -> dict:
    """Syllables and words per second over the speech span (pauses inside included, leading and trailing silence
    excluded). Syllables come from the transcript when it is reliable and has at least 3 words, else from syllable
    nuclei in the signal (language-independent). No rate class for spans under MIN_RATE_SPAN_S or under
    MIN_RATE_SYLLABLES syllables."""
    dur = span[1] - span[0]
    words = normalize_words(transcript)
    if transcript_reliable and len(words) >= 3:
        syllables, basis = sum(ac.count_syllables(w) for w in words), "transcript"
    else:
        syllables, basis = ac.syllable_nuclei(audio, span, np.asarray(voiced_times) + span[0]), "syllable nuclei"
    sps = syllables / dur if dur > 0 else 0.0
    wps = len(words) / dur if dur > 0 else 0.0
    ok = dur >= ac.MIN_RATE_SPAN_S and syllables >= ac.MIN_RATE_SYLLABLES
    return {"word_count": len(words), "syllable_count": syllables, "syllable_basis": basis,
            "words_per_second": wps, "words_per_minute": 60 * wps, "syllables_per_second": sps,
            "speaking_rate": ac.rate_class(sps) if ok else None}


def analyse(audio: np.ndarray, transcript: str, transcript_reliable: bool = True) -> dict:
    """Facts of one 16 kHz clip given its transcript. With transcript_reliable=False (the recognisers disagree, e.g.
    speech in a language the recogniser does not know) syllables are counted in the signal, not in the text."""
    duration = audio.size / ac.SR
    span = ac.speech_span_vad(audio)
    snr = ac.snr_from_span(audio, span)
    facts = {"duration_s": _round(duration, 3), "transcript": transcript.strip(),
             "loudness_dbfs": _round(ac.rms_dbfs(audio), 1), "snr_db": _round(snr, 1), "noise": ac.noise_class(snr),
             "clipped_fraction": _round(ac.clipped_fraction(audio), 4)}
    if span is None:
        facts.update(has_speech=False, speech_start_s=None, speech_end_s=None, speech_duration_s=0.0,
                     f0_median_hz=None, gender=None, gender_confidence=None, pitch_level=None,
                     words_per_second=0.0, syllables_per_second=0.0, speaking_rate=None, voiced_ratio=0.0)
        return facts
    vm = speaker_measurements(audio, span)
    f0, voiced, f0_med = vm["f0"], vm["voiced"], vm["f0_median_hz"]
    has_voice = math.isfinite(f0_med) and "dropped" not in vm["gender_evidence"]["f0"]
    rate = speaking_rate_measure(audio, span, transcript, vm["times"][voiced], transcript_reliable)
    pitch_level, pitch_basis = pitch_level_for(f0_med, vm) if has_voice else (None, None)
    # pauses: unvoiced stretches of >= 250 ms inside the speech span
    pauses, run = 0, 0
    for v in voiced:
        run = 0 if v else run + 1
        if run == 25:  # Praat pitch step is 10 ms for a 60 Hz floor (0.75 / floor)
            pauses += 1
    facts.update(
        has_speech=bool(rate["word_count"] > 0 or has_voice), speech_start_s=_round(span[0], 3),
        speech_end_s=_round(span[1], 3), speech_duration_s=_round(span[1] - span[0], 3),
        voiced_ratio=_round(float(voiced.mean()) if voiced.size else 0.0, 3), pauses=pauses,
        bandwidth_hz=_round(vm["bandwidth_hz"], 0), f0_median_hz=_round(f0_med, 1) if has_voice else None,
        f0_p10_hz=_round(float(np.percentile(f0[voiced], 10)), 1) if voiced.sum() >= 3 else None,
        f0_p90_hz=_round(float(np.percentile(f0[voiced], 90)), 1) if voiced.sum() >= 3 else None,
        f0_range_hz=_round(vm["f0_range_hz"], 1),
        formants_hz=[_round(f, 0) for f in vm["formants_hz"]], formant_dispersion_hz=_round(vm["dispersion_hz"], 1),
        gender=vm["gender"] if has_voice else None,
        gender_confidence=vm["gender_confidence"], gender_llr=vm["gender_llr"],
        gender_evidence=vm["gender_evidence"],
        pitch_level=pitch_level, pitch_level_basis=pitch_basis,
        word_count=rate["word_count"], syllable_count=rate["syllable_count"],
        syllable_basis=rate["syllable_basis"], words_per_second=_round(rate["words_per_second"], 2),
        words_per_minute=_round(rate["words_per_minute"], 0),
        syllables_per_second=_round(rate["syllables_per_second"], 2), speaking_rate=rate["speaking_rate"])
    return facts


def caption_from_facts(f: dict) -> str:
    """A dense, readable caption written from the facts (so the text never disagrees with them)."""
    parts = []
    dur = f.get("duration_s") or 0.0
    if not f.get("has_speech"):
        parts.append(f"A {dur:.1f}-second recording with no detectable speech")
        parts.append(f"the background is {f.get('noise')} (estimated SNR {f.get('snr_db')} dB), overall level "
                     f"{f.get('loudness_dbfs')} dBFS.")
        return ", ".join(parts)
    who = f"a {f['gender']} speaker" if f.get("gender") in ("male", "female") else "a speaker"
    parts.append(f"A {dur:.1f}-second recording of {who}")
    if f.get("pitch_level"):
        parts.append(f"with a {f['pitch_level']}-pitched voice (median F0 {f['f0_median_hz']:.0f} Hz)")
    if f.get("speaking_rate"):
        parts.append(f"speaking at a {f['speaking_rate']} pace ({f['syllables_per_second']:.1f} syllables, "
                     f"{f['words_per_second']:.1f} words per second over {f['speech_duration_s']:.1f} s of speech")
        parts[-1] += f", {f['pauses']} longer pauses)" if f.get("pauses") else ")"
    sentence = " ".join(parts) + "."
    env = ("The recording is clean, with no audible background noise" if f["noise"] == "clean"
           else "There is clearly audible background noise")
    env += f" (estimated SNR {f['snr_db']:.0f} dB); overall level {f['loudness_dbfs']:.0f} dBFS."
    said = f' The speaker says: "{f["transcript"]}"' if f.get("transcript") else ""
    return f"{sentence} {env}{said}"


class BuiltinCaptioner:
    """Offline captioner: ASR + signal analysis. `asr` is any object with .transcribe(audio) -> str and .name."""

    def __init__(self, asr):
        self.asr = asr
        self.name = f"builtin-captioner+{getattr(asr, 'name', 'asr')}"

    def caption(self, audio: np.ndarray) -> tuple[str, dict]:
        transcript = self.asr.transcribe(audio)
        facts = analyse(audio, transcript)
        return caption_from_facts(facts), facts
