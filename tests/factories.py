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

from pipeline.core.modalities import MODALITY_ORDER, TABLE_NAME
from pipeline.formats.feature_table import FeatureTable, build_meta, write_feature_table
from pipeline.formats.manifest import manifest_meta, write_manifest

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
    shifted: int = 0,
    shifted_sessions: int = 2,
    shift: float = 1.5,
    modalities: tuple[str, ...] = MODALITY_ORDER,
    dialogue_turns: int = 0,
) -> tuple[Path, Path]:
    """Write `manifest.parquet` and `features/{acoustic,textual,visual}.arrow` under `directory`.

    `missing_share`: per-modality share of rows with present=False (a row keeps at
    least one modality). `split_column` adds a manifest `split` column
    (train/val/test by session: last session test, second to last val), as
    importers of benchmark splits do. `shifted` appends that many rows of a shifted
    domain (manifest `domain` "shifted", sessions Shf01.., new speakers): same class
    prototypes, but audio and video carry a per-feature offset of size `shift` and a
    1.5x scale (text unchanged), drawn from their own RNG stream, so the source rows are
    byte-identical to `shifted=0`. `modalities` lists the letters the dataset has (e.g. ("t",) for a
    text-only corpus): the others are absent in every row (their tables hold only missing rows).
    `dialogue_turns` > 0 adds manifest `dialogue`/`turn` columns: each session's rows, in order, form
    dialogues of that many turns (the last one shorter); labels stay independent of the dialogue.
    Returns (manifest_path, features_dir).
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
    all_ids = ids + [f"s{i:05d}" for i in range(shifted)]
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
    keep = np.array([m in modalities for m in MODALITY_ORDER])
    if not keep.all():  # a dataset without some modalities; its own RNG stream leaves the default bytes alone
        present &= keep[None, :]
        lost = ~present.any(axis=1)
        kept = np.flatnonzero(keep)
        present[lost, np.random.default_rng([seed, 5]).choice(kept, size=int(lost.sum()))] = True

    shift_rng = np.random.default_rng([seed, 77])
    if shifted:
        s_session = np.arange(shifted) % shifted_sessions  # (S,)
        s_speaker = shift_rng.integers(0, speakers_per_session, size=shifted)
        s_y = shift_rng.integers(0, latent.shape[1] if task == "classification" else 1, size=shifted)
        s_latent = np.eye(latent.shape[1])[s_y] if task == "classification" else \
            np.clip(shift_rng.normal(0.0, 1.5, size=(shifted, 1)), -3, 3) / 1.5  # (S, K)
        s_present = shift_rng.random((shifted, 3)) >= missing_share  # (S, 3)
        s_present[~s_present.any(axis=1), 0] = True
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
        pres = present[:, j].copy()
        if shifted:
            s_len = shift_rng.integers(max(1, t // 2), t + 1, size=shifted).astype(np.int32)
            s_seq = shift_rng.normal(0.0, 1.0, size=(shifted, t, d)).astype(np.float32)  # (S, T, d)
            s_seq += (strength[m] * s_latent @ proto)[:, None, :].astype(np.float32)
            if m != "t":  # the channel changes audio and video only
                s_seq = 1.5 * s_seq + shift * shift_rng.normal(0.0, 1.0, size=d).astype(np.float32)
            s_seq *= (np.arange(t)[None, :] < s_len[:, None])[:, :, None]
            s_len[~s_present[:, j]] = 0
            s_seq[~s_present[:, j]] = 0.0
            seq, lengths = np.concatenate([seq, s_seq]), np.concatenate([lengths, s_len])
            pres = np.concatenate([pres, s_present[:, j]])
        summary = seq.sum(axis=1) / np.maximum(lengths, 1)[:, None]  # (N, d) mean over valid steps
        table = FeatureTable(
            modality=TABLE_NAME[m],
            utterance_id=np.asarray(all_ids, dtype=object),
            present=pres,
            failure_reason=[None if p else "synthetic_missing" for p in pres],
            length=lengths,
            sequence=seq,
            summary=summary.astype(np.float32),
            content_hash=[None] * len(all_ids),
            meta=build_meta(
                TABLE_NAME[m], t, d, d, [f"f{k}" for k in range(d)], [f"s{k}" for k in range(d)],
                {"name": "synthetic", "seed": seed}, f"synthetic-{m}-{seed}",
            ),
        )
        write_feature_table(features_dir / f"{TABLE_NAME[m]}.arrow", table)

    domain = ["source"] * n
    if shifted:
        session += [f"Shf{s + 1:02d}" for s in s_session]
        speaker += [f"Shf{s + 1:02d}_spk{k}" for s, k in zip(s_session, s_speaker)]
        labels += [classes[k] for k in s_y] if task == "classification" else [None] * shifted
        scores += [None] * shifted if task == "classification" else [float(v) * 1.5 for v in s_latent[:, 0]]
        domain += ["shifted"] * shifted
    columns = {
        "utterance_id": pa.array(all_ids, pa.string()),
        "session": pa.array(session, pa.string()),
        "speaker": pa.array(speaker, pa.string()),
        "label": pa.array(labels, pa.string()),
        "score": pa.array(scores, pa.float64()),
        "domain": pa.array(domain, pa.string()),
    }
    for name in ("audio_path", "text_path", "video_path", "audio_missing", "text_missing", "video_missing"):
        columns[name] = pa.array([None] * len(all_ids), pa.string())
    if dialogue_turns > 0:
        n_all = len(all_ids)
        sess = np.asarray(session, dtype=object)
        dialogue, turn = [], []
        for s_name in dict.fromkeys(sess.tolist()):  # each session's rows in order
            rows = np.flatnonzero(sess == s_name)
            dialogue += [(r, f"{s_name}_d{k // dialogue_turns:03d}") for k, r in enumerate(rows.tolist())]
            turn += [(r, k % dialogue_turns) for k, r in enumerate(rows.tolist())]
        columns["dialogue"] = pa.array([d for _, d in sorted(dialogue)], pa.string())
        columns["turn"] = pa.array([t for _, t in sorted(turn)], pa.int64())
        assert len(columns["turn"]) == n_all
    if split_column:
        last, second = sessions - 1, sessions - 2
        split = np.where(session_idx == last, "test", np.where(session_idx == second, "val", "train"))
        columns["split"] = pa.array(split.tolist() + ["shifted_test"] * shifted, pa.string())
    manifest_path = directory / "manifest.parquet"
    write_manifest(pa.table(columns), manifest_path, manifest_meta(task, classes, "synthetic", {"seed": seed}))
    return manifest_path, features_dir
