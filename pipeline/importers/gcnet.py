"""GCNet / MoMKE layout: a label pickle plus one feature folder per modality.

Label pickle: a list
    [videoIDs, videoLabels, videoSpeakers, videoSentences, trainVids, testVids]            (IEMOCAP)
    [videoIDs, videoLabels, videoSpeakers, videoSentences, trainVids, valVids, testVids]   (CMU-MOSI/MOSEI)
where the first four map a dialogue (video) id to per-utterance lists, in order: the
dialogue id and the position in its list become the manifest's `dialogue` and `turn`.
Features: `<folder>/<utterance_id>.npy` of shape [T, d] or [d]; visual may instead be
a folder `<folder>/<utterance_id>/` of per-face `.npy` files (one per detected face
frame), reduced by `face_reduce`: "mean" averages the faces into one step (what the
GCNet loaders do), "stack" keeps them as a sequence in file-name order.
"""
from __future__ import annotations

import hashlib
import io
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from pipeline.importers import missingness as miss
from pipeline.importers.safe_pickle import load_pickle

LABEL_ITEMS = "[videoIDs, videoLabels, videoSpeakers, videoSentences, trainVids, (valVids,) testVids]"
IEMOCAP_SESSION = re.compile(r"^(Ses\d{2})")


@dataclass(frozen=True)
class Utterance:
    """One labelled utterance of the label pickle, in manifest terms."""

    utterance_id: str
    dialogue_id: str
    turn: int  # position in its dialogue's list (spoken order)
    session: str
    speaker: str
    speaker_tag: str
    label: str | None
    score: float | None
    split: str | None


def read_labels(path: str | Path, dataset: str, classes: list[str] | None, encoding: str = "latin1") -> list[Utterance]:
    """Parse and validate a GCNet label pickle; utterances in sorted-dialogue, spoken order.

    `classes` maps integer labels to names (classification); None means regression
    scores, which must lie in [-3, 3].
    """
    path = Path(path)
    obj = load_pickle(path, encoding)
    if not isinstance(obj, (list, tuple)) or len(obj) not in (6, 7):
        got = f"{type(obj).__name__} of length {len(obj)}" if hasattr(obj, "__len__") else type(obj).__name__
        raise ValueError(f"{path}: a GCNet label pickle is a list of 6 (IEMOCAP) or 7 (CMU-MOSI/MOSEI) items {LABEL_ITEMS}; got {got}")
    ids, labels, speakers = obj[0], obj[1], obj[2]
    for name, value in (("videoIDs", ids), ("videoLabels", labels), ("videoSpeakers", speakers), ("videoSentences", obj[3])):
        if not isinstance(value, dict):
            raise ValueError(f"{path}: item {name} must be a dict from dialogue id to per-utterance list, got {type(value).__name__}")
    split_sets = {"train": obj[4], "test": obj[-1]}
    if len(obj) == 7:
        split_sets["val"] = obj[5]
    split_of: dict[str, str] = {}
    for split, members in split_sets.items():
        for vid in members:
            vid = _text(vid)
            if vid not in ids:
                raise ValueError(f"{path}: {split} split names dialogue {vid!r}, which videoIDs lacks")
            if vid in split_of:
                raise ValueError(f"{path}: dialogue {vid!r} is in both {split_of[vid]} and {split} splits")
            split_of[vid] = split
    out: list[Utterance] = []
    for vid in sorted(ids, key=_text):
        key = vid
        vid = _text(vid)
        uids, ys = list(ids[key]), list(labels.get(key, []))
        spks = list(speakers.get(key, []))
        if not (len(uids) == len(ys) == len(spks)):
            raise ValueError(
                f"{path}: dialogue {vid!r} has {len(uids)} ids, {len(ys)} labels and {len(spks)} speakers; they must match"
            )
        session = _session(vid, dataset, path)
        for turn, (uid, y, spk) in enumerate(zip(uids, ys, spks)):
            tag = _text(spk)
            label, score = _target(y, classes, path, _text(uid))
            speaker = f"{session}_{tag}" if dataset.startswith("iemocap") else vid
            out.append(Utterance(_text(uid), vid, turn, session, speaker, tag, label, score, split_of.get(vid)))
    seen: set[str] = set()
    for u in out:
        if u.utterance_id in seen:
            raise ValueError(f"{path}: utterance id {u.utterance_id!r} appears twice")
        seen.add(u.utterance_id)
    return out


def _text(value: object) -> str:
    return value.decode("latin1") if isinstance(value, bytes) else str(value)


def _session(vid: str, dataset: str, path: Path) -> str:
    # IEMOCAP dialogue ids start with the session ("Ses01F_impro01" -> "Ses01"); in
    # MOSI/MOSEI a video is one speaker's monologue, so the video is the session.
    if not dataset.startswith("iemocap"):
        return vid
    match = IEMOCAP_SESSION.match(vid)
    if match is None:
        raise ValueError(f"{path}: cannot read the IEMOCAP session from dialogue id {vid!r} (expected 'Ses01F_impro01' style)")
    return match.group(1)


def _target(y: object, classes: list[str] | None, path: Path, uid: str) -> tuple[str | None, float | None]:
    value = np.asarray(y).reshape(-1)
    if value.size != 1:
        raise ValueError(f"{path}: label of {uid!r} must be one number, got shape {np.asarray(y).shape}")
    if classes:
        k = int(value[0])
        if k != value[0] or not 0 <= k < len(classes):
            raise ValueError(f"{path}: label of {uid!r} is {value[0]!r}; expected an integer class index in [0, {len(classes)})")
        return classes[k], None
    score = float(value[0])
    if not -3.0 - 1e-6 <= score <= 3.0 + 1e-6:
        raise ValueError(f"{path}: sentiment score of {uid!r} is {score}; expected a value in [-3, 3]")
    return None, score


