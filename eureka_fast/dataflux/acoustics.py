"""Signal measurements behind the offline captioner and the offline answerers.

Each attribute has independent methods, so the captioner and the two built-in answerers measure differently:
- F0: Praat autocorrelation (captioner) and cross-correlation (answerer a) pitch (parselmouth), and a NumPy YIN
  tracker (answerer b).
- vocal-tract size: formants from Praat Burg (captioner), covariance-method LPC in Praat (a), and NumPy
  autocorrelation-LPC roots (b), each summarised as the formant dispersion (the spacing of F1..F4, c / 2L for a
  vocal tract of length L). The formant analysis follows the clip's measured bandwidth (effective_bandwidth_hz):
  F1..F3 under a lower ceiling on telephone-band audio, nothing below 3 kHz.
- speaker sex: F0 and dispersion each give a capped log-likelihood ratio from reference distributions in the
  phonetics literature (SEX_CUES; docs/dataflux-facts.md), summed into a posterior; "unknown" below
  GENDER_MIN_CONFIDENCE.
- speech span: WebRTC VAD confirmed by energy above the noise floor (captioner); energy endpoints (a); spectral
  flatness (b).
- SNR: speech-span power over out-of-span noise power; and a frame-power percentile estimator.
- speaking rate: syllables per second over the speech span, from the transcript (captioner, a) or from syllable
  nuclei in the signal (b); words per second reported alongside.
All functions take float32 mono audio at 16 kHz.
"""
from __future__ import annotations

import math

import numpy as np

from ..audio import SAMPLE_RATE as SR
SNR_CAP_DB = 60.0  # digital silence has no measurable noise floor; report this instead of infinity

# ----------------------------------------------------------------------------------------------- speaker sex
# Each cue contributes a log-likelihood ratio (LLR, > 0 favours female) from two reference distributions taken from
# the phonetics literature (docs/dataflux-facts.md gives the sources and the arithmetic), never fitted to a data set:
# - F0: the median F0 of running speech; adult men about 120 Hz, women about 205 Hz, with a between-speaker spread
#   of about 2.6 semitones (0.15 in natural log) for each.
# - formant dispersion: the spacing dF of a uniform tube fitted to F1..F4 (F1..F3 on band-limited audio), which is
#   c / (2 L) for a vocal tract of length L; about 1010 Hz for men (L ~ 17.3 cm) and 1190 Hz for women
#   (L ~ 14.7 cm), i.e. women's formants ~18% higher, with a spread of 0.08 in natural log (speaker anatomy plus
#   the vowel mix of a short clip).
# Both are lognormal with a shared spread, so each LLR is linear in the log of the cue: (x - midpoint) times
# (mu_f - mu_m) / sd^2, capped at llr_cap:
# - F0 at 2.0 (7.4:1), below what naming a sex needs (GENDER_MIN_CONFIDENCE), so F0 alone never decides: listeners
#   hardly change their judgement of a speaker's sex when only F0 is shifted (Hillenbrand & Clark 2009), and
#   speaking style (raised or expressive voice, Lombard speech) moves a speaker's F0 by up to an octave.
# - dispersion at 3.0 (20:1): the vocal tract does not change with style, but a formant tracker can lock onto the
#   wrong peaks, so it cannot outvote a clear contrary F0 either.
# When the cues disagree the sum is small and the answer is unknown.
SEX_CUES = {
    "f0": {"male_hz": 120.0, "female_hz": 205.0, "log_sd": 0.15, "llr_cap": 2.0},
    "dispersion": {"male_hz": 1010.0, "female_hz": 1190.0, "log_sd": 0.08, "llr_cap": 3.0},
}
# The gender is named only where the posterior of the likelier sex reaches the accuracy the facts must have (90%
# right where answered): with a calibrated posterior, a clip named from there on is right at least that often.
# Calibration is checked, not fitted: bench/dataflux_real.py and bench/dataflux_captioner.py print reliability
# tables (the share right per posterior bin); below it the fact is "unknown".
GENDER_ACCURACY_TARGET = 0.9
GENDER_MIN_CONFIDENCE = GENDER_ACCURACY_TARGET
MIN_VOICED_FRAMES = 20  # 0.2 s of voiced 10 ms frames before the F0 median is read
MIN_FORMANT_FRAMES = 8  # vowel frames with formants before the dispersion is read
# A vowel formant is a resonance a few hundred Hz wide at most; a Burg pole broader than this is the tracker filling
# a slot (merged formants, a missing one, the band edge), and its frame is left out of the formant medians.
FORMANT_MAX_BANDWIDTH_HZ = 700.0
FORMANT_MIN_BANDWIDTH_HZ = 3000.0  # below this not even F3 is in the band: no dispersion
FOUR_FORMANT_BANDWIDTH_HZ = 4500.0  # F4 of a short vocal tract sits near 4.2 kHz: only above this is F4 read
MAX_CLIPPED_FRACTION = 0.01  # more clipped samples than this: harmonics from the clipping distort the formants

