"""Signal measurements behind the offline captioner and the offline answerers.

Each attribute has (at least) two independent methods, so the two built-in answerers measure differently:
- F0: Praat autocorrelation and cross-correlation pitch (parselmouth), and a NumPy YIN tracker.
- vocal-tract size for gender: Praat Burg formants and NumPy autocorrelation-LPC formants, both summarised as the
  formant dispersion (mean spacing of F1..F4, inversely proportional to vocal-tract length); with F0, F0 range and
  the high-band spectral level they feed one logistic gender score (GENDER_MODEL).
- speech span: WebRTC VAD confirmed by energy above the noise floor; and an energy-only endpoint detector.
- SNR: speech-span power over out-of-span noise power; and a frame-power percentile estimator.
- speaking rate: transcript words over the speech span; and syllable nuclei (intensity peaks) over the span.
All functions take float32 mono audio at 16 kHz.
"""
from __future__ import annotations

import math

import numpy as np

from ..audio import SAMPLE_RATE as SR
SNR_CAP_DB = 60.0  # digital silence has no measurable noise floor; report this instead of infinity

# Issue thresholds (facts -> classes)
MALE_PITCH_BANDS = (95.0, 130.0)
FEMALE_PITCH_BANDS = (175.0, 235.0)
SLOW_WPS, FAST_WPS = 2.0, 3.5
CLEAN_SNR_DB = 20.0

# Gender model: a logistic score over four cues, each centred on the development set's mean so that a cue that
# cannot be measured contributes 0. Fitted by bench/dataflux_gender_fit.py on espeak-ng clips disjoint from the
# evaluation grid (other texts, pitch settings, speeds and SNRs); the printed constants are pasted here.
# Cues (what espeak-ng's voice variants change, see voices/!v/m* and f*; and what differs between real speakers):
# - log_f0: log median F0 (female variants start from a higher base pitch).
# - log_dispersion: log formant dispersion, the spacing of F1..F4, inversely proportional to vocal-tract length
#   (female variants scale formant frequencies by 110-135%, male ones by 90-106%).
# - high_band_db: level of 4-8 kHz relative to 0-1 kHz in the long-term spectrum of the loudest voiced frames, in
#   units of 10 dB (female variants raise and widen the upper formants and add breath noise).
# - log_f0_range: log of the 10-90 percentile F0 spread in Hz (the variants' "pitch" lines set the intonation range
#   in Hz: 58-100 Hz for f1-f5, 27-50 Hz for m1-m7; -p shifts the base pitch but not this range).
GENDER_MODEL = {  # python bench/dataflux_gender_fit.py (lam 1.0): dev 100%, leave-one-variant-out 97.2%
    "intercept": -0.7682,
    "weights": {"log_f0": 0.9393, "log_dispersion": 14.1147, "high_band_db": 1.9126, "log_f0_range": 6.9390},
    "means": {"log_f0": 4.9791, "log_dispersion": 7.0016, "high_band_db": -2.7046, "log_f0_range": 3.2157},
}


def gender_features(f0_hz, dispersion_hz, f0_range_hz=None, high_band_db=None) -> dict:
    """The gender model's inputs (None where a cue could not be measured)."""
    def log_or_none(x):
        return math.log(x) if x is not None and math.isfinite(x) and x > 0 else None

    hb = high_band_db / 10.0 if high_band_db is not None and math.isfinite(high_band_db) else None
    return {"log_f0": log_or_none(f0_hz), "log_dispersion": log_or_none(dispersion_hz), "high_band_db": hb,
            "log_f0_range": log_or_none(max(f0_range_hz, 1.0) if f0_range_hz is not None
                                        and math.isfinite(f0_range_hz) else None)}


def gender_evidence(f0_hz, dispersion_hz, f0_range_hz=None, high_band_db=None, model=None) -> dict:
    """Each cue's contribution to the gender score (> 0 pushes towards female); missing cues contribute 0."""
    model = model or GENDER_MODEL
    feats = gender_features(f0_hz, dispersion_hz, f0_range_hz, high_band_db)
    return {k: (0.0 if feats[k] is None else w * (feats[k] - model["means"][k])) for k, w in model["weights"].items()}


def pitch_class(f0_hz: float, gender: str) -> str:
    low, high = MALE_PITCH_BANDS if gender == "male" else FEMALE_PITCH_BANDS
    return "low" if f0_hz < low else "high" if f0_hz > high else "medium"


