"""Face clips: a drawn face whose expression carries the emotion, under camera nuisances.

The face is drawn large enough and with the light/dark layout (dark eye sockets and
brows over bright cheeks, a bright nose bridge) that OpenCV's Haar frontal-face
cascade keys on, so the real visual extractor finds it. Emotion moves brows, mouth
and eyelids by a per-clip intensity; head motion, lighting drift and sensor noise
keep pixels from being a trivial read-out of the label.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from pipeline.core.atomic import current_umask

from pipeline.corpus.speakers import Speaker

# Expression at full intensity, per class. Units: brow_raise and mouth_curve are in
# multiples of ~3 % of the frame, brow_tilt > 0 pulls the inner brow ends down
# (frown), eye_open multiplies the resting eye height.
EXPRESSIONS: dict[str, dict[str, float]] = {
    "neutral": {"brow_raise": 0.0, "brow_tilt": 0.0, "mouth_curve": 0.0, "mouth_open": 0.05, "eye_open": 1.0},
    "happy": {"brow_raise": 0.35, "brow_tilt": -0.1, "mouth_curve": 1.0, "mouth_open": 0.35, "eye_open": 0.75},
    "sad": {"brow_raise": 0.25, "brow_tilt": -1.0, "mouth_curve": -0.8, "mouth_open": 0.0, "eye_open": 0.7},
    "angry": {"brow_raise": -0.8, "brow_tilt": 1.0, "mouth_curve": -0.35, "mouth_open": 0.3, "eye_open": 1.15},
}
NEUTRAL = EXPRESSIONS["neutral"]
SUPERSAMPLE = 2  # draw at 2x and downsample: anti-aliased edges without a graphics library
# Haar keys on dark eye regions over brighter cheeks: sockets are shaded and the
# eye whites stay close to the skin tone (pure white eyes break detection on dark skin).
SOCKET_SHADE = 0.6


@dataclass(frozen=True)
class Channel:
    """Camera and room: what the shifted domain changes."""

    light_gain: float  # overall exposure multiplier
    light_side: float  # -1..1: left/right key light strength across the frame
    light_drift: float  # relative exposure change from first to last frame
    tint_bgr: tuple[float, float, float]  # colour cast of the light
    noise_std: float  # sensor noise, grey levels


def expression_for(label: str, intensity: float, rng: np.random.Generator, jitter: float) -> dict[str, float]:
    """Blend neutral towards `label`'s expression by `intensity`, plus per-clip jitter."""
    target = EXPRESSIONS.get(label) or _unknown_class_expression(label)
    expr = {k: NEUTRAL[k] + intensity * (target[k] - NEUTRAL[k]) for k in NEUTRAL}
    for key in ("brow_raise", "brow_tilt", "mouth_curve"):
        expr[key] += float(rng.normal(0, jitter))
    expr["mouth_open"] = max(0.0, expr["mouth_open"] + float(rng.normal(0, jitter * 0.3)))
    expr["eye_open"] = float(np.clip(expr["eye_open"] + rng.normal(0, jitter * 0.2), 0.45, 1.4))
    return expr


def _unknown_class_expression(label: str) -> dict[str, float]:
    # Configurable class lists beyond the four defaults get a stable random expression.
    rng = np.random.default_rng(sum(ord(c) * 131**i for i, c in enumerate(label)) % 2**32)
    return {
        "brow_raise": float(rng.uniform(-0.8, 0.8)),
        "brow_tilt": float(rng.uniform(-1, 1)),
        "mouth_curve": float(rng.uniform(-1, 1)),
        "mouth_open": float(rng.uniform(0, 0.4)),
        "eye_open": float(rng.uniform(0.7, 1.15)),
    }