# ---------------------------------------------------------------- features


@dataclass
class Located:
    """Where an utterance's feature lives and its (T, d) after reduction; reason when unusable."""

    paths: list[Path]
    shape: tuple[int, int] | None
    reason: str | None


def locate(root: Path, uid: str, face_reduce: str) -> Located:
    """Find `<root>/<uid>.npy` or the per-face folder `<root>/<uid>/`, reading only array headers."""
    single = root / f"{uid}.npy"
    folder = root / uid
    if single.is_file():
        paths = [single]
    elif folder.is_dir():
        paths = sorted(folder.glob("*.npy"))
        if not paths:
            return Located([], None, miss.ZERO_LENGTH)
    else:
        return Located([], None, miss.FILE_ABSENT)
    shapes = []
    for p in paths:
        raw = _header_shape(p)
        if raw is None:
            return Located(paths, None, miss.UNREADABLE)
        shapes.append(_as_steps_shape(raw, p))
    dims = {d for _, d in shapes}
    if len(dims) > 1:
        raise ValueError(f"{root / uid}: per-face features have different dimensions {sorted(dims)}")
    if len(shapes) == 1:
        return Located(paths, shapes[0], None)
    if face_reduce == "stack":
        return Located(paths, (sum(t for t, _ in shapes), shapes[0][1]), None)
    if len({t for t, _ in shapes}) > 1:
        raise ValueError(f"{root / uid}: faces have different lengths {[t for t, _ in shapes]}; cannot average them (set import.face_reduce: stack)")
    return Located(paths, shapes[0], None)


def load_steps(located: Located, face_reduce: str) -> tuple[np.ndarray | None, str | None, str | None]:
    """(steps (T, d) float, reason, content hash) for one located utterance; arrays via allow_pickle=False."""
    if located.reason is not None:
        return None, located.reason, None
    digest = hashlib.blake2b(digest_size=8)
    arrays = []
    for p in located.paths:
        blob = p.read_bytes()
        digest.update(p.name.encode())
        digest.update(blob)
        try:
            arr = np.load(io.BytesIO(blob), allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            del exc
            return None, miss.UNREADABLE, digest.hexdigest()
        arrays.append(arr.reshape(_as_steps_shape(arr.shape, p)))  # (T_f, d)
    if len(arrays) == 1:
        steps = arrays[0]
    elif face_reduce == "stack":
        steps = np.concatenate(arrays, axis=0)  # (sum T_f, d) faces as time steps
    else:
        steps = np.mean(np.stack(arrays), axis=0)  # (T, d) average face
    return steps, None, digest.hexdigest()


def _header_shape(path: Path) -> tuple[int, ...] | None:
    # Only the header: pass one sizes the table without reading feature bytes.
    try:
        with path.open("rb") as handle:
            version = np.lib.format.read_magic(handle)
            if version == (1, 0):
                shape, _, dtype = np.lib.format.read_array_header_1_0(handle)
            else:
                shape, _, dtype = np.lib.format.read_array_header_2_0(handle)
    except (ValueError, OSError, EOFError):
        return None
    if dtype.hasobject:
        return None
    return tuple(int(s) for s in shape)


def _as_steps_shape(shape: tuple[int, ...], path: Path) -> tuple[int, int]:
    # [d] -> one step; [T, d] as is; [1, T, d] (a batch axis some extractors keep) -> [T, d].
    if len(shape) == 1:
        return 1, shape[0]
    if len(shape) == 2:
        return shape[0], shape[1]
    if len(shape) == 3 and shape[0] == 1:
        return shape[1], shape[2]
    raise ValueError(f"{path}: feature array must be [d], [T, d] or [1, T, d]; got shape {list(shape)}")


def scan_modality(root: str | Path, uids: list[str], face_reduce: str) -> tuple[list[Located], int, int]:
    """Locate every utterance's feature; return them, the common d and the longest T.

    Raises if the folder is missing, matches no utterance at all (wrong folder), or
    holds arrays of different widths d (a mixed folder).
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: feature folder not found")
    found = [locate(root, uid, face_reduce) for uid in uids]
    shaped = [(uid, f) for uid, f in zip(uids, found) if f.shape is not None]
    if not shaped:
        raise ValueError(f"{root}: no usable feature for any of {len(uids)} utterance ids (expected files like {root / (uids[0] if uids else 'ID')}.npy)")
    first_uid, first = shaped[0]
    for uid, f in shaped:
        if f.shape[1] != first.shape[1]:
            raise ValueError(
                f"{root}: feature width differs between utterances: {first.paths[0]} has d={first.shape[1]}, {f.paths[0]} has d={f.shape[1]}"
            )
    return found, first.shape[1], max(f.shape[0] for _, f in shaped)


def iter_batches(found: list[Located], face_reduce: str, batch_rows: int) -> Iterator[tuple[list[tuple[np.ndarray | None, str | None]], list[str | None]]]:
    """Yield (items, hashes) batches of loaded steps, `batch_rows` utterances at a time."""
    for start in range(0, len(found), batch_rows):
        items, hashes = [], []
        for located in found[start:start + batch_rows]:
            steps, reason, digest = load_steps(located, face_reduce)
            items.append((steps, reason))
            hashes.append(digest)
        yield items, hashes
