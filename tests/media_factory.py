"""Small real media files for the feature tests: good clips and the field's bad inputs.

Everything is synthesised with numpy/soundfile/OpenCV so tests need no downloads and
do not depend on the corpus generator.
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
import soundfile as sf

from pipeline.formats.manifest import MANIFEST_SCHEMA, manifest_meta, write_manifest


def voiced_signal(rate: int = 16000, duration_s: float = 1.5, f0: float = 140.0, seed: int = 0) -> np.ndarray:
    """A speech-like signal: harmonic pulse train with F0 drift, syllable envelope, formant-ish tilt."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(rate * duration_s)) / rate
    f0_track = f0 * (1 + 0.08 * np.sin(2 * np.pi * 1.3 * t))
    phase = 2 * np.pi * np.cumsum(f0_track) / rate
    formants = (700.0, 1200.0, 2500.0)
    sig = np.zeros_like(t)
    for k in range(1, 30):
        freq = k * f0_track
        gain = sum(np.exp(-((freq - f) / 150.0) ** 2) for f in formants) + 0.05 / k
        sig += gain * np.sin(k * phase)
    envelope = 0.5 * (1 - np.cos(2 * np.pi * 3.0 * t)) ** 1.5  # ~3 syllables per second
    sig = sig * envelope + 0.01 * rng.standard_normal(len(t))
    return (0.3 * sig / np.abs(sig).max()).astype(np.float32)


def write_wav(path: Path, rate: int = 16000, duration_s: float = 1.5, seed: int = 0, channels: int = 1, subtype: str = "PCM_16") -> Path:
    sig = voiced_signal(rate, duration_s, f0=120.0 + 10 * (seed % 7), seed=seed)
    data = np.stack([sig] * channels, axis=1) if channels > 1 else sig
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), data, rate, subtype=subtype)
    return path


def draw_face(size: int = 128, shift: tuple[int, int] = (0, 0), smile: float = 0.0, frame_noise_seed: int = 0) -> np.ndarray:
    """A BGR frame with a shaded cartoon face the Haar frontal cascade finds."""
    rng = np.random.default_rng(frame_noise_seed)
    img = np.full((size, size, 3), 60, np.uint8)
    cx, cy = size // 2 + shift[0], size // 2 + shift[1]
    s = size / 128
    cv2.ellipse(img, (cx, cy), (int(34 * s), int(44 * s)), 0, 0, 360, (150, 170, 200), -1)
    for dx in (-14, 14):
        cv2.ellipse(img, (cx + int(dx * s), cy - int(10 * s)), (int(8 * s), int(4 * s)), 0, 0, 360, (40, 40, 40), -1)
        cv2.line(img, (cx + int((dx - 9) * s), cy - int(20 * s)), (cx + int((dx + 9) * s), cy - int(20 * s)), (30, 30, 30), max(1, int(3 * s)))
    cv2.line(img, (cx, cy - int(6 * s)), (cx, cy + int(10 * s)), (120, 140, 170), max(1, int(3 * s)))
    mouth_h = max(1, int((4 + 6 * smile) * s))
    cv2.ellipse(img, (cx, cy + int(22 * s)), (int(14 * s), mouth_h), 0, 0, 180, (40, 40, 110), max(1, int(3 * s)))
    img = cv2.GaussianBlur(img, (5, 5), 1.5)
    noise = rng.normal(0, 3, img.shape)
    return np.clip(img.astype(np.float64) + noise, 0, 255).astype(np.uint8)


def write_video(path: Path, frames: list[np.ndarray], fps: int = 12) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    h, w = frames[0].shape[:2] if frames else (128, 128)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (w, h))
    if not writer.isOpened():
        raise RuntimeError(f"{path}: OpenCV cannot write mp4v video here")
    for frame in frames:
        writer.write(frame)
    writer.release()
    return path


def write_face_video(path: Path, n_frames: int = 18, size: int = 128, seed: int = 0) -> Path:
    frames = [
        draw_face(size, shift=(int(3 * np.sin(i / 3 + seed)), int(2 * np.cos(i / 4))), smile=(i % 6) / 6, frame_noise_seed=seed * 1000 + i)
        for i in range(n_frames)
    ]
    return write_video(path, frames)


def write_text(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode("utf-8") if isinstance(text, str) else text)
    return path


SENTENCES = (
    "I can't believe we finally won the match, this is wonderful!",
    "Please put the report on my desk before noon.",
    "Why would you do that to me again?",
    "I miss her so much, the house feels empty.",
    "The train leaves at seven.",
)