# Pitch level: against the speaker's sex when the sex is known with confidence (bands around the reference medians,
# about one between-speaker spread either side), else against absolute bands. The absolute bands are the outer edges
# of the two sexes' bands: below 95 Hz a voice is low for a man and far below any woman's range, above 235 Hz high for
# a woman and far above any man's, so an absolute "low" or "high" is what the sex-relative scale says whichever the
# sex; in between the sex-relative level depends on the sex, and the absolute level is "medium" (within the adult
# speaking range, Baken 2000: men about 85-155 Hz, women about 165-255 Hz).
MALE_PITCH_BANDS = (95.0, 130.0)
FEMALE_PITCH_BANDS = (175.0, 235.0)
ABSOLUTE_PITCH_BANDS = (MALE_PITCH_BANDS[0], FEMALE_PITCH_BANDS[1])

# Speaking rate: syllables per second over the speech span (first to last speech, pauses inside included), the unit
# of the published norms (docs/dataflux-facts.md): British English runs at about 140 (lectures) to 210 (conversation)
# words per minute including pauses (Tauroza & Allison 1990), 3.5-5.5 syllables per second; within one read utterance
# English averages about 6.2 syllables per second (Pellegrino et al. 2011). Slow is below 3.0 (under ~120 words per
# minute), fast above 6.5 (faster than fluent reading). Words per second and per minute are reported too.
SLOW_SYL_PER_S, FAST_SYL_PER_S = 3.0, 6.5
MIN_RATE_SPAN_S, MIN_RATE_SYLLABLES = 1.0, 4  # shorter clips get no rate class: boundary errors dominate
CLEAN_SNR_DB = 20.0


def cue_llr(cue: str, value) -> float | None:
    """The capped log-likelihood ratio (female over male) of one cue's value, None when it was not measured."""
    if value is None or not math.isfinite(value) or value <= 0:
        return None
    ref = SEX_CUES[cue]
    mu_m, mu_f = math.log(ref["male_hz"]), math.log(ref["female_hz"])
    llr = (mu_f - mu_m) / ref["log_sd"] ** 2 * (math.log(value) - 0.5 * (mu_m + mu_f))
    return float(np.clip(llr, -ref["llr_cap"], ref["llr_cap"]))


def gender_decision(f0_hz=None, dispersion_hz=None, dropped: dict | None = None) -> dict:
    """Combine the cues that could be measured: {gender: male|female|unknown, gender_confidence (posterior of the
    more likely sex, 0.5 with no evidence), gender_llr, gender_evidence: per cue its value, LLR (None when not
    used) and, when not used, why}. `dropped` maps a cue to the reason it was not read from this clip."""
    dropped = dropped or {}
    evidence, total = {}, 0.0
    for cue, value in (("f0", f0_hz), ("dispersion", dispersion_hz)):
        llr = None if cue in dropped else cue_llr(cue, value)
        entry = {"value_hz": None if value is None or not math.isfinite(value) else round(float(value), 1),
                 "llr": None if llr is None else round(llr, 3)}
        if llr is None:
            entry["dropped"] = dropped.get(cue, "not measured")
        else:
            total += llr
        evidence[cue] = entry
    p_female = 1.0 / (1.0 + math.exp(-total))
    confidence = max(p_female, 1.0 - p_female)
    gender = ("female" if p_female > 0.5 else "male") if confidence >= GENDER_MIN_CONFIDENCE else "unknown"
    return {"gender": gender, "gender_confidence": round(confidence, 3), "gender_llr": round(total, 3),
            "gender_evidence": evidence}


