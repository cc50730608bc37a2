"""Small on-disk datasets in the published GCNet and MMSA layouts, written by the tests.

Ids, key structure and shapes follow the real files (IEMOCAP "Ses01F_impro01_F000",
MOSI "03bSnISJMiM_1", MMSA "video$_$clip"); the features are small random arrays.
Each writer returns what a correct import must reproduce.
"""
from __future__ import annotations

import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

IEMOCAP_DIMS = {"audio": 8, "text": 6, "video": 5}


@dataclass
class Expected:
    """Ground truth of a fixture: per utterance its facts and per-modality steps (None = missing)."""

    root: Path
    label_path: Path | None = None
    feature_dirs: dict[str, Path] = field(default_factory=dict)
    pickle_path: Path | None = None
    uids: list[str] = field(default_factory=list)
    session: dict[str, str] = field(default_factory=dict)
    speaker: dict[str, str] = field(default_factory=dict)
    label: dict[str, str | None] = field(default_factory=dict)
    score: dict[str, float | None] = field(default_factory=dict)
    split: dict[str, str | None] = field(default_factory=dict)
    dialogue: dict[str, str] = field(default_factory=dict)  # the dialogue (video) id
    turn: dict[str, int] = field(default_factory=dict)  # position in the dialogue (MMSA: the clip index)
    steps: dict[str, dict[str, np.ndarray | None]] = field(default_factory=dict)  # modality -> uid -> (T, d)
    reason: dict[str, dict[str, str | None]] = field(default_factory=dict)  # modality -> uid -> reason


