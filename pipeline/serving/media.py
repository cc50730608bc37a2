"""Raw media -> model inputs: one utterance's files (any subset of audio, video, transcript) to features.

Each modality is extracted by the same extractor classes as the extraction stages, and a
clip that cannot be used gets the same named reason (`features.workers.to_outcome`
classifies results exactly as the stages do; `pipeline.core.media_paths` names absent
or unreadable files). Nothing here raises for one bad file: it becomes that
modality's `status` for that utterance. Extra reasons, for what only prediction meets:
`no_path` (not given, as in the manifest), `not_used_by_model`, `invalid_base64` (served
bytes that do not decode), `no_audio_decoder` / `no_audio_track` (audio wanted from a
video container).

Audio inside a video: used when no audio file is given. soundfile and OpenCV cannot
decode audio in an .mp4; an `ffmpeg` executable on PATH can, and without one the
reason is `no_audio_decoder`.
"""
from __future__ import annotations

import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from features.base import ClipError, Extractor
from features.clips import ClipJob
from features.workers import to_outcome
from pipeline.core.media_paths import listed_path, probe_file
from pipeline.core.modalities import MANIFEST_NAME, MODALITY_ORDER
from pipeline.serving.dialogues import CONVERSATION_COLUMNS, read_conversations

PRESENT = "present"
SUFFIXES: dict[str, tuple[str, ...]] = {  # manifest family -> file suffixes taken from a folder
    "audio": (".wav", ".flac", ".ogg"),
    "video": (".mp4", ".avi", ".mov", ".mkv"),
    "text": (".txt",),
}
FFMPEG_TIMEOUT_S = 60


@dataclass
class MediaItem:
    """One utterance to predict: a path (or None) per manifest family (`audio`, `video`, `text`)."""

    utterance_id: str
    paths: dict[str, Path | None] = field(default_factory=dict)
    failures: dict[str, tuple[str, str]] = field(default_factory=dict)  # family -> (reason, detail) known up front
    conversation: dict[str, Any] = field(default_factory=dict)  # `dialogue` / `turn` / `speaker` as given, if any


@dataclass
class Extracted:
    """Model inputs for N utterances, and per modality why each one is (not) used."""

    features: dict[str, np.ndarray]  # letter -> (N, T, d) float32, zeros where absent
    lengths: dict[str, np.ndarray]  # letter -> (N,) int64, 0 where absent
    present: np.ndarray  # (N, 3) bool, modality order a, t, v
    status: dict[str, list[str]]  # manifest family -> per utterance "present" or a failure reason
    detail: dict[str, list[str | None]]  # the failure message naming the file, None when present