def pitch_class(f0_hz: float, gender: str | None) -> str:
    """low / medium / high against the sex's bands (male, female) or the absolute bands (unknown or None)."""
    low, high = {"male": MALE_PITCH_BANDS, "female": FEMALE_PITCH_BANDS}.get(gender, ABSOLUTE_PITCH_BANDS)
    return "low" if f0_hz < low else "high" if f0_hz > high else "medium"


def rate_class(syllables_per_second: float) -> str:
    return ("slow" if syllables_per_second < SLOW_SYL_PER_S else "fast" if syllables_per_second > FAST_SYL_PER_S
            else "normal")


def noise_class(snr_db: float) -> str:
    return "clean" if snr_db >= CLEAN_SNR_DB else "noisy"


def effective_bandwidth_hz(audio: np.ndarray, span: tuple[float, float] | None = None, drop_db: float = 60.0,
                           nfft: int = 512) -> float:
    """Highest frequency at which the speech's long-term spectrum is within `drop_db` of its peak: about 3.4-4 kHz
    for telephone audio resampled to 16 kHz, up to 8 kHz for wideband audio. Cues above it cannot be read."""
    x = np.asarray(audio, dtype=np.float64)
    if span is not None:
        x = x[int(span[0] * SR): int(math.ceil(span[1] * SR))]
    if x.size < nfft:
        return float("nan")
    hop = nfft // 2
    n = 1 + (x.size - nfft) // hop
    frames = x[np.arange(nfft)[None, :] + hop * np.arange(n)[:, None]] * np.hanning(nfft)
    power = np.abs(np.fft.rfft(frames, axis=1)) ** 2
    loud = power.sum(axis=1) >= np.quantile(power.sum(axis=1), 0.5)  # the speech frames, not the pauses
    ltas = power[loud].mean(axis=0)
    if float(ltas.max()) <= 1e-20:
        return float("nan")
    smooth = np.convolve(ltas, np.ones(5) / 5, mode="same")  # 156 Hz smoothing: a harmonic gap is not a cut-off
    db = 10 * np.log10(np.maximum(smooth, 1e-30))
    freqs = np.fft.rfftfreq(nfft, 1.0 / SR)
    above = np.nonzero(db >= db.max() - drop_db)[0]
    return float(freqs[above[-1]])


def clipped_fraction(audio: np.ndarray) -> float:
    """Share of samples on a flat top at the clip's extreme value (two or more consecutive samples within 0.1% of
    the peak magnitude), which is what hard clipping leaves, at full scale or at a gain applied before it; 0 for
    near-silent clips (below -60 dBFS peak, where quantisation alone makes flat tops)."""
    x = np.abs(np.asarray(audio, dtype=np.float64))
    peak = float(x.max()) if x.size else 0.0
    if peak < 1e-3 or x.size < 2:
        return 0.0
    at_peak = x >= 0.999 * peak
    flat = at_peak[1:] & at_peak[:-1]
    return float(flat.sum()) / x.size


def formant_settings(bandwidth_hz: float) -> tuple[float, float, int] | None:
    """(analysis ceiling Hz, number of formants to track below it, formants to use) for a clip's bandwidth, or None
    when the band is too narrow. Wideband: Praat's standard 5500 Hz / 5 formants, F1..F4 used. Narrower: the ceiling
    follows the band and the tracker looks for about one formant per 1.1 kHz, and only F1..F3 are used."""
    if not math.isfinite(bandwidth_hz) or bandwidth_hz < FORMANT_MIN_BANDWIDTH_HZ:
        return None
    ceiling = min(5500.0, bandwidth_hz)
    count = max(3.0, round(ceiling / 1100.0 * 2) / 2)
    return ceiling, count, 4 if ceiling >= FOUR_FORMANT_BANDWIDTH_HZ else 3


def f0_range(f0: np.ndarray) -> float:
    """10-90 percentile spread of the voiced F0 values in Hz (NaN with fewer than 3 voiced frames)."""
    v = f0[f0 > 0]
    return float(np.percentile(v, 90) - np.percentile(v, 10)) if v.size >= 3 else float("nan")