def bad_audio(root: Path) -> dict[str, tuple[Path, str | None]]:
    """Odd audio files -> expected failure reason (None = must extract fine)."""
    root.mkdir(parents=True, exist_ok=True)
    out: dict[str, tuple[Path, str | None]] = {}
    zero = root / "zero.wav"
    zero.write_bytes(b"")
    out["zero"] = (zero, "unreadable_audio")
    full = write_wav(root / "full.wav", duration_s=1.0, seed=3)
    blob = full.read_bytes()
    trunc = root / "truncated.wav"
    trunc.write_bytes(blob[: len(blob) // 2])  # header still declares the full data length
    out["truncated"] = (trunc, "truncated_audio")
    silent = root / "silent.wav"
    sf.write(str(silent), np.zeros(16000, np.float32), 16000)
    out["silent"] = (silent, "silent_audio")
    garbage = root / "garbage.wav"
    garbage.write_bytes(np.random.default_rng(1).integers(0, 256, 4000, dtype=np.uint8).tobytes())
    out["garbage"] = (garbage, "unreadable_audio")
    short = write_wav(root / "short.wav", duration_s=0.05, seed=4)
    out["short"] = (short, "too_short_audio")
    out["stereo48k"] = (write_wav(root / "stereo48k.wav", rate=48000, channels=2, seed=5), None)
    out["pcm_u8"] = (write_wav(root / "pcm_u8.wav", subtype="PCM_U8", seed=6), None)
    return out


def bad_video(root: Path) -> dict[str, tuple[Path, str | None]]:
    root.mkdir(parents=True, exist_ok=True)
    out: dict[str, tuple[Path, str | None]] = {}
    out["no_frames"] = (write_video(root / "no_frames.mp4", []), "no_video_frames")
    garbage = root / "garbage.mp4"
    garbage.write_bytes(np.random.default_rng(2).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    out["garbage"] = (garbage, "unreadable_video")
    zero = root / "zero.mp4"
    zero.write_bytes(b"")
    out["zero"] = (zero, "unreadable_video")
    black = [np.zeros((128, 128, 3), np.uint8)] * 8
    out["black"] = (write_video(root / "black.mp4", black), "black_video")
    blank = [np.full((128, 128, 3), 120, np.uint8)] * 8
    out["no_face"] = (write_video(root / "no_face.mp4", blank), "no_face")
    return out


def bad_text(root: Path) -> dict[str, tuple[Path, str | None]]:
    root.mkdir(parents=True, exist_ok=True)
    return {
        "empty": (write_text(root / "empty.txt", ""), "empty_text"),
        "blank": (write_text(root / "blank.txt", "  \n\t "), "empty_text"),
        "latin1": (write_text(root / "latin1.txt", "caf\xe9 cr\xe8me".encode("latin-1")), "undecodable_text"),
        "bom": (write_text(root / "bom.txt", "\ufeffHello there, friend.".encode("utf-8")), None),
    }


def make_manifest(path: Path, rows: list[dict]) -> Path:
    """Write a manifest from partial rows (missing columns become null)."""
    cols = {f.name: [r.get(f.name) for r in rows] for f in MANIFEST_SCHEMA}
    cols["label"] = [r.get("label", "neutral") for r in rows]
    cols["domain"] = [r.get("domain", "source") for r in rows]
    table = pa.table(cols, schema=MANIFEST_SCHEMA)
    write_manifest(table, path, manifest_meta("classification", ["neutral", "happy", "sad", "angry"], "tests"))
    return path


def good_clips(root: Path, n: int, modalities: tuple[str, ...] = ("audio", "video", "text"), start: int = 0) -> list[dict]:
    """n manifest rows with real good files for the given modalities."""
    rows = []
    for i in range(start, start + n):
        uid = f"u{i:04d}"
        row: dict = {"utterance_id": uid, "session": "s1", "speaker": f"spk{i % 2}"}
        if "audio" in modalities:
            row["audio_path"] = str(write_wav(root / "audio" / f"{uid}.wav", duration_s=1.0 + 0.1 * (i % 5), seed=i))
        if "video" in modalities:
            row["video_path"] = str(write_face_video(root / "video" / f"{uid}.mp4", n_frames=10 + i % 6, seed=i))
        if "text" in modalities:
            row["text_path"] = str(write_text(root / "text" / f"{uid}.txt", SENTENCES[i % len(SENTENCES)] + f" ({i})"))
        rows.append(row)
    return rows
