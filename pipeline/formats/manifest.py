"""The manifest: one row per utterance, the single source of truth for what exists.

Every later stage (extraction, splits, training) joins on `utterance_id`. Imported
benchmark features (no raw media) produce the same manifest with null paths.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.core.atomic import atomic_path

from pipeline.core.modalities import VOCABULARY

MODALITIES: tuple[str, ...] = tuple(m.manifest for m in VOCABULARY)  # ("audio", "text", "video")
PATH_COLUMNS: dict[str, str] = {m: f"{m}_path" for m in MODALITIES}

MANIFEST_SCHEMA = pa.schema(
    [
        ("utterance_id", pa.string()),
        ("session", pa.string()),
        ("speaker", pa.string()),
        ("label", pa.string()),  # class name; null for regression datasets
        ("score", pa.float64()),  # regression target (e.g. sentiment in [-3, 3]); null for classification
        ("domain", pa.string()),  # "source" or a shifted-domain tag
        ("audio_path", pa.string()),
        ("text_path", pa.string()),
        ("video_path", pa.string()),
        # why a modality is missing before any extraction (absent file, no path given); null if present
        ("audio_missing", pa.string()),
        ("text_missing", pa.string()),
        ("video_missing", pa.string()),
    ]
)
META_KEY = b"imer"


def manifest_meta(task: str, classes: list[str] | None, source: str, extra: dict[str, Any] | None = None) -> dict:
    """Dataset-level facts that travel with the manifest (task type, class order, origin)."""
    if task not in ("classification", "regression"):
        raise ValueError(f"task must be 'classification' or 'regression', got {task!r}")
    meta = {"task": task, "classes": classes or [], "source": source}
    meta.update(extra or {})
    return meta


def write_manifest(table: pa.Table, path: str | Path, meta: dict) -> None:
    """Write the manifest atomically with its dataset metadata in the Parquet schema."""
    missing = [f.name for f in MANIFEST_SCHEMA if f.name not in table.column_names]
    if missing:
        raise ValueError(f"{path}: manifest lacks columns {missing}")
    ids = table.column("utterance_id").to_pylist()
    if len(set(ids)) != len(ids):
        raise ValueError(f"{path}: duplicate utterance_id values")
    extra_cols = [c for c in table.column_names if c not in MANIFEST_SCHEMA.names]
    ordered = table.select(MANIFEST_SCHEMA.names + extra_cols)
    ordered = ordered.cast(pa.schema(list(MANIFEST_SCHEMA) + [ordered.schema.field(c) for c in extra_cols]))
    ordered = ordered.replace_schema_metadata({META_KEY: json.dumps(meta).encode()})
    with atomic_path(path) as tmp:
        pq.write_table(ordered, tmp)


def read_manifest(path: str | Path) -> tuple[pa.Table, dict]:
    """Return the manifest table and its dataset metadata."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: manifest not found (run the ingest or import stage first)")
    table = pq.read_table(path)
    raw = (table.schema.metadata or {}).get(META_KEY)
    if raw is None:
        raise ValueError(f"{path}: not an imer manifest (no '{META_KEY.decode()}' metadata)")
    return table, json.loads(raw)
