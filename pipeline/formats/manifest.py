"""The manifest: one row per utterance, the single source of truth for what exists.

Every later stage (extraction, splits, training) joins on `utterance_id`. Imported
benchmark features (no raw media) produce the same manifest with null paths.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
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
# Optional conversation structure: the dialogue an utterance belongs to and its position in it.
# Without them (or with a null dialogue) an utterance is a dialogue of its own at turn 0.
DIALOGUE_COLUMNS: tuple[str, ...] = ("dialogue", "turn")
DIALOGUE_TYPES: dict[str, pa.DataType] = {"dialogue": pa.string(), "turn": pa.int64()}


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
    _check_dialogues(table, path)
    extra_cols = [c for c in table.column_names if c not in MANIFEST_SCHEMA.names]
    ordered = table.select(MANIFEST_SCHEMA.names + extra_cols)
    extra_fields = [pa.field(c, DIALOGUE_TYPES[c]) if c in DIALOGUE_TYPES else ordered.schema.field(c) for c in extra_cols]
    ordered = ordered.cast(pa.schema(list(MANIFEST_SCHEMA) + extra_fields))
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


def _check_dialogues(table: pa.Table, path: str | Path) -> None:
    """`turn` needs `dialogue`; turns are whole numbers >= 0; a turn on a row without a dialogue is an error."""
    names = table.column_names
    if "turn" in names and "dialogue" not in names:
        raise ValueError(f"{path}: manifest has a 'turn' column but no 'dialogue' column; a turn is a position inside a dialogue")
    if "turn" not in names:
        return
    try:
        turns = table.column("turn").cast(pa.int64())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        raise ValueError(f"{path}: manifest column 'turn' must hold non-negative integers ({exc})") from exc
    values = np.asarray(turns.to_pylist(), dtype=object)
    dialogues = np.asarray(table.column("dialogue").to_pylist(), dtype=object)
    negative = [i for i, t in enumerate(values) if t is not None and t < 0]
    if negative:
        i = negative[0]
        raise ValueError(f"{path}: manifest column 'turn' has negative values ({len(negative)} rows, e.g. "
                         f"utterance {table.column('utterance_id')[i].as_py()!r}: {values[i]})")
    orphan = [i for i in range(len(values)) if values[i] is not None and dialogues[i] is None]
    if orphan:
        raise ValueError(f"{path}: manifest rows have a 'turn' but no 'dialogue' ({len(orphan)} rows, e.g. "
                         f"utterance {table.column('utterance_id')[orphan[0]].as_py()!r})")


def read_dialogues(table: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """(N,) dialogue id (str, object array) and (N,) turn (int64) per manifest row.

    A manifest without the columns (older ones, imports without conversation structure)
    or a row with a null dialogue makes each such utterance its own dialogue: dialogue =
    utterance_id, turn = 0. Order inside a dialogue: by turn, ties by manifest row.
    """
    ids = np.asarray(table.column("utterance_id").to_pylist(), dtype=object)
    if "dialogue" not in table.column_names:
        return ids.copy(), np.zeros(len(ids), dtype=np.int64)
    dialogue = np.asarray(table.column("dialogue").to_pylist(), dtype=object)
    own = np.asarray([d is None for d in dialogue], dtype=bool)
    dialogue[own] = ids[own]
    turn = np.zeros(len(ids), dtype=np.int64)
    if "turn" in table.column_names:
        raw = table.column("turn").to_pylist()
        turn[:] = [0 if t is None else int(t) for t in raw]
    turn[own] = 0
    return np.asarray([str(d) for d in dialogue], dtype=object), turn


def parse_turn(value: Any) -> int | None:
    """A turn as an int, or None when it is not a whole number >= 0 ("3" and 3.0 are; "3.5", -1, "x" are not).

    The one rule for turns given as text or numbers (listings, prediction input)."""
    if isinstance(value, bool):
        return None
    try:
        number = float(str(value).strip()) if isinstance(value, str) else float(value)
    except (TypeError, ValueError):
        return None
    if not math.isfinite(number) or number < 0 or number != int(number):
        return None
    return int(number)
