"""The split store: what the `splits` stage writes under data/splits/ and how everyone else reads it.

- `assignment.parquet`: utterance_id -> split;
- `random_masks.parquet`: stored random-missing masks per split and missing rate (never re-drawn);
- natural presence: a row is present in a modality when its feature table has it AND ingest did
  not mark it missing (computed from the manifest and the feature tables).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.core.hashing import file_digest
from pipeline.core.modalities import MANIFEST_NAME, MODALITY_ORDER, TABLE_NAME
from pipeline.formats.feature_table import read_feature_table

SPLITS = ("train", "val", "test")  # the source domain's splits
SHIFTED_SPLITS = ("shifted_adapt", "shifted_test")  # a shifted domain: unlabelled pool, and its test set
SOURCE_DOMAIN = "source"


def natural_presence(manifest: pa.Table, features_dir: str | Path) -> tuple[np.ndarray, dict[str, dict]]:
    """(N, 3) bool presence in manifest order: row present in the feature table AND not missing at ingest."""
    features_dir = Path(features_dir)
    ids = manifest.column("utterance_id").to_pylist()
    natural = np.zeros((len(ids), 3), dtype=bool)
    info: dict[str, dict] = {}
    for j, m in enumerate(MODALITY_ORDER):
        path = features_dir / f"{TABLE_NAME[m]}.arrow"
        table = read_feature_table(path, memory_map=True)
        index = table.index()
        rows = np.array([index.get(u, -1) for u in ids], dtype=np.int64)
        found = rows >= 0
        natural[found, j] = table.present[rows[found]]
        missing_col = f"{MANIFEST_NAME[m]}_missing"
        if missing_col in manifest.column_names:
            natural[:, j] &= np.asarray(manifest.column(missing_col).is_null())
        info[m] = {"path": str(path), "file_sha256": file_digest(path), "config_hash": table.meta.get("config_hash"),
                   "rows_not_in_table": int((~found).sum())}
    return natural, info


def read_assignment(splits_dir: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(utterance_id (N,), split (N,)) as stored; a missing file is a clear error."""
    path = Path(splits_dir) / "assignment.parquet"
    if not path.exists():
        raise FileNotFoundError(f"{path}: split assignment not found (run the splits stage)")
    tbl = pq.read_table(path, columns=["utterance_id", "split"])
    return (np.asarray(tbl.column("utterance_id").to_pylist(), dtype=object),
            np.asarray(tbl.column("split").to_pylist(), dtype=object).astype(str))


def read_random_masks(splits_dir: str | Path, split: str) -> dict[float, tuple[np.ndarray, np.ndarray]]:
    """Stored masks of one split: {mr: (utterance_id (n,), presence (n, 3) bool)}; never re-drawn."""
    path = Path(splits_dir) / "random_masks.parquet"
    if not path.exists():
        raise FileNotFoundError(f"{path}: random-missing masks not found (run the splits stage)")
    tbl = pq.read_table(path, filters=[("split", "=", split)])
    mr = tbl.column("mr").to_numpy()
    ids = np.asarray(tbl.column("utterance_id").to_pylist(), dtype=object)
    mask = np.stack([tbl.column(m).to_numpy(zero_copy_only=False) for m in MODALITY_ORDER], axis=1).astype(bool)
    return {float(r): (ids[mr == r], mask[mr == r]) for r in np.unique(mr)}


def row_domains(manifest: pa.Table) -> np.ndarray:
    """(N,) domain per manifest row; no `domain` column (or a null) means the source domain."""
    if "domain" not in manifest.column_names:
        return np.full(manifest.num_rows, SOURCE_DOMAIN, dtype=object)
    return np.asarray([SOURCE_DOMAIN if d is None else str(d) for d in manifest.column("domain").to_pylist()],
                      dtype=object)


def check_domain_separation(domain: np.ndarray, split: np.ndarray) -> None:
    """Raise if a shifted-domain row sits in train/val/test, or a source row in a `shifted_*` split.

    The data-leak guard for training: `MultimodalData.load` (or the trainer) calls it with the
    manifest's domains and the stored assignment, so no shifted row can ever be fitted on.
    """
    domain = np.asarray(domain, dtype=object)
    split = np.asarray(split, dtype=object)
    shifted = domain != SOURCE_DOMAIN
    leaked = shifted & np.isin(split, SPLITS)
    if leaked.any():
        raise ValueError(f"{int(leaked.sum())} shifted-domain rows are assigned to train/val/test "
                         f"(first at row {int(np.flatnonzero(leaked)[0])}); re-run the splits stage")
    stray = ~shifted & np.isin(split, SHIFTED_SPLITS)
    if stray.any():
        raise ValueError(f"{int(stray.sum())} source-domain rows are assigned to a shifted split; re-run the splits stage")
