"""Speech-like audio by source-filter synthesis: emotion lives in prosody and voice quality.

A glottal pulse train follows an F0 contour; syllables are vowel segments shaped by
formant resonators, separated by short noise consonants, at a speaking rate. The
speaker fixes base F0 and vocal-tract scale; emotion moves F0 level and range, rate,
loudness, spectral tilt, jitter, shimmer and breathiness (the cues eGeMAPS measures).
Per-clip variability and background noise keep audio alone from being decisive.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.signal import lfilter

from pipeline.corpus.speakers import Speaker

# Prosody at full strength, relative to the speaker's neutral voice.
# f0_st: semitones; range_st: F0 contour spread; rate: speaking-rate multiplier;
# loud_db: level; tilt: >0 brighter (tense) source, <0 darker (lax);
# jitter/shimmer: period/amplitude perturbation; breath: extra aspiration noise.
PROSODY: dict[str, dict[str, float]] = {
    "neutral": {"f0_st": 0.0, "range_st": 1.5, "rate": 1.0, "loud_db": 0.0, "tilt": 0.0, "jitter": 0.005, "shimmer": 0.04, "breath": 0.0},
    "happy": {"f0_st": 3.0, "range_st": 3.5, "rate": 1.1, "loud_db": 3.0, "tilt": 0.3, "jitter": 0.007, "shimmer": 0.05, "breath": 0.0},
    "sad": {"f0_st": -2.0, "range_st": 0.7, "rate": 0.78, "loud_db": -5.0, "tilt": -0.6, "jitter": 0.010, "shimmer": 0.07, "breath": 0.15},
    "angry": {"f0_st": 2.0, "range_st": 3.0, "rate": 1.2, "loud_db": 6.0, "tilt": 0.8, "jitter": 0.012, "shimmer": 0.09, "breath": 0.0},
}
NEUTRAL = PROSODY["neutral"]
# Vowel formants (F1, F2, F3 in Hz) of an adult male tract; speakers scale them.
VOWELS: tuple[tuple[float, float, float], ...] = (
    (730, 1090, 2440),  # a
    (530, 1840, 2480),  # e
    (270, 2290, 3010),  # i
    (570, 840, 2410),  # o
    (300, 870, 2240),  # u
    (660, 1720, 2410),  # ae
)
BANDWIDTHS = (80.0, 110.0, 160.0)
REFERENCE_DBFS = -26.0  # neutral speech level before emotion and gain


@dataclass(frozen=True)
class AudioChannel:
    snr_db: float  # speech-to-background-noise ratio
    noise_colour: float  # 0 white .. 1 brown-ish (low-frequency hum/rumble)
    gain_db: float  # recording level offset
    band_limit: bool  # telephone-like 300-3400 Hz band (shifted domain)


def prosody_for(label: str, strength: float, rng: np.random.Generator, variability: float) -> dict[str, float]:
    """Neutral voice moved towards `label` by `strength`, plus per-clip natural variation."""
    target = PROSODY.get(label) or _unknown_class_prosody(label)
    p = {k: NEUTRAL[k] + strength * (target[k] - NEUTRAL[k]) for k in NEUTRAL}
    p["f0_st"] += float(rng.normal(0, 1.5 * variability))
    p["range_st"] = max(0.3, p["range_st"] * float(np.exp(rng.normal(0, 0.35 * variability))))
    p["rate"] *= float(np.exp(rng.normal(0, 0.10 * variability)))
    p["loud_db"] += float(rng.normal(0, 2.5 * variability))
    p["tilt"] += float(rng.normal(0, 0.3 * variability))
    return p


def _unknown_class_prosody(label: str) -> dict[str, float]:
    rng = np.random.default_rng(sum(ord(c) * 131**i for i, c in enumerate(label)) % 2**32 + 1)
    return {
        "f0_st": float(rng.uniform(-2, 3)), "range_st": float(rng.uniform(0.7, 3.5)), "rate": float(rng.uniform(0.8, 1.2)),
        "loud_db": float(rng.uniform(-5, 6)), "tilt": float(rng.uniform(-0.6, 0.8)), "jitter": 0.008, "shimmer": 0.06,
        "breath": float(rng.uniform(0, 0.15)),
    }


def synthesize(
    rng: np.random.Generator, speaker: Speaker, prosody: dict[str, float], n_samples: int, sr: int, channel: AudioChannel
) -> np.ndarray:
    """Return float32 mono samples in [-1, 1], length `n_samples`."""
    rate = speaker.rate_sps * prosody["rate"]
    voiced, formants = _syllable_plan(rng, n_samples, sr, rate, speaker.formant_scale)
    f0 = _f0_contour(rng, speaker.f0_hz, prosody, voiced, sr)
    source = _glottal_source(rng, f0, voiced, sr, prosody, speaker.breathiness)
    speech = _vocal_tract(source, formants, sr)
    speech += _consonants(rng, voiced, sr) * np.std(speech) * 0.6
    speech = lfilter([1.0, -0.95], [1.0], speech)  # lip radiation
    speech *= _envelope(voiced, sr)
    level_db = REFERENCE_DBFS + prosody["loud_db"] + channel.gain_db
    speech *= 10 ** (level_db / 20) / max(_rms(speech), 1e-9)
    noise = _background(rng, n_samples, channel.noise_colour)
    noise *= _rms(speech) / 10 ** (channel.snr_db / 20) / max(_rms(noise), 1e-9)
    out = speech + noise
    if channel.band_limit:
        out = _telephone_band(out, sr)
    return np.clip(out, -1.0, 1.0).astype(np.float32)


def _rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x))))


def _syllable_plan(rng: np.random.Generator, n: int, sr: int, rate: float, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """Voicing mask (n,) and per-sample formants (n, 3): syllables, consonant gaps, pauses."""
    voiced = np.zeros(n, dtype=bool)
    formants = np.zeros((n, 3))
    pos = int(rng.uniform(0.05, 0.15) * sr)  # leading silence
    end = n - int(0.08 * sr)
    while pos < end:
        syl = int(sr / rate * rng.gamma(8.0, 1 / 8.0))
        cons = int(syl * rng.uniform(0.2, 0.35))
        vow_end = min(pos + syl, end)
        vowel = np.asarray(VOWELS[int(rng.integers(len(VOWELS)))]) * scale
        voiced[pos + cons : vow_end] = True
        formants[pos:vow_end] = vowel
        pos = vow_end
        if rng.random() < 0.12:  # word/phrase pause
            pos += int(rng.uniform(0.08, 0.25) * sr)
    formants[formants[:, 0] == 0] = np.asarray(VOWELS[0]) * scale
    return voiced, formants


def _f0_contour(rng: np.random.Generator, base_hz: float, p: dict[str, float], voiced: np.ndarray, sr: int) -> np.ndarray:
    """F0 in Hz per sample: accents at ~2.5 Hz, declination, emotion level and range."""
    n = len(voiced)
    knots = max(3, int(n / sr * 2.5) + 2)
    accents = rng.normal(0, 1, knots)  # (K,)
    st = np.interp(np.linspace(0, knots - 1, n), np.arange(knots), accents) * p["range_st"]
    st += p["f0_st"] - 1.5 * np.linspace(0, 1, n)  # declination over the phrase
    st += np.cumsum(rng.normal(0, 1, n)) * p["jitter"] * 0.05  # slow wander
    return base_hz * 2 ** (st / 12)


def _glottal_source(
    rng: np.random.Generator, f0: np.ndarray, voiced: np.ndarray, sr: int, p: dict[str, float], breathiness: float
) -> np.ndarray:
    """Pulse train with jitter and shimmer, glottal low-pass tilt, and aspiration noise."""
    n = len(f0)
    period_noise = 1 + p["jitter"] * rng.standard_normal(n)
    phase = np.cumsum(f0 * period_noise / sr)
    pulse_at = np.flatnonzero(np.diff(np.floor(phase), prepend=0) > 0)
    pulses = np.zeros(n)
    pulses[pulse_at] = 1 + p["shimmer"] * rng.standard_normal(len(pulse_at))
    pulses *= voiced
    # glottal pulse shape: two real poles; closer to 1 = darker (lax), further = brighter (tense)
    pole = float(np.clip(0.97 - 0.03 * p["tilt"], 0.88, 0.995))
    source = lfilter([1.0], [1.0, -2 * pole, pole * pole], pulses)
    source /= max(_rms(source), 1e-9)
    aspiration = rng.standard_normal(n) * (breathiness + p["breath"]) * voiced
    return source + aspiration


def _vocal_tract(source: np.ndarray, formants: np.ndarray, sr: int) -> np.ndarray:
    """Filter each constant-formant run through cascaded second-order resonators."""
    out = np.zeros_like(source)
    change = np.flatnonzero(np.any(np.diff(formants, axis=0) != 0, axis=1)) + 1
    bounds = np.concatenate([[0], change, [len(source)]])
    for a, b in zip(bounds[:-1], bounds[1:]):
        seg = source[a:b]
        for freq, bw in zip(formants[a], BANDWIDTHS):
            r = np.exp(-np.pi * bw / sr)
            theta = 2 * np.pi * min(freq, 0.45 * sr) / sr
            seg = lfilter([1 - r], [1.0, -2 * r * np.cos(theta), r * r], seg)
        out[a:b] = seg
    return out


def _consonants(rng: np.random.Generator, voiced: np.ndarray, sr: int) -> np.ndarray:
    """High-passed noise bursts in the unvoiced gaps inside the utterance (fricatives)."""
    inside = np.zeros_like(voiced)
    idx = np.flatnonzero(voiced)
    if len(idx):
        inside[idx[0] : idx[-1]] = True
    noise = lfilter([1.0, -0.9], [1.0], rng.standard_normal(len(voiced)))
    return noise * (inside & ~voiced)


def _envelope(voiced: np.ndarray, sr: int) -> np.ndarray:
    """Smooth syllable-scale amplitude envelope so segment edges do not click."""
    win = max(1, int(0.012 * sr))
    kernel = np.hanning(2 * win + 1)
    env = np.convolve(voiced.astype(float) * 0.85 + 0.15, kernel / kernel.sum(), mode="same")
    return env


def _background(rng: np.random.Generator, n: int, colour: float) -> np.ndarray:
    """Room/line noise between white (0) and brown-ish (1)."""
    white = rng.standard_normal(n)
    pole = 0.6 + 0.39 * colour
    coloured = lfilter([1.0], [1.0, -pole], white)
    return coloured / max(_rms(coloured), 1e-9) + 0.2 * white


def _telephone_band(x: np.ndarray, sr: int) -> np.ndarray:
    from scipy.signal import butter, sosfilt

    sos = butter(4, [300, min(3400, 0.45 * sr)], btype="bandpass", fs=sr, output="sos")
    return sosfilt(sos, x)