def rate_class(words_per_second: float) -> str:
    return "slow" if words_per_second < SLOW_WPS else "fast" if words_per_second > FAST_WPS else "normal"


def noise_class(snr_db: float) -> str:
    return "clean" if snr_db >= CLEAN_SNR_DB else "noisy"


def gender_score(f0_hz, dispersion_hz, f0_range_hz=None, high_band_db=None, model=None) -> float:
    """> 0 means female: the model's intercept plus each cue's contribution (see gender_evidence)."""
    model = model or GENDER_MODEL
    return model["intercept"] + sum(gender_evidence(f0_hz, dispersion_hz, f0_range_hz, high_band_db, model).values())


def f0_range(f0: np.ndarray) -> float:
    """10-90 percentile spread of the voiced F0 values in Hz (NaN with fewer than 3 voiced frames)."""
    v = f0[f0 > 0]
    return float(np.percentile(v, 90) - np.percentile(v, 10)) if v.size >= 3 else float("nan")


def high_band_level_db(audio: np.ndarray, times: np.ndarray, frame_s: float = 0.04) -> float:
    """Level of the 4-8 kHz band relative to the 0-1 kHz band (dB) in the long-term average power spectrum of
    Hann-windowed frames centred at `times` (the loudest voiced frames). NaN when no frame fits."""
    x = np.asarray(audio, dtype=np.float64)
    half = int(frame_s * SR / 2)
    centres = (np.asarray(times) * SR).astype(int)
    centres = centres[(centres - half >= 0) & (centres + half <= x.size)]
    if centres.size == 0:
        return float("nan")
    frames = x[centres[:, None] + np.arange(-half, half)[None, :]] * np.hanning(2 * half)
    ltas = np.mean(np.abs(np.fft.rfft(frames, 1024, axis=1)) ** 2, axis=0)
    freqs = np.fft.rfftfreq(1024, 1.0 / SR)
    low = float(np.mean(ltas[freqs < 1000]))
    high = float(np.mean(ltas[(freqs >= 4000) & (freqs < 8000)]))
    if low <= 1e-20 or high <= 1e-20:
        return float("nan")
    return 10 * math.log10(high / low)


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

def praat_formants(audio: np.ndarray, times: np.ndarray, ceiling: float = 5500.0) -> np.ndarray:
    """Median F1..F4 (Praat Burg) over the given (voiced) times."""
    import parselmouth

    snd = parselmouth.Sound(np.asarray(audio, dtype=np.float64), SR)
    fm = snd.to_formant_burg(max_number_of_formants=5, maximum_formant=ceiling)
    if len(times) == 0:
        return np.full(4, np.nan)
    vals = np.array([[fm.get_value_at_time(i, float(t)) for t in times] for i in (1, 2, 3, 4)], dtype=np.float64)
    with np.errstate(all="ignore"):
        return np.array([np.nanmedian(row) if np.isfinite(row).any() else np.nan for row in vals])


def lpc_formants(audio: np.ndarray, times: np.ndarray, order: int = 14, frame_s: float = 0.025) -> np.ndarray:
    """Median F1..F4 from autocorrelation LPC (Levinson via a Toeplitz solve) at the given times: roots of the
    predictor polynomial above 90 Hz with bandwidth under 400 Hz, sorted by frequency."""
    from scipy.linalg import solve_toeplitz

    x = np.asarray(audio, dtype=np.float64)
    x = np.append(x[0], x[1:] - 0.97 * x[:-1])  # pre-emphasis flattens the glottal tilt
    half = int(frame_s * SR / 2)
    window = np.hamming(2 * half)
    per_frame = []
    for t in times:
        c = int(t * SR)
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
        roots = np.roots(np.concatenate([[1.0], a]))
        roots = roots[np.imag(roots) > 0]
        freqs = np.angle(roots) * SR / (2 * np.pi)
        bws = -np.log(np.abs(roots)) * SR / np.pi
        keep = (freqs > 90) & (bws < 400)
        f = np.sort(freqs[keep])[:4]
        if f.size == 4:
            per_frame.append(f)
    if not per_frame:
        return np.full(4, np.nan)
    return np.median(np.array(per_frame), axis=0)


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
