"""MMSA layout (`aligned_50.pkl` / `unaligned_50.pkl` for CMU-MOSI/MOSEI).

One pickle: {"train"|"valid"|"test": {"text": (N, T_t, d_t), "audio": (N, T_a, d_a),
"vision": (N, T_v, d_v), "regression_labels": (N,), "id": (N,) "video$_$clip", ...}}.
The video is the manifest's `dialogue` (and session and speaker: one speaker's
monologue), the clip index its `turn`.
Optional per split: "audio_lengths"/"vision_lengths" (N,), and "text_bert" (N, 3, T_t)
token ids / attention mask / segment ids, whose mask row gives the text lengths.

The format keeps every array in one pickle (~8.5 GB of float32 for MOSEI). With a
`spill_dir`, each large array is written to a `.npy` file there while unpickling
and read back as a read-only memmap, so memory holds about one array at a time
(the largest, MOSEI's train text, ~2.5 GB) and the folder needs free disk about
the pickle's size. Everything below reads the arrays a chunk of rows at a time
and unmaps the pages it has read (`release_pages`), so RSS stays at about the
largest array during unpickling and about one batch after it. Without a
`spill_dir`, the whole file is in memory (peak RSS ~ pickle size).
"""
from __future__ import annotations

import hashlib
import mmap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.importers import missingness as miss
from pipeline.importers.safe_pickle import load_pickle

SPLITS: dict[str, str] = {"train": "train", "valid": "val", "test": "test"}  # MMSA name -> manifest split
ARRAY_KEYS: dict[str, str] = {"audio": "audio", "text": "text", "video": "vision"}
LENGTH_KEYS: dict[str, str] = {"audio": "audio_lengths", "video": "vision_lengths", "text": "text_lengths"}
ID_SEP = "$_$"


@dataclass
class MmsaSplit:
    """One validated split: ids, scores, per-modality arrays and true lengths."""

    name: str  # manifest split name
    ids: list[str]
    scores: np.ndarray  # (N,) float
    arrays: dict[str, np.ndarray]  # modality -> (N, T, d)
    lengths: dict[str, np.ndarray]  # modality -> (N,) int32
    length_source: dict[str, str]  # modality -> "pickle" | "text_bert_mask" | "trailing_zeros"


def read_mmsa(
    path: str | Path, encoding: str = "latin1", aligned: str | bool = "auto", spill_dir: str | Path | None = None,
) -> list[MmsaSplit]:
    """Load and validate an MMSA pickle into train/val/test splits (in that order).

    `aligned` "auto" reads it from the file name (aligned_* vs unaligned_*); aligned
    data must have the same T in every modality. `spill_dir` (see the module doc)
    keeps large arrays on disk; the caller keeps it until the splits are no longer used.
    """
    path = Path(path)
    obj = load_pickle(path, encoding, lean=True, spill_dir=spill_dir)
    if not isinstance(obj, dict) or not all(k in obj for k in SPLITS):
        keys = sorted(map(str, obj)) if isinstance(obj, dict) else type(obj).__name__
        raise ValueError(f"{path}: an MMSA pickle is a dict with keys {list(SPLITS)}; got {keys}")
    is_aligned = path.name.startswith("aligned") if aligned == "auto" else bool(aligned)
    splits = [_split(path, key, obj[key], is_aligned) for key in SPLITS]
    for m in ARRAY_KEYS:
        dims = {s.name: s.arrays[m].shape[2] for s in splits}
        if len(set(dims.values())) > 1:
            raise ValueError(f"{path}: {ARRAY_KEYS[m]} feature width differs between splits: {dims}")
    seen: dict[str, str] = {}
    for s in splits:
        for uid in s.ids:
            if uid in seen:
                raise ValueError(f"{path}: id {uid!r} appears in both {seen[uid]} and {s.name}")
            seen[uid] = s.name
    return splits


def _split(path: Path, key: str, part: Any, aligned: bool) -> MmsaSplit:
    where = f"{path}[{key!r}]"
    if not isinstance(part, dict):
        raise ValueError(f"{where}: expected a dict of arrays, got {type(part).__name__}")
    if "text" not in part and "text_bert" in part:
        raise ValueError(f"{where}: has only 'text_bert' (BERT token ids, not features); the importer needs the 'text' feature array")
    need = ["text", "audio", "vision", "regression_labels", "id"]
    absent = [k for k in need if k not in part]
    if absent:
        raise ValueError(f"{where}: missing keys {absent}; expected {need} (+ optional audio_lengths, vision_lengths, text_bert); found {sorted(part)}")
    ids = [v.decode() if isinstance(v, bytes) else str(v) for v in np.asarray(part["id"]).reshape(-1)]
    n = len(ids)
    scores = np.asarray(part["regression_labels"], dtype=np.float64).reshape(-1)
    if scores.shape[0] != n:
        raise ValueError(f"{where}: regression_labels has {scores.shape[0]} rows, id has {n}")
    bad = np.flatnonzero(~np.isfinite(scores) | (np.abs(scores) > 3.0 + 1e-6))
    if bad.size:
        raise ValueError(f"{where}: regression label of {ids[bad[0]]!r} is {scores[bad[0]]}; expected a value in [-3, 3]")
    arrays, lengths, source = {}, {}, {}
    for m, k in ARRAY_KEYS.items():
        arr = part[k]
        if not isinstance(arr, np.ndarray) or arr.ndim != 3:
            raise ValueError(f"{where}: '{k}' must be an (N, T, d) array, got {getattr(arr, 'shape', type(arr).__name__)}")
        if arr.shape[0] != n:
            raise ValueError(f"{where}: '{k}' has {arr.shape[0]} rows but 'id' has {n}; every modality needs one row per id")
        arrays[m] = arr
        lengths[m], source[m] = _lengths(where, part, m, arr)
    if aligned and len({a.shape[1] for a in arrays.values()}) > 1:
        shapes = {ARRAY_KEYS[m]: list(a.shape) for m, a in arrays.items()}
        raise ValueError(f"{where}: aligned data must have the same T in every modality; got {shapes}")
    return MmsaSplit(SPLITS[key], ids, scores, arrays, lengths, source)