def write_gcnet_iemocap(root: str | Path, seed: int = 0, sessions: int = 3, dialogues: int = 2, classes: int = 4) -> Expected:
    """IEMOCAP-like GCNet layout: 6-item label pickle, [d] and [T, d] .npy, one per-face folder,
    one absent .npy (audio), one all-zero array (video), one [0, d] text array."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    exp = Expected(root=root, label_path=root / "IEMOCAP_features_raw_4way.pkl")
    exp.feature_dirs = {m: root / "features" / name for m, name in (("audio", "wav2vec-UTT"), ("text", "deberta-UTT"), ("video", "manet-UTT"))}
    for d in exp.feature_dirs.values():
        d.mkdir(parents=True, exist_ok=True)
    exp.steps = {m: {} for m in IEMOCAP_DIMS}
    exp.reason = {m: {} for m in IEMOCAP_DIMS}
    names = ["happy", "sad", "neutral", "angry", "excited", "frustrated"][:classes]  # the pickles' integer order
    video_ids: dict[str, list[str]] = {}
    video_labels: dict[str, list[int]] = {}
    video_speakers: dict[str, list[str]] = {}
    video_sentences: dict[str, list[str]] = {}
    train, test = set(), set()
    for s in range(1, sessions + 1):
        for k in range(dialogues):
            kind = "impro" if k % 2 == 0 else "script"
            vid = f"Ses{s:02d}{'FM'[k % 2]}_{kind}{k + 1:02d}"
            (test if s == sessions else train).add(vid)
            n_utt = int(rng.integers(3, 6))
            tags = ["FM"[(j + k) % 2] for j in range(n_utt)]
            uids = [f"{vid}_{tag}{j:03d}" for j, tag in enumerate(tags)]
            ys = [int(rng.integers(0, classes)) for _ in uids]
            video_ids[vid], video_labels[vid], video_speakers[vid] = uids, ys, tags
            video_sentences[vid] = [f"sentence {j}" for j in range(n_utt)]
            for j, (uid, y, tag) in enumerate(zip(uids, ys, tags)):
                exp.uids.append(uid)
                exp.dialogue[uid], exp.turn[uid] = vid, j
                exp.session[uid] = f"Ses{s:02d}"
                exp.speaker[uid] = f"Ses{s:02d}_{tag}"
                exp.label[uid] = names[y]
                exp.score[uid] = None
                exp.split[uid] = "test" if s == sessions else "train"
    for i, uid in enumerate(exp.uids):
        for m, d in IEMOCAP_DIMS.items():
            shape = (d,) if (i + len(m)) % 2 == 0 else (int(rng.integers(2, 5)), d)  # mix of [d] and [T, d]
            arr = rng.normal(size=shape).astype(np.float32)
            np.save(exp.feature_dirs[m] / f"{uid}.npy", arr)
            exp.steps[m][uid] = arr.reshape(-1, d)
            exp.reason[m][uid] = None
    # The visual per-face folder: three face frames of [d], averaged by default.
    face_uid = exp.uids[1]
    os.remove(exp.feature_dirs["video"] / f"{face_uid}.npy")
    faces = rng.normal(size=(3, IEMOCAP_DIMS["video"])).astype(np.float32)
    (exp.feature_dirs["video"] / face_uid).mkdir()
    for j, face in enumerate(faces):
        np.save(exp.feature_dirs["video"] / face_uid / f"frame_{j:03d}_F.npy", face)
    exp.steps["video"][face_uid] = faces.mean(axis=0, keepdims=True)
    # Natural missingness: an absent file, an all-zero array, a zero-length sequence.
    gone, zero, empty = exp.uids[2], exp.uids[3], exp.uids[4]
    os.remove(exp.feature_dirs["audio"] / f"{gone}.npy")
    exp.steps["audio"][gone], exp.reason["audio"][gone] = None, "file_absent"
    np.save(exp.feature_dirs["video"] / f"{zero}.npy", np.zeros((4, IEMOCAP_DIMS["video"]), np.float32))
    exp.steps["video"][zero], exp.reason["video"][zero] = None, "all_zero_features"
    np.save(exp.feature_dirs["text"] / f"{empty}.npy", np.zeros((0, IEMOCAP_DIMS["text"]), np.float32))
    exp.steps["text"][empty], exp.reason["text"][empty] = None, "zero_length"
    payload = [video_ids, video_labels, video_speakers, video_sentences, train, test]
    exp.label_path.write_bytes(pickle.dumps(payload, protocol=2))
    return exp


def write_gcnet_mosi(root: str | Path, seed: int = 1, videos: int = 9, dims: dict[str, int] | None = None) -> Expected:
    """MOSI-like GCNet layout: 7-item label pickle (train/val/test video lists), scores in [-3, 3]."""
    rng = np.random.default_rng(seed)
    dims = dims or {"audio": 7, "text": 9, "video": 4}
    root = Path(root)
    exp = Expected(root=root, label_path=root / "CMUMOSI_features_raw_2way.pkl")
    exp.feature_dirs = {m: root / "features" / f"{m}-UTT" for m in dims}
    for d in exp.feature_dirs.values():
        d.mkdir(parents=True, exist_ok=True)
    exp.steps = {m: {} for m in dims}
    exp.reason = {m: {} for m in dims}
    letters = "abcdefghijklmnopqrstuvwxyz0123456789ABCDEFGHIJ"
    video_ids, video_labels, video_speakers, video_sentences = {}, {}, {}, {}
    splits: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    for v in range(videos):
        vid = "".join(rng.choice(list(letters), size=11))
        split = ("train", "train", "train", "val", "test")[v % 5] if v >= 3 else ("train", "val", "test")[v]
        splits[split].append(vid)
        n_utt = int(rng.integers(2, 5))
        uids = [f"{vid}_{j + 1}" for j in range(n_utt)]
        scores = [float(np.round(rng.uniform(-3, 3), 4)) for _ in uids]
        video_ids[vid], video_labels[vid] = uids, scores
        video_speakers[vid] = ["M"] * n_utt
        video_sentences[vid] = ["it was fine"] * n_utt
        for j, (uid, y) in enumerate(zip(uids, scores)):
            exp.dialogue[uid], exp.turn[uid] = vid, j
            exp.session[uid] = vid
            exp.speaker[uid] = vid
            exp.label[uid] = None
            exp.score[uid] = y
            exp.split[uid] = split
    for vid in sorted(video_ids):
        exp.uids.extend(video_ids[vid])
    for uid in exp.uids:
        for m, d in dims.items():
            arr = rng.normal(size=(d,)).astype(np.float64)  # utterance-level, float64 as some extractors save
            np.save(exp.feature_dirs[m] / f"{uid}.npy", arr)
            exp.steps[m][uid] = arr.reshape(1, d)
            exp.reason[m][uid] = None
    payload = [video_ids, video_labels, video_speakers, video_sentences, splits["train"], splits["val"], splits["test"]]
    exp.label_path.write_bytes(pickle.dumps(payload, protocol=4))
    return exp


def write_mmsa(
    path: str | Path, seed: int = 2, sizes: tuple[int, int, int] = (12, 5, 6), with_lengths: bool = True,
    shapes: dict[str, tuple[int, int]] | None = None, with_text_bert: bool = False,
) -> Expected:
    """An MMSA `unaligned_50.pkl`-like pickle; rows zero-padded past their true length.

    One vision row is all zeros (missing) and, with lengths, one audio row has length 0.
    """
    rng = np.random.default_rng(seed)
    shapes = shapes or {"text": (6, 10), "audio": (9, 5), "vision": (7, 4)}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    exp = Expected(root=path.parent, pickle_path=path)
    modality = {"audio": "audio", "text": "text", "vision": "video"}
    exp.steps = {m: {} for m in modality.values()}
    exp.reason = {m: {} for m in modality.values()}
    data = {}
    for key, n in zip(("train", "valid", "test"), sizes):
        part: dict[str, np.ndarray] = {}
        ids = [f"{key[:2]}Vid{i // 3:02d}x$_${i % 3 + 1}" for i in range(n)]
        part["id"] = np.array(ids)
        scores = np.round(rng.uniform(-3, 3, size=n), 3).astype(np.float32)
        part["regression_labels"] = scores
        part["raw_text"] = np.array(["some words"] * n)
        for arr_key, (t, d) in shapes.items():
            lengths = rng.integers(1, t + 1, size=n)
            arr = rng.normal(size=(n, t, d)).astype(np.float32)
            arr[np.arange(t)[None, :] >= lengths[:, None]] = 0.0  # zero padding past length
            arr[:, 0, 0] = np.where(arr[:, 0, 0] == 0, 1.0, arr[:, 0, 0])
            if arr_key == "vision":
                arr[1] = 0.0
            if arr_key == "audio" and with_lengths:
                lengths[2] = 0
                arr[2] = 0.0
            part[arr_key] = arr
            if with_lengths and arr_key != "text":
                part[f"{arr_key}_lengths"] = lengths.astype(np.int64)
            if arr_key == "text" and with_text_bert:
                bert = np.zeros((n, 3, t), np.int64)
                bert[:, 1, :] = np.arange(t)[None, :] < lengths[:, None]
                part["text_bert"] = bert
            m = modality[arr_key]
            for i, uid in enumerate(ids):
                if arr_key == "vision" and i == 1:
                    exp.steps[m][uid], exp.reason[m][uid] = None, "all_zero_features"
                elif arr_key == "audio" and with_lengths and i == 2:
                    exp.steps[m][uid], exp.reason[m][uid] = None, "zero_length"
                else:
                    exp.steps[m][uid], exp.reason[m][uid] = arr[i, : lengths[i]].copy(), None
        for i, uid in enumerate(ids):
            exp.uids.append(uid)
            exp.session[uid] = uid.split("$_$")[0]
            exp.speaker[uid] = uid.split("$_$")[0]
            exp.dialogue[uid], exp.turn[uid] = uid.split("$_$")[0], i % 3 + 1
            exp.label[uid] = None
            exp.score[uid] = float(scores[i])
            exp.split[uid] = {"train": "train", "valid": "val", "test": "test"}[key]
        data[key] = part
    path.write_bytes(pickle.dumps(data, protocol=4))
    return exp


class _Payload:
    """Pickles into a call of `os.system` that creates a marker file (never actually run)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