def items_from_folder(folder: str | Path) -> list[MediaItem]:
    """Files of `folder` grouped by stem: `x.wav`, `x.mp4`, `x.txt` are one utterance `x`."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: not a folder")
    items: dict[str, MediaItem] = {}
    for path in sorted(folder.iterdir()):
        family = next((f for f, s in SUFFIXES.items() if path.suffix.lower() in s), None)
        if family is None or path.name.startswith("."):
            continue
        item = items.setdefault(path.stem, MediaItem(path.stem))
        if item.paths.get(family) is not None:
            raise ValueError(f"{folder}: two {family} files for {path.stem!r} ({item.paths[family].name}, {path.name})")
        item.paths[family] = path
    return list(items.values())


def items_from_listing(listing: str | Path) -> list[MediaItem]:
    """Rows of a listing in the ingest format (CSV/Parquet: utterance_id, audio_path, text_path, video_path,
    optionally dialogue, turn, speaker; checked here so a bad turn is a usage error naming the listing)."""
    from pipeline.ingest import read_listing

    listing = Path(listing)
    parsed = read_listing(listing)
    if parsed.ragged:
        raise ValueError(f"{listing}: malformed rows: {'; '.join(map(str, parsed.ragged[:5]))}")
    items = []
    for i, row in enumerate(parsed.rows, start=1):
        if not str(row.get("utterance_id") or "").strip():
            raise ValueError(f"{listing}: data row {i}, column 'utterance_id': empty")
        paths = {}
        for family in SUFFIXES:
            raw = row.get(f"{family}_path")
            paths[family] = listed_path(str(raw).strip(), listing.parent) if raw is not None and str(raw).strip() else None
        items.append(MediaItem(str(row["utterance_id"]).strip(), paths,
                               conversation={c: row[c] for c in CONVERSATION_COLUMNS if c in row}))
    read_conversations(pd.DataFrame([it.conversation for it in items], index=range(len(items))), str(listing))
    return items


class MediaExtractor:
    """The model's extractors (set up on first use) applied to `MediaItem`s."""

    def __init__(self, extractors: dict[str, Extractor], shapes: dict[str, tuple[int, int]]) -> None:
        self.extractors = extractors  # letter -> extractor; modalities the model does not use are absent
        self.shapes = shapes  # letter -> (T, d) the model expects

    def setup(self) -> None:
        """Load every extractor's heavy state now (openSMILE, cascade, text encoder)."""
        for ext in self.extractors.values():
            ext.ensure_setup()

    def extract(self, items: Sequence[MediaItem]) -> Extracted:
        n = len(items)
        present = np.zeros((n, len(MODALITY_ORDER)), dtype=bool)
        feats, lens, status, detail = {}, {}, {}, {}
        with tempfile.TemporaryDirectory(prefix="imer-predict-") as tmp:
            for j, m in enumerate(MODALITY_ORDER):
                t, d = self.shapes[m]
                feats[m] = np.zeros((n, t, d), dtype=np.float32)  # (N, T, d)
                lens[m] = np.zeros(n, dtype=np.int64)
                family = MANIFEST_NAME[m]
                st, dt = self._modality(m, items, Path(tmp), feats[m], lens[m])
                status[family], detail[family] = st, dt
                present[:, j] = [s == PRESENT for s in st]
        return Extracted(feats, lens, present, status, detail)

    def _modality(self, m: str, items: Sequence[MediaItem], tmp: Path, out: np.ndarray, lens: np.ndarray
                  ) -> tuple[list[str], list[str | None]]:
        family = MANIFEST_NAME[m]
        status: list[str] = ["no_path"] * len(items)
        detail: list[str | None] = [f"{it.utterance_id}: no {family} given" for it in items]
        ext = self.extractors.get(m)
        jobs: list[tuple[int, Path]] = []
        for i, item in enumerate(items):
            if family in item.failures:
                status[i], detail[i] = item.failures[family]
                continue
            path = item.paths.get(family)
            if path is None and family == "audio" and item.paths.get("video") is not None:
                try:
                    path = audio_from_video(Path(item.paths["video"]), tmp / f"{i}.wav") if ext else None
                except ClipError as exc:
                    status[i], detail[i] = exc.reason, str(exc)
                    continue
            if path is None:
                continue
            if ext is None:
                status[i], detail[i] = "not_used_by_model", f"{path}: the model was trained without {family}"
                continue
            problem = probe_file(path)
            if problem is not None:
                status[i], detail[i] = problem[0], f"{path}: {problem[0]}: {problem[1]}"
                continue
            jobs.append((i, Path(path)))
        if not jobs:
            return status, detail
        ext.ensure_setup()
        for (i, path), result in zip(jobs, ext.extract_many([p for _, p in jobs])):
            outcome, _ = to_outcome(ClipJob(items[i].utterance_id, str(path), ""), result, ext)
            if outcome.present:
                if outcome.sequence.shape != out.shape[1:]:
                    raise ValueError(f"{family} features {outcome.sequence.shape} != model input {out.shape[1:]}: "
                                     "the extractor is not the one the model was trained with")
                out[i], lens[i] = outcome.sequence, outcome.length
                status[i], detail[i] = PRESENT, None
            else:
                status[i], detail[i] = str(outcome.failure_reason), outcome.message
        return status, detail


def audio_from_video(video: Path, out: Path) -> Path:
    """The first audio track of `video` as a 16 kHz mono WAV at `out`, or ClipError."""
    ffmpeg = shutil.which("ffmpeg")
    if ffmpeg is None:
        raise ClipError("no_audio_decoder", video, "no audio file given, and no decoder for audio inside a video "
                        "(install ffmpeg to use it)")
    if probe_file(video) is not None:
        raise ClipError("no_audio_track", video, "the video file cannot be read")
    cmd = [ffmpeg, "-nostdin", "-v", "error", "-y", "-i", str(video), "-vn", "-ac", "1", "-ar", "16000", str(out)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=FFMPEG_TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        raise ClipError("no_audio_track", video, f"ffmpeg took over {FFMPEG_TIMEOUT_S} s") from exc
    if done.returncode != 0 or not out.exists() or out.stat().st_size == 0:
        raise ClipError("no_audio_track", video, f"ffmpeg found no decodable audio ({done.stderr.strip()[-200:]})")
    return out
