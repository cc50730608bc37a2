"""Tiny synthetic manifest + feature tables, for tests of splits, training and evaluation.

Why synthetic: the stages after extraction only see a manifest and three feature
tables, so a few hundred random rows in the real formats exercise them in seconds.
Each modality carries its own class signal (a per-class prototype direction with a
per-modality strength) so single modalities are imperfect and fusion helps, and a
share of rows is naturally missing (present=False), never all three for one row.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from pipeline.combinations import MODALITY_ORDER, TABLE_NAME
from pipeline.feature_table import FeatureTable, build_meta, write_feature_table
from pipeline.manifest import manifest_meta, write_manifest

DEFAULT_DIMS = {"a": 12, "t": 16, "v": 10}
DEFAULT_SEQ = {"a": 8, "t": 8, "v": 8}
# Per-modality signal strength: text strongest, visual weakest (like the default corpus).
DEFAULT_SIGNAL = {"a": 0.8, "t": 1.0, "v": 0.6}


def make_feature_dataset(
    directory: str | Path,
    n: int = 240,
    n_classes: int = 4,
    sessions: int = 5,
    speakers_per_session: int = 2,
    seq_len: int | dict[str, int] | None = None,
    dims: dict[str, int] | None = None,
    missing_share: float = 0.1,
    task: str = "classification",
    seed: int = 0,
    signal: dict[str, float] | None = None,
    split_column: bool = False,
) -> tuple[Path, Path]:
    """Write `manifest.parquet` and `features/{acoustic,textual,visual}.arrow` under `directory`.

    `missing_share`: per-modality share of rows with present=False (a row keeps at
    least one modality). `split_column` adds a manifest `split` column
    (train/val/test by session: last session test, second to last val), as
    importers of benchmark splits do. Returns (manifest_path, features_dir).
    """
    directory = Path(directory)
    rng = np.random.default_rng(seed)
    dims = dict(DEFAULT_DIMS if dims is None else dims)
    if seq_len is None:
        seqs = dict(DEFAULT_SEQ)
    elif isinstance(seq_len, int):
        seqs = {m: seq_len for m in MODALITY_ORDER}
    else:
        seqs = dict(seq_len)
    strength = dict(DEFAULT_SIGNAL if signal is None else signal)

    ids = [f"u{i:05d}" for i in range(n)]
    session_idx = np.arange(n) % sessions  # (N,) balanced sessions
    speaker_idx = rng.integers(0, speakers_per_session, size=n)
    session = [f"Ses{s + 1:02d}" for s in session_idx]
    speaker = [f"Ses{s + 1:02d}_spk{k}" for s, k in zip(session_idx, speaker_idx)]
    if task == "classification":
        classes = [f"class{k}" for k in range(n_classes)]
        y = rng.integers(0, n_classes, size=n)
        labels: list[str | None] = [classes[k] for k in y]
        scores: list[float | None] = [None] * n
        latent = np.eye(n_classes)[y]  # (N, K) one-hot signal source
    elif task == "regression":
        classes = []
        score = np.clip(rng.normal(0.0, 1.5, size=n), -3.0, 3.0)
        labels = [None] * n
        scores = [float(s) for s in score]
        latent = score[:, None] / 1.5  # (N, 1)
    else:
        raise ValueError(f"task must be classification or regression, got {task!r}")

    present = rng.random((n, 3)) >= missing_share  # (N, 3)
    empty = ~present.any(axis=1)
    present[empty, rng.integers(0, 3, size=int(empty.sum()))] = True

    features_dir = directory / "features"
    for j, m in enumerate(MODALITY_ORDER):
        t, d = seqs[m], dims[m]
        proto = rng.normal(0.0, 1.0, size=(latent.shape[1], d))  # (K, d) class directions
        lengths = rng.integers(max(1, t // 2), t + 1, size=n).astype(np.int32)
        seq = rng.normal(0.0, 1.0, size=(n, t, d)).astype(np.float32)  # (N, T, d) noise
        seq += (strength[m] * latent @ proto)[:, None, :].astype(np.float32)
        steps = np.arange(t)[None, :] < lengths[:, None]  # (N, T) valid steps
        seq *= steps[:, :, None]
        lengths[~present[:, j]] = 0
        seq[~present[:, j]] = 0.0
        summary = seq.sum(axis=1) / np.maximum(lengths, 1)[:, None]  # (N, d) mean over valid steps
        table = FeatureTable(
            modality=TABLE_NAME[m],
            utterance_id=np.asarray(ids, dtype=object),
            present=present[:, j].copy(),
            failure_reason=[None if p else "synthetic_missing" for p in present[:, j]],
            length=lengths,
            sequence=seq,
            summary=summary.astype(np.float32),
            content_hash=[None] * n,
            meta=build_meta(
                TABLE_NAME[m], t, d, d, [f"f{k}" for k in range(d)], [f"s{k}" for k in range(d)],
                {"name": "synthetic", "seed": seed}, f"synthetic-{m}-{seed}",
            ),
        )
        write_feature_table(features_dir / f"{TABLE_NAME[m]}.arrow", table)

    columns = {
        "utterance_id": pa.array(ids, pa.string()),
        "session": pa.array(session, pa.string()),
        "speaker": pa.array(speaker, pa.string()),
        "label": pa.array(labels, pa.string()),
        "score": pa.array(scores, pa.float64()),
        "domain": pa.array(["source"] * n, pa.string()),
    }
    for name in ("audio_path", "text_path", "video_path", "audio_missing", "text_missing", "video_missing"):
        columns[name] = pa.array([None] * n, pa.string())
    if split_column:
        last, second = sessions - 1, sessions - 2
        split = np.where(session_idx == last, "test", np.where(session_idx == second, "val", "train"))
        columns["split"] = pa.array(split.tolist(), pa.string())
    manifest_path = directory / "manifest.parquet"
    write_manifest(pa.table(columns), manifest_path, manifest_meta(task, classes, "synthetic", {"seed": seed}))
    return manifest_path, features_dir
