"""Break clips the way field data breaks, and say exactly how (ground truth for tests).

One broken clip breaks one modality. The reason codes are the contract with the
extraction tests: each extractor must detect its own codes and mark the modality
missing with a reason instead of crashing.
"""
from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np

from pipeline.core.atomic import atomic_path

# reason code -> broken modality
BREAKAGES: dict[str, str] = {
    "video_absent": "video",  # no file at all (listing path is null)
    "video_black": "video",  # camera off: every frame black
    "audio_silent": "audio",  # digital zeros or near-silence
    "audio_truncated": "audio",  # header promises more data than the file holds
    "audio_corrupt": "audio",  # garbage bytes, not a decodable file
    "text_empty": "text",  # zero bytes or whitespace only
}
CODES: tuple[str, ...] = tuple(BREAKAGES)


def assign_breakages(rng: np.random.Generator, n: int, share: float, codes: tuple[str, ...] = CODES) -> list[str | None]:
    """Pick round(share * n) clips and give them reason codes, every code before any repeats."""
    n_broken = int(round(share * n))
    chosen = rng.choice(n, size=n_broken, replace=False) if n_broken else np.array([], dtype=int)
    cycle: list[str] = []
    out: list[str | None] = [None] * n
    for idx in chosen:
        if not cycle:
            cycle = list(rng.permutation(codes))
        out[int(idx)] = str(cycle.pop())
    return out


def silent_samples(rng: np.random.Generator, n_samples: int) -> tuple[np.ndarray, str]:
    """Either exact digital zeros or a near-silent hiss a few LSB high (a muted mic)."""
    if rng.random() < 0.5:
        return np.zeros(n_samples, dtype=np.float32), "zeros"
    return (rng.standard_normal(n_samples) * 3e-5).astype(np.float32), "near_silence"


def truncate_wav(path: Path, rng: np.random.Generator) -> str:
    """Cut a written WAV mid-stream (odd byte count) while its header keeps the full size."""
    size = path.stat().st_size
    data_start = _wav_data_offset(path)
    keep = data_start + int((size - data_start) * rng.uniform(0.2, 0.6)) | 1  # odd: cut inside a sample
    with open(path, "r+b") as fh:
        fh.truncate(keep)
    return f"kept {keep} of {size} bytes"


def write_garbage(path: Path, rng: np.random.Generator, n_bytes: int) -> str:
    """Random bytes; half the time behind a fake RIFF magic so a magic-number check is not enough."""
    blob = rng.integers(0, 256, n_bytes, dtype=np.uint8).tobytes()
    detail = "random"
    if rng.random() < 0.5:
        blob = b"RIFF" + blob[4:]
        detail = "riff_magic_then_random"
    with atomic_path(path) as tmp:
        tmp.write_bytes(blob)
    return detail


def empty_transcript(rng: np.random.Generator) -> tuple[str, str]:
    if rng.random() < 0.5:
        return "", "zero_bytes"
    return ["   ", "\n", " \t \n", "  \n  "][int(rng.integers(4))], "whitespace"


def remove_if_present(path: Path) -> None:
    """A regenerated corpus must not keep a stale file where the clip now has none."""
    if path.exists():
        os.unlink(path)


def _wav_data_offset(path: Path) -> int:
    """Byte offset of the 'data' chunk payload in a RIFF/WAVE file."""
    declared, present = wav_data_sizes(path)
    return path.stat().st_size - present


def wav_data_sizes(path: Path) -> tuple[int, int]:
    """(bytes the 'data' chunk header declares, bytes actually present after it).

    libsndfile (soundfile) opens a truncated WAV without error and silently returns
    fewer frames, so a reader that wants to flag truncation compares these two.
    """
    with open(path, "rb") as fh:
        header = fh.read(12)
        if header[:4] != b"RIFF" or header[8:12] != b"WAVE":
            raise ValueError(f"{path}: not a RIFF/WAVE file")
        while True:
            chunk = fh.read(8)
            if len(chunk) < 8:
                raise ValueError(f"{path}: no data chunk")
            cid, length = chunk[:4], struct.unpack("<I", chunk[4:])[0]
            if cid == b"data":
                return length, path.stat().st_size - fh.tell()
            fh.seek(length + (length & 1), os.SEEK_CUR)