def write_malicious(path: str | Path, marker: str | Path) -> Path:
    """A label-pickle-looking list whose second item runs a shell command on plain pickle.load."""
    path = Path(path)
    path.write_bytes(pickle.dumps([{"Ses01F_impro01": ["x"]}, _Payload(Path(marker))], protocol=2))
    return path


def write_py2_style(path: str | Path, obj: object) -> Path:
    """Pickle `obj` the way Python 2 wrote `str`: as byte strings (BINSTRING), which need
    `encoding='latin1'` to load when they hold non-ASCII bytes."""
    import io

    class Py2Pickler(pickle._Pickler):  # the pure-Python pickler lets us swap how str is written
        dispatch = dict(pickle._Pickler.dispatch)

        def save_py2_str(self, obj: str) -> None:
            raw = obj.encode("latin1")
            if len(raw) < 256:
                self.write(pickle.SHORT_BINSTRING + bytes([len(raw)]) + raw)
            else:
                self.write(pickle.BINSTRING + len(raw).to_bytes(4, "little") + raw)
            self.memoize(obj)

        dispatch[str] = save_py2_str

    buf = io.BytesIO()
    Py2Pickler(buf, protocol=2).dump(obj)
    Path(path).write_bytes(buf.getvalue())
    return Path(path)