def _lengths(where: str, part: dict, m: str, arr: np.ndarray) -> tuple[np.ndarray, str]:
    n, t = arr.shape[:2]
    key = LENGTH_KEYS[m]
    if key in part:
        raw, source = np.asarray(part[key]).reshape(-1), "pickle"
    elif m == "text" and "text_bert" in part and np.asarray(part["text_bert"]).ndim == 3:
        raw, source = np.asarray(part["text_bert"])[:, 1, :].sum(axis=1), "text_bert_mask"  # (N,) attention-mask sums
    else:
        return _trailing_lengths(arr), "trailing_zeros"
    if raw.shape[0] != n:
        raise ValueError(f"{where}: '{key}' has {raw.shape[0]} rows, '{ARRAY_KEYS[m]}' has {n}")
    if np.any(raw < 0) or np.any(raw > t):
        raise ValueError(f"{where}: '{key}' holds values outside [0, T={t}]")
    return raw.astype(np.int32), source


def _trailing_lengths(arr: np.ndarray, step: int = 256) -> np.ndarray:
    """(N,) lengths off trailing zeros, `step` rows at a time: the (rows, T, d) bool temporary stays small."""
    out = []
    for i in range(0, arr.shape[0], step):
        release_pages(arr)
        out.append(miss.trailing_length(arr[i:i + step]))
    release_pages(arr)
    return np.concatenate(out) if out else np.zeros(0, np.int32)


def release_pages(arr: np.ndarray) -> None:
    """Unmap the pages of a spilled array read so far (they stay in the page cache); no-op in memory.

    Rows are read once, a batch at a time; without this every page read stays mapped
    and RSS climbs to the pickle's size. That is reclaimable page cache, but RSS-based
    monitors count it. Only read-only mappings: MADV_DONTNEED would discard a private copy's edits.
    """
    mapping = getattr(arr, "_mmap", None)  # numpy.memmap's mmap.mmap, shared by its views
    if mapping is not None and getattr(arr, "mode", None) == "r" and hasattr(mmap, "MADV_DONTNEED"):
        mapping.madvise(mmap.MADV_DONTNEED)


def split_session(uid: str) -> str:
    """The video of an MMSA id ("video$_$clip" -> "video"): one speaker's monologue."""
    return uid.split(ID_SEP, 1)[0]


def dialogue_turns(uids: list[str]) -> tuple[list[str], list[int]]:
    """Per id its dialogue (the video) and turn (the clip index of "video$_$clip").

    A video whose clip parts are not all whole numbers >= 0 numbers its clips in the
    order they appear in the pickle instead (the turn order is then the file's order).
    """
    videos = [split_session(u) for u in uids]
    clips = [u.split(ID_SEP, 1)[1] if ID_SEP in u else "" for u in uids]
    numeric: dict[str, bool] = {}
    for video, clip in zip(videos, clips):
        numeric[video] = numeric.get(video, True) and clip.isascii() and clip.isdigit()
    seen: dict[str, int] = {}
    turns = []
    for video, clip in zip(videos, clips):
        turns.append(int(clip) if numeric[video] else seen.get(video, 0))
        seen[video] = seen.get(video, 0) + 1
    return videos, turns


def row_items(split: MmsaSplit, m: str, start: int, stop: int) -> tuple[list[tuple[np.ndarray | None, str | None]], list[str]]:
    """Per-row (valid steps, reason) for rows [start, stop) and a hash of each row's bytes."""
    arr, lengths = split.arrays[m], split.lengths[m]
    release_pages(arr)  # the previous batch has been packed by now
    # Lengths read off trailing zeros: an all-zero row is absent content, not an empty sequence.
    empty = miss.ALL_ZERO if split.length_source[m] == "trailing_zeros" else miss.ZERO_LENGTH
    items, hashes = [], []
    for i in range(start, stop):
        steps = arr[i, : lengths[i]]  # (len_i, d) view
        items.append((steps, None) if lengths[i] > 0 else (None, empty))
        hashes.append(hashlib.blake2b(np.ascontiguousarray(arr[i]).tobytes(), digest_size=8).hexdigest())
    return items, hashes
