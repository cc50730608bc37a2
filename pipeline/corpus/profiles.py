"""Corpus profiles: named defaults of the informativeness knobs.

A profile says how much each modality alone can know about the emotion. `balanced`
is the original calibration (the three modalities about equally informative, so
combination re-weighting has little to rebalance, and methods tie); `realistic` (the
default) follows published single-modality scores on IEMOCAP and CMU-MOSEI: text clearly
strongest, audio in the middle, video weakest. Values were measured with
`benchmarks/calibrate_corpus.py` and MCULoRA (figures in the README's corpus section).

A knob set explicitly in `params.yaml: corpus` overrides the profile; a knob left null
or absent takes the profile's value. Every other knob (classes, utterances, breakage,
shifted domain) composes with either profile.
"""
from __future__ import annotations

from typing import Any

DEFAULT_PROFILE = "realistic"  # the default run (params.yaml corpus.profile says the same)

PROFILES: dict[str, dict[str, Any]] = {
    "balanced": {
        "audio_emotion_strength": 0.7,  # scales every prosodic shift of the emotion
        "audio_intensity_range": (0.1, 1.0),  # per-clip vocal intensity
        "audio_variability": 1.0,  # per-clip natural prosody variation (x default spread)
        "snr_db_range": (5.0, 25.0),
        "face_intensity_range": (0.05, 0.8),  # per-clip expression intensity
        "face_jitter": 0.3,  # per-clip random offsets of brows/mouth (expression units)
        "video_noise_std": 6.0,  # sensor noise, grey levels
        "text_cue_share": 0.45,  # transcripts carrying a cue of the true class
        "text_misleading_share": 0.12,  # transcripts carrying a cue of another class
    },
    "realistic": {
        "audio_emotion_strength": 1.3,
        "audio_intensity_range": (0.25, 1.0),
        "audio_variability": 1.0,
        "snr_db_range": (5.0, 25.0),
        "face_intensity_range": (0.03, 0.45),
        "face_jitter": 0.4,
        "video_noise_std": 10.0,
        "text_cue_share": 0.7,
        "text_misleading_share": 0.05,
    },
}

KNOBS: tuple[str, ...] = tuple(PROFILES["balanced"])


def resolve_knobs(profile: str, explicit: dict[str, Any]) -> dict[str, Any]:
    """The knob values to use: the profile's, replaced by every explicit non-null value."""
    if profile not in PROFILES:
        raise ValueError(f"corpus.profile must be one of {sorted(PROFILES)}, got {profile!r}")
    values = dict(PROFILES[profile])
    for knob in KNOBS:
        if explicit.get(knob) is not None:
            value = explicit[knob]
            values[knob] = tuple(value) if isinstance(value, (list, tuple)) else value
    return values


def overrides_of(profile: str, values: dict[str, Any]) -> dict[str, Any]:
    """The knobs whose value differs from the profile's (what a user changed on top of it)."""
    base = PROFILES[profile]
    return {k: values[k] for k in KNOBS if _norm(values[k]) != _norm(base[k])}


def _norm(value: Any) -> Any:
    return tuple(float(v) for v in value) if isinstance(value, (list, tuple)) else float(value)