def formant_dispersion(formants) -> float:
    """Least-squares spacing dF of a uniform tube, F_i = (i - 1/2) dF, fitted to the available F1..F4."""
    f = np.asarray(formants, dtype=np.float64)
    k = np.arange(f.size) + 0.5
    ok = np.isfinite(f) & (f > 0)
    if ok.sum() < 2:
        return float("nan")
    return float(np.sum(f[ok] * k[ok]) / np.sum(k[ok] ** 2))


# ----------------------------------------------------------------------------------------------- frame energy

def frame_power(audio: np.ndarray, frame: int = 320, hop: int = 160) -> np.ndarray:
    """Mean power of each frame (20 ms frames, 10 ms hop at 16 kHz)."""
    x = np.asarray(audio, dtype=np.float64)
    if x.size < frame:
        x = np.pad(x, (0, frame - x.size))
    n = 1 + (x.size - frame) // hop
    idx = np.arange(frame)[None, :] + hop * np.arange(n)[:, None]
    return np.mean(x[idx] ** 2, axis=1)


def rms_dbfs(audio: np.ndarray) -> float:
    rms = float(np.sqrt(np.mean(np.asarray(audio, dtype=np.float64) ** 2)))
    return 20 * math.log10(rms) if rms > 0 else -120.0


# ----------------------------------------------------------------------------------------------- VAD and spans