def render_clip(
    rng: np.random.Generator,
    speaker: Speaker,
    expr: dict[str, float],
    n_frames: int,
    fps: float,
    size: int,
    channel: Channel,
    syllable_rate: float,
) -> np.ndarray:
    """Return the clip as uint8 BGR frames, shape (T, size, size, 3)."""
    t = np.arange(n_frames) / fps
    phases = rng.uniform(0, 2 * np.pi, 6)
    # head motion: slow smooth sway, in frame fractions / degrees
    dx = 0.025 * np.sin(2 * np.pi * 0.35 * t + phases[0]) + 0.01 * np.sin(2 * np.pi * 0.9 * t + phases[1])
    dy = 0.015 * np.sin(2 * np.pi * 0.5 * t + phases[2])
    angle = 4.0 * np.sin(2 * np.pi * 0.3 * t + phases[3]) * rng.uniform(0.3, 1.0)
    scale = 1.0 + 0.03 * np.sin(2 * np.pi * 0.2 * t + phases[4])
    # expression onset: starts part-way, reaches the clip's peak in the first ~30 %
    onset = np.clip(0.4 + 0.6 * t / max(0.3 * t[-1], 1e-3), 0, 1) if n_frames > 1 else np.ones(1)
    talk = np.abs(np.sin(np.pi * syllable_rate * t + phases[5]))  # jaw follows syllables
    blink = _blink_track(rng, n_frames, fps)
    gain = channel.light_gain * (1 + channel.light_drift * (t / max(t[-1], 1e-3) if n_frames > 1 else t))
    light = _light_field(size, channel)

    frames = np.empty((n_frames, size, size, 3), dtype=np.uint8)
    for i in range(n_frames):
        e = {k: NEUTRAL[k] + onset[i] * (expr[k] - NEUTRAL[k]) for k in expr}
        e["mouth_open"] += 0.25 * talk[i]
        e["eye_open"] *= blink[i]
        img = _draw_face(speaker, e, size * SUPERSAMPLE, (dx[i], dy[i]))
        centre = (size * SUPERSAMPLE / 2, size * SUPERSAMPLE / 2)
        warp = cv2.getRotationMatrix2D(centre, float(angle[i]), float(scale[i]))
        img = cv2.warpAffine(img, warp, (size * SUPERSAMPLE,) * 2, borderMode=cv2.BORDER_REPLICATE)
        img = cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA).astype(np.float32)
        img *= light * gain[i]
        img += rng.normal(0, channel.noise_std, img.shape).astype(np.float32)
        frames[i] = np.clip(img, 0, 255).astype(np.uint8)
    return frames


def _blink_track(rng: np.random.Generator, n_frames: int, fps: float) -> np.ndarray:
    track = np.ones(n_frames)
    n_blinks = rng.poisson(0.3 * n_frames / fps)
    for start in rng.integers(0, max(n_frames, 1), n_blinks):
        track[start : start + 2] = 0.15
    return track


def _light_field(size: int, channel: Channel) -> np.ndarray:
    """Per-pixel multiplicative light: side key light and colour cast, shape (H, W, 3)."""
    x = np.linspace(-1, 1, size, dtype=np.float32)
    side = 1 + 0.25 * channel.light_side * x  # (W,)
    field = np.broadcast_to(side[None, :, None], (size, size, 3)).copy()
    field *= np.asarray(channel.tint_bgr, dtype=np.float32)[None, None, :]
    return field


