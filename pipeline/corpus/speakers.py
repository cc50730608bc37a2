"""Speaker identities: the per-person constants every modality renders with.

A speaker fixes the voice (base F0, formant scale, breathiness) and the face
(geometry, skin tone, hair) so that identity is a nuisance variable the learner
must ignore; a speaker-independent split then measures emotion, not identity.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

# Skin tones in BGR (OpenCV order), light to dark; speakers draw one and jitter it.
SKIN_TONES_BGR: tuple[tuple[int, int, int], ...] = (
    (180, 200, 235),
    (150, 180, 225),
    (120, 160, 205),
    (95, 135, 180),
    (70, 105, 150),
    (55, 80, 115),
)


@dataclass(frozen=True)
class Speaker:
    speaker_id: str  # e.g. "Ses01_F"
    session: str  # e.g. "Ses01"
    gender: str  # "F" or "M": only sets the voice range and naming
    domain: str  # "source" or "shifted"
    # voice
    f0_hz: float  # base fundamental frequency
    formant_scale: float  # vocal-tract length: multiplies every formant
    breathiness: float  # aspiration noise share in the glottal source
    rate_sps: float  # habitual speaking rate, syllables per second
    # face (fractions of the frame size so any video_size works)
    face_w: float  # head half-width
    face_h: float  # head half-height
    eye_dx: float  # eye distance from the midline
    eye_y: float  # eye height above the head centre
    eye_size: float  # eye half-width
    mouth_y: float  # mouth distance below the head centre
    mouth_w: float  # mouth half-width
    skin_bgr: tuple[int, int, int]
    hair_bgr: tuple[int, int, int]
    background_bgr: tuple[int, int, int]
    # idiosyncratic resting expression, in the same units as emotion offsets
    rest_brow: float
    rest_mouth: float

    def to_dict(self) -> dict:
        return asdict(self)


GREY_WEIGHTS_BGR = np.array([0.114, 0.587, 0.299])
MIN_FACE_CONTRAST = 40.0  # grey levels between skin and background


def _contrast_background(skin: np.ndarray, background: np.ndarray) -> np.ndarray:
    """Push a background that is as bright as the skin away from it (no extra RNG draws).

    A face whose outline vanishes into the wall defeats the Haar cascade on many
    frames; real recording setups avoid that too. Other speakers stay byte-identical.
    """
    gap = float(GREY_WEIGHTS_BGR @ background - GREY_WEIGHTS_BGR @ skin)
    if abs(gap) >= MIN_FACE_CONTRAST:
        return background
    skin_grey = float(GREY_WEIGHTS_BGR @ skin)
    direction = 1.0 if skin_grey < 128 else -1.0
    return np.clip(background + direction * (MIN_FACE_CONTRAST - direction * gap), 10, 245)


def make_speakers(seed: int, sessions: int, per_session: int, domain: str = "source") -> list[Speaker]:
    """Draw `sessions x per_session` speakers from `seed`; shifted speakers are new people.

    Speakers alternate F/M within a session (IEMOCAP layout: one actress and one actor
    per session). The shifted domain uses its own RNG stream and a different session
    prefix, so none of its speakers coincides with a source speaker.
    """
    stream = 0 if domain == "source" else 1
    rng = np.random.default_rng([seed, 7001, stream])
    prefix = "Ses" if domain == "source" else "Shf"
    speakers: list[Speaker] = []
    for s in range(sessions):
        session = f"{prefix}{s + 1:02d}"
        for k in range(per_session):
            gender = "F" if k % 2 == 0 else "M"
            suffix = gender if per_session <= 2 else f"{gender}{k // 2 + 1}"
            tone = np.array(SKIN_TONES_BGR[int(rng.integers(len(SKIN_TONES_BGR)))], dtype=float)
            tone = np.clip(tone + rng.normal(0, 8, 3), 30, 250)
            hair = np.clip(rng.uniform(15, 90) + rng.normal(0, 10, 3), 5, 140)
            background = _contrast_background(tone, np.clip(rng.uniform(60, 190) + rng.normal(0, 25, 3), 20, 230))
            speakers.append(
                Speaker(
                    speaker_id=f"{session}_{suffix}",
                    session=session,
                    gender=gender,
                    domain=domain,
                    f0_hz=float(rng.uniform(185, 250) if gender == "F" else rng.uniform(95, 140)),
                    formant_scale=float(rng.uniform(1.05, 1.18) if gender == "F" else rng.uniform(0.88, 1.0)),
                    breathiness=float(rng.uniform(0.02, 0.10)),
                    rate_sps=float(rng.uniform(3.6, 5.0)),
                    face_w=float(rng.uniform(0.27, 0.33)),
                    face_h=float(rng.uniform(0.36, 0.42)),
                    eye_dx=float(rng.uniform(0.105, 0.125)),
                    eye_y=float(rng.uniform(0.07, 0.10)),
                    eye_size=float(rng.uniform(0.050, 0.062)),
                    mouth_y=float(rng.uniform(0.17, 0.21)),
                    mouth_w=float(rng.uniform(0.08, 0.11)),
                    skin_bgr=tuple(int(v) for v in tone),
                    hair_bgr=tuple(int(v) for v in hair),
                    background_bgr=tuple(int(v) for v in background),
                    rest_brow=float(rng.normal(0, 0.15)),
                    rest_mouth=float(rng.normal(0, 0.15)),
                )
            )
    return speakers