def webrtc_vad_frames(audio: np.ndarray, aggressiveness: int = 2, frame_ms: int = 30) -> np.ndarray:
    """WebRTC VAD decisions per frame_ms frame."""
    import webrtcvad

    vad = webrtcvad.Vad(aggressiveness)
    pcm = (np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes()
    step = SR * frame_ms // 1000 * 2
    return np.array([vad.is_speech(pcm[i:i + step], SR) for i in range(0, len(pcm) - step + 1, step)], dtype=bool)


def noise_floor_power(power: np.ndarray, percentile: float = 10.0) -> float:
    return float(np.percentile(power, percentile))


def speech_span_vad(audio: np.ndarray, aggressiveness: int = 2) -> tuple[float, float] | None:
    """(start_s, end_s) of speech: WebRTC VAD frames that also stand >= 6 dB above the clip's noise floor.
    The energy check keeps stationary noise, which WebRTC VAD often calls speech at low SNR, from stretching the
    span to the whole clip. None if no speech."""
    frame = SR * 30 // 1000
    vad = webrtc_vad_frames(audio, aggressiveness)
    if vad.size == 0:
        return None
    power = frame_power(audio, frame=frame, hop=frame)[: vad.size]
    floor = noise_floor_power(power)
    loud = power > max(floor * 4.0, 1e-10)  # 6 dB above the floor; absolute floor ~ -100 dBFS
    speech = vad & loud
    # ignore isolated blips: require two speech frames within any 3-frame window
    smooth = np.convolve(speech.astype(int), np.ones(3, int), mode="same") >= 2
    speech &= smooth
    idx = np.nonzero(speech)[0]
    if idx.size == 0:
        return None
    return idx[0] * frame / SR, (idx[-1] + 1) * frame / SR


def speech_span_energy(audio: np.ndarray, margin_db: float = 9.0) -> tuple[float, float] | None:
    """(start_s, end_s) from energy alone: first/last 10 ms frame above the noise floor + margin_db after
    smoothing over 50 ms. None if nothing rises above the floor."""
    power = frame_power(audio, frame=320, hop=160)
    smooth = np.convolve(power, np.ones(5) / 5, mode="same")
    floor = max(noise_floor_power(power, 5.0), 1e-10)
    peak = float(np.max(smooth))
    # threshold: margin above the floor, but never below peak - 45 dB (clean clips have a zero floor)
    thr = max(floor * 10 ** (margin_db / 10), peak * 10 ** (-45 / 10))
    idx = np.nonzero(smooth > thr)[0]
    if idx.size == 0 or peak <= 1e-10:
        return None
    return idx[0] * 160 / SR, (idx[-1] * 160 + 320) / SR


def speech_span_flatness(audio: np.ndarray, max_flatness: float = 0.35) -> tuple[float, float] | None:
    """(start_s, end_s) from spectral shape rather than a speech model or energy alone: 20 ms frames whose
    300-4000 Hz spectral flatness (geometric over arithmetic mean power) is below `max_flatness` (harmonics and
    formants make speech peaky; stationary noise and silence are flat) and whose power stands 6 dB above the quietest
    tenth of frames. Runs shorter than 50 ms are ignored. None if no speech."""
    x = np.asarray(audio, dtype=np.float64)
    frame, hop = 320, 160
    if x.size < frame:
        return None
    n = 1 + (x.size - frame) // hop
    frames = x[np.arange(frame)[None, :] + hop * np.arange(n)[:, None]] * np.hanning(frame)
    power = np.abs(np.fft.rfft(frames, 512, axis=1)) ** 2
    freqs = np.fft.rfftfreq(512, 1.0 / SR)
    band = power[:, (freqs >= 300) & (freqs <= 4000)] + 1e-20
    flatness = np.exp(np.mean(np.log(band), axis=1)) / np.mean(band, axis=1)
    energy = power.sum(axis=1)
    peak = float(energy.max())
    if peak <= 1e-12:
        return None
    floor = max(noise_floor_power(energy), peak * 1e-6)
    speech = (flatness < max_flatness) & (energy > 4.0 * floor)
    speech &= np.convolve(speech.astype(int), np.ones(5, int), mode="same") >= 3
    idx = np.nonzero(speech)[0]
    if idx.size == 0:
        return None
    return idx[0] * hop / SR, (idx[-1] * hop + frame) / SR


# ----------------------------------------------------------------------------------------------- SNR

def snr_from_span(audio: np.ndarray, span: tuple[float, float] | None) -> float:
    """SNR = (power in the speech span - noise power) / noise power, noise power from outside the span when there is
    at least 150 ms of it, else from the 10th percentile of frame powers. Capped at SNR_CAP_DB."""
    power = frame_power(audio)
    if span is None:
        return -SNR_CAP_DB if np.max(power) > 1e-10 else 0.0
    t = np.arange(power.size) * 160 / SR + 0.01
    inside = (t >= span[0]) & (t <= span[1])
    outside = ~inside
    noise = float(np.mean(power[outside])) if outside.sum() >= 15 else noise_floor_power(power)
    speech = float(np.mean(power[inside])) if inside.any() else float(np.mean(power))
    return _snr_db(speech, noise)


def snr_percentile(audio: np.ndarray) -> float:
    """SNR from frame-power percentiles: noise = 10th percentile, speech+noise = mean of frames above the median."""
    power = frame_power(audio)
    noise = noise_floor_power(power, 10.0)
    loud = power[power >= np.median(power)]
    return _snr_db(float(np.mean(loud)), noise)


def _snr_db(speech_plus_noise: float, noise: float) -> float:
    if noise <= 1e-12:
        return SNR_CAP_DB
    clean = speech_plus_noise - noise
    if clean <= 0:
        return -SNR_CAP_DB
    return float(np.clip(10 * math.log10(clean / noise), -SNR_CAP_DB, SNR_CAP_DB))


# ----------------------------------------------------------------------------------------------- pitch

def praat_pitch(audio: np.ndarray, method: str = "ac", floor: float = 60.0, ceiling: float = 500.0):
    """(times, f0) with f0 = 0 where unvoiced, from Praat's autocorrelation ("ac") or cross-correlation ("cc")."""
    import parselmouth

    snd = parselmouth.Sound(np.asarray(audio, dtype=np.float64), SR)
    if method == "ac":
        pitch = snd.to_pitch_ac(pitch_floor=floor, pitch_ceiling=ceiling)
    elif method == "cc":
        pitch = snd.to_pitch_cc(pitch_floor=floor, pitch_ceiling=ceiling)
    else:
        raise ValueError(f"unknown Praat pitch method {method!r}")
    return np.asarray(pitch.xs()), np.asarray(pitch.selected_array["frequency"])


def yin_pitch(audio: np.ndarray, floor: float = 60.0, ceiling: float = 500.0, threshold: float = 0.15,
              hop: int = 160):
    """(times, f0) from YIN (de Cheveigne & Kawahara 2002): cumulative-mean-normalised difference function, first
    dip below `threshold`, parabolic refinement. Frames with no dip or low energy are unvoiced (0)."""
    x = np.asarray(audio, dtype=np.float64)
    tau_min, tau_max = int(SR / ceiling), int(SR / floor)
    win = tau_max + 1
    frame = win + tau_max
    if x.size < frame:
        return np.zeros(0), np.zeros(0)
    n = 1 + (x.size - frame) // hop
    idx = np.arange(frame)[None, :] + hop * np.arange(n)[:, None]
    frames = x[idx]
    power = np.mean(frames[:, :win] ** 2, axis=1)
    # difference function via FFT: d(tau) = sum x_j^2 + sum x_{j+tau}^2 - 2 r(tau) over a window of length `win`
    nfft = 1 << (2 * frame - 1).bit_length()
    spec = np.fft.rfft(frames, nfft)
    w_spec = np.fft.rfft(frames[:, :win], nfft)
    r = np.fft.irfft(np.conj(w_spec) * spec, nfft)[:, : tau_max + 1]
    sq = np.cumsum(np.pad(frames ** 2, ((0, 0), (1, 0))), axis=1)
    e0 = sq[:, win] - sq[:, 0]
    taus = np.arange(tau_max + 1)
    e_tau = sq[:, taus + win] - sq[:, taus]
    d = e0[:, None] + e_tau - 2 * r
    d[:, 0] = 0
    cum = np.cumsum(d[:, 1:], axis=1) / np.arange(1, tau_max + 1)
    cmnd = np.ones_like(d)
    cmnd[:, 1:] = d[:, 1:] / np.maximum(cum, 1e-12)
    f0 = np.zeros(n)
    # energy gate: 6 dB over the quietest frames when the clip has quiet parts, and never within 40 dB of the peak
    peak, quiet = float(np.max(power)), float(np.percentile(power, 10)) * 4.0
    floor_power = max(quiet if quiet < 0.25 * peak else 0.0, peak * 1e-4, 1e-10)
    for i in range(n):
        if power[i] < floor_power:
            continue
        below = np.nonzero(cmnd[i, tau_min:] < threshold)[0]
        if below.size == 0:
            continue
        t = below[0] + tau_min
        while t + 1 <= tau_max and cmnd[i, t + 1] < cmnd[i, t]:
            t += 1  # walk to the bottom of the dip
        if 1 <= t < tau_max:
            a, b, c = cmnd[i, t - 1], cmnd[i, t], cmnd[i, t + 1]
            denom = a - 2 * b + c
            shift = 0.5 * (a - c) / denom if abs(denom) > 1e-12 else 0.0
        else:
            shift = 0.0
        f0[i] = SR / (t + shift)
    times = (np.arange(n) * hop + win / 2) / SR
    return times, f0


def voiced_median(f0: np.ndarray) -> float:
    v = f0[f0 > 0]
    return float(np.median(v)) if v.size >= 3 else float("nan")


# ----------------------------------------------------------------------------------------------- formants

def _formant_medians(values: np.ndarray, use: int) -> np.ndarray:
    """Per-formant medians over frames (rows: F1..Fn), NaN beyond `use` formants or where nothing was found."""
    out = np.full(4, np.nan)
    with np.errstate(all="ignore"):
        for i in range(min(use, values.shape[0])):
            row = values[i]
            if np.isfinite(row).sum() >= MIN_FORMANT_FRAMES:
                out[i] = np.nanmedian(row)
    return out


def praat_formants(audio: np.ndarray, times: np.ndarray, ceiling: float = 5500.0, count: float = 5.0,
                   use: int = 4) -> np.ndarray:
    """Median F1..F4 (Praat Burg) over the given (voiced) times; formants past `use` are NaN. A frame counts only
    when each of its first `use` formants is a resonance (bandwidth under FORMANT_MAX_BANDWIDTH_HZ): a broad pole
    is the tracker filling a slot (two formants merged, a missing one, the band edge), and reading it as F_i would
    shift every formant above it by one place."""
    import parselmouth

    if len(times) == 0:
        return np.full(4, np.nan)
    snd = parselmouth.Sound(np.asarray(audio, dtype=np.float64), SR)
    fm = snd.to_formant_burg(max_number_of_formants=count, maximum_formant=ceiling)
    vals = np.array([[fm.get_value_at_time(i, float(t)) for t in times] for i in range(1, use + 1)],
                    dtype=np.float64)
    if FORMANT_MAX_BANDWIDTH_HZ > 0:
        bws = np.array([[fm.get_bandwidth_at_time(i, float(t)) for t in times] for i in range(1, use + 1)],
                       dtype=np.float64)
        with np.errstate(invalid="ignore"):
            vals[:, ~np.all(bws < FORMANT_MAX_BANDWIDTH_HZ, axis=0)] = np.nan
    return _formant_medians(vals, use)


def praat_covariance_formants(audio: np.ndarray, times: np.ndarray, ceiling: float = 5500.0, count: float = 5.0,
                              use: int = 4) -> np.ndarray:
    """Median F1..F4 from covariance-method LPC (Praat "To LPC (covariance)" on the audio resampled to twice the
    ceiling, 2 * count + 2 coefficients), a different estimator from Burg's."""
    import parselmouth
    from parselmouth.praat import call

    if len(times) == 0:
        return np.full(4, np.nan)
    snd = parselmouth.Sound(np.asarray(audio, dtype=np.float64), SR)
    snd = call(snd, "Resample", 2 * ceiling, 50)
    emphasised = call(snd, "Filter (pre-emphasis)", 50.0)
    lpc = call(emphasised, "To LPC (covariance)", int(round(2 * count + 2)), 0.025, 0.005, 50.0)
    fm = call(lpc, "To Formant")
    # the LPC's poles include broad ones that are no resonance: keep peaks narrower than 500 Hz, in order
    slots = int(math.ceil(count)) + 1
    vals = np.full((use, len(times)), np.nan)
    for j, t in enumerate(times):
        peaks = []
        for i in range(1, slots + 1):
            f = call(fm, "Get value at time", i, float(t), "hertz", "Linear")
            b = call(fm, "Get bandwidth at time", i, float(t), "hertz", "Linear")
            if math.isfinite(f) and math.isfinite(b) and f > 90 and b < 500:
                peaks.append(f)
        if len(peaks) >= use:
            vals[:, j] = peaks[:use]
    return _formant_medians(vals, use)


def lpc_formants(audio: np.ndarray, times: np.ndarray, ceiling: float = 5500.0, count: float = 5.0, use: int = 4,
                 frame_s: float = 0.025) -> np.ndarray:
    """Median F1..F4 from autocorrelation LPC (Levinson via a Toeplitz solve) on the audio resampled to twice the
    ceiling, at the given times: roots of the predictor polynomial above 90 Hz with bandwidth under 400 Hz, sorted
    by frequency; frames with fewer than `use` such roots are skipped."""
    from scipy.linalg import solve_toeplitz
    from scipy.signal import resample_poly

    rate = int(round(2 * ceiling))
    g = math.gcd(rate, SR)
    x = resample_poly(np.asarray(audio, dtype=np.float64), rate // g, SR // g) if rate != SR else \
        np.asarray(audio, dtype=np.float64)
    if x.size < 2:
        return np.full(4, np.nan)
    x = np.append(x[0], x[1:] - 0.97 * x[:-1])  # pre-emphasis flattens the glottal tilt
    order = int(round(2 * count + 2))
    half = int(frame_s * rate / 2)
    window = np.hamming(2 * half)
    per_frame = []
    for t in times:
        c = int(t * rate)
        if c - half < 0 or c + half > x.size:
            continue
        seg = x[c - half: c + half] * window
        r = np.correlate(seg, seg, mode="full")[seg.size - 1: seg.size + order]
        if r[0] <= 1e-12:
            continue
        try:
            a = solve_toeplitz(r[:order], -r[1: order + 1])
        except np.linalg.LinAlgError:
            continue
        if not np.all(np.isfinite(a)):
            continue
        roots = np.roots(np.concatenate([[1.0], a]))
        roots = roots[np.imag(roots) > 0]
        freqs = np.angle(roots) * rate / (2 * np.pi)
        bws = -np.log(np.abs(roots)) * rate / np.pi
        keep = (freqs > 90) & (bws < 400) & (freqs < ceiling - 100)
        f = np.sort(freqs[keep])[:use]
        if f.size == use:
            per_frame.append(f)
    if len(per_frame) < MIN_FORMANT_FRAMES:
        return np.full(4, np.nan)
    out = np.full(4, np.nan)
    out[:use] = np.median(np.array(per_frame), axis=0)
    return out


# ----------------------------------------------------------------------------------------------- syllables

def syllable_nuclei(audio: np.ndarray, span: tuple[float, float] | None, voiced_times: np.ndarray) -> int:
    """Count syllable nuclei (after de Jong & Wempe 2009): peaks of the smoothed intensity contour inside the span that
    rise >= 2 dB above the preceding dip, stand within 25 dB of the loudest peak, and fall on voiced frames."""
    power = frame_power(audio, frame=400, hop=160)  # 25 ms / 10 ms
    db = 10 * np.log10(np.maximum(power, 1e-12))
    kernel = np.hanning(7)
    db = np.convolve(db, kernel / kernel.sum(), mode="same")
    t = np.arange(db.size) * 160 / SR + 0.0125
    if span is not None:
        inside = (t >= span[0]) & (t <= span[1])
    else:
        inside = np.ones_like(t, dtype=bool)
    if not inside.any():
        return 0
    top = float(np.max(db[inside]))
    voiced = set(np.round(np.asarray(voiced_times) * 100).astype(int).tolist())
    count, last_dip = 0, db[0]
    for i in range(1, db.size - 1):
        if db[i] < db[i - 1] and db[i] <= db[i + 1]:
            last_dip = db[i]
        if inside[i] and db[i] >= db[i - 1] and db[i] > db[i + 1]:
            near_voiced = any((round(t[i] * 100) + k) in voiced for k in (-2, -1, 0, 1, 2))
            if db[i] - last_dip >= 2.0 and db[i] >= top - 25.0 and near_voiced:
                count += 1
                last_dip = db[i]
    return count


def count_syllables(word: str) -> int:
    """Vowel-group syllable count of an English word (silent final e dropped), at least 1."""
    import re

    w = word.lower().strip("'")
    if not w:
        return 0
    groups = re.findall(r"[aeiouy]+", w)
    n = len(groups)
    if w.endswith("e") and not w.endswith(("le", "ee", "ye")) and n > 1:
        n -= 1
    return max(1, n)


# ----------------------------------------------------------------------------------------------- denoising

def spectral_subtract(audio: np.ndarray, span: tuple[float, float] | None = None, over: float = 2.0,
                      floor: float = 0.02) -> np.ndarray:
    """Power spectral subtraction (Berouti et al. 1979) of a stationary noise estimate. Noise PSD comes from the STFT
    frames outside the speech span when there are enough of them, else from the quietest 10% of frames. Used before
    formant analysis, because broadband noise pulls LPC/Burg estimates of F3/F4 upward."""
    from scipy.signal import istft, stft

    x = np.asarray(audio, dtype=np.float64)
    _, t, z = stft(x, fs=SR, nperseg=512, noverlap=384)
    psd = np.abs(z) ** 2
    frame_e = psd.sum(axis=0)
    out = np.ones(t.size, dtype=bool)
    if span is not None:
        out = (t < span[0] - 0.05) | (t > span[1] + 0.05)
    if out.sum() >= 8:
        noise = psd[:, out].mean(axis=1)
    else:
        quiet = frame_e <= np.quantile(frame_e, 0.1)
        noise = psd[:, quiet].mean(axis=1)
    if float(noise.sum()) <= 1e-12 * max(float(frame_e.max()), 1e-30):
        return x.astype(np.float32)  # nothing to subtract (digital silence around the speech)
    clean = np.maximum(psd - over * noise[:, None], floor * psd)
    gain = np.sqrt(clean / np.maximum(psd, 1e-30))
    _, y = istft(z * gain, fs=SR, nperseg=512, noverlap=384)
    return y[: x.size].astype(np.float32)