def _draw_face(sp: Speaker, e: dict[str, float], S: int, shift: tuple[float, float]) -> np.ndarray:
    """Draw one frame at supersampled size S; geometry in fractions of S."""
    img = np.empty((S, S, 3), dtype=np.uint8)
    grad = np.linspace(1.1, 0.85, S)[:, None, None]
    img[:] = np.clip(np.asarray(sp.background_bgr)[None, None, :] * grad, 0, 255).astype(np.uint8)
    cx, cy = S * (0.5 + shift[0]), S * (0.52 + shift[1])
    P = lambda x, y: (int(round(x)), int(round(y)))  # noqa: E731 - tiny local point helper
    skin = np.asarray(sp.skin_bgr, dtype=float)
    shade = lambda f: tuple(int(v) for v in np.clip(skin * f, 0, 255))  # noqa: E731
    fw, fh = sp.face_w * S, sp.face_h * S

    cv2.rectangle(img, P(cx - 0.45 * fw, cy + 0.6 * fh), P(cx + 0.45 * fw, S), shade(0.75), -1)  # neck
    cv2.ellipse(img, P(cx, cy - 0.12 * fh), P(fw * 1.1, fh * 1.0), 0, 0, 360, sp.hair_bgr, -1)  # hair
    cv2.ellipse(img, P(cx, cy), P(fw, fh), 0, 0, 360, shade(1.0), -1)  # head
    cv2.ellipse(img, P(cx, cy - 0.55 * fh), P(fw * 0.95, fh * 0.5), 0, 180, 360, sp.hair_bgr, -1)  # fringe
    cv2.ellipse(img, P(cx - 0.55 * fw, cy + 0.25 * fh), P(fw * 0.35, fh * 0.5), 0, 0, 360, shade(0.92), -1)
    cv2.ellipse(img, P(cx + 0.55 * fw, cy + 0.25 * fh), P(fw * 0.35, fh * 0.5), 0, 0, 360, shade(0.92), -1)

    ey = cy - sp.eye_y * S
    ew = sp.eye_size * S
    eh = ew * 0.55 * e["eye_open"]
    for side in (-1, 1):
        ex = cx + side * sp.eye_dx * S
        cv2.ellipse(img, P(ex, ey), P(ew * 1.5, ew * 1.1), 0, 0, 360, shade(SOCKET_SHADE), -1)  # socket shadow
        if eh > 1.5:
            cv2.ellipse(img, P(ex, ey), P(ew, eh), 0, 0, 360, _eye_white(skin), -1)
            r = min(ew * 0.5, eh)
            cv2.ellipse(img, P(ex, ey), P(r, min(r, eh)), 0, 0, 360, (40, 45, 60), -1)
        cv2.ellipse(img, P(ex, ey), P(ew * 1.05, max(eh, 1.0)), 0, 180, 360, (25, 25, 30), max(2, S // 90))
        # brows: inner end at the midline side; tilt > 0 pulls the inner end down (frown)
        by = ey - ew * 1.5 - e["brow_raise"] * 0.03 * S
        inner = (ex - side * ew * 1.0, by + e["brow_tilt"] * 0.022 * S)
        outer = (ex + side * ew * 1.3, by - e["brow_tilt"] * 0.008 * S + 0.01 * S)
        cv2.line(img, P(*inner), P(*outer), sp.hair_bgr, max(3, int(S * 0.028)))

    # nose: bright bridge, shadow on one side, dark nostrils
    cv2.line(img, P(cx, ey), P(cx, cy + 0.15 * fh), shade(1.12), max(2, S // 50))
    cv2.line(img, P(cx + 0.08 * fw, ey + 0.1 * fh), P(cx + 0.1 * fw, cy + 0.14 * fh), shade(0.8), max(2, S // 80))
    for side in (-1, 1):
        cv2.ellipse(img, P(cx + side * 0.09 * fw, cy + 0.2 * fh), P(0.05 * fw, 0.025 * fh), 0, 0, 360, shade(0.55), -1)

    # mouth: corners move with curvature (smile up, frown down); opening is a dark gap
    my = cy + sp.mouth_y * S
    mw = sp.mouth_w * S
    curve = e["mouth_curve"] * 0.03 * S
    gap = e["mouth_open"] * 0.045 * S
    xs = np.linspace(-1, 1, 21)
    upper_y = my - curve * (xs**2) + curve * 0.3 - 0.5 * gap * (1 - xs**2)
    lower_y = my - curve * (xs**2) + curve * 0.3 + 0.5 * gap * (1 - xs**2)
    upper = np.stack([cx + xs * mw, upper_y], 1)
    lower = np.stack([cx + xs * mw, lower_y], 1)
    lip = tuple(int(v) for v in np.clip(skin * np.array([0.6, 0.55, 0.9]), 0, 255))
    if gap > 1:
        poly = np.concatenate([upper, lower[::-1]]).round().astype(np.int32)
        cv2.fillPoly(img, [poly], (30, 25, 50))
    thick = max(3, int(S * 0.02))
    cv2.polylines(img, [upper.round().astype(np.int32)], False, lip, thick)
    cv2.polylines(img, [lower.round().astype(np.int32)], False, lip, thick)
    return img


def _eye_white(skin: np.ndarray) -> tuple[int, int, int]:
    return tuple(int(v) for v in np.clip(skin * 0.8 + 30, 0, 255))


def write_video(path: Path, frames: np.ndarray, fps: float) -> None:
    """Write frames (T, H, W, 3) BGR with OpenCV mp4v; the file appears only when complete.

    OpenCV picks the container from the file extension, so the temporary name keeps
    the target's suffix; the final rename is atomic on one filesystem.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix, dir=path.parent)
    os.fchmod(fd, 0o666 & ~current_umask())  # the mode a normal write gets, not mkstemp's private 0600
    os.close(fd)
    try:
        height, width = frames.shape[1:3]
        fourcc = "mp4v" if path.suffix == ".mp4" else "MJPG"
        writer = cv2.VideoWriter(tmp_name, cv2.VideoWriter_fourcc(*fourcc), float(fps), (width, height))
        if not writer.isOpened():
            raise RuntimeError(f"{path}: OpenCV could not open a {fourcc} writer")
        for frame in frames:
            writer.write(frame)
        writer.release()
        os.replace(tmp_name, path)
    finally:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
