"""Per-modality feature tables: one Arrow IPC file per modality under data/features/.

Why Arrow IPC (not Parquet) for features: an uncompressed IPC file can be memory-
mapped, so `sequence` becomes a zero-copy (N, T, d) numpy view and a MOSEI-size
table is never materialised as Python objects. Every table carries the extractor
config and feature names in its schema metadata, so a number is never separated
from the recipe that produced it.

Columns
- utterance_id: string
- present: bool            False when the modality is missing for this clip
- failure_reason: string   null when present; else why (e.g. "no_face", "silent_audio", "file_absent")
- length: int32            true number of valid steps in `sequence` (0 when missing)
- sequence: fixed_size_list<float32>[T*d]   padded steps, zeros past `length` and when missing
- summary: fixed_size_list<float32>[d_s]    one utterance-level vector (functionals, mean descriptor, sentence embedding)
- content_hash: string     hash of the source file bytes (null when there is no file)
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pyarrow as pa

from pipeline.core.atomic import atomic_path

META_KEY = b"imer"
FORMAT_VERSION = 1


@dataclass
class FeatureTable:
    """A feature table in memory; `sequence`/`summary` may be memory-mapped views."""

    modality: str
    utterance_id: np.ndarray  # (N,) object array of str
    present: np.ndarray  # (N,) bool
    failure_reason: list[str | None]
    length: np.ndarray  # (N,) int32
    sequence: np.ndarray | ChunkedRows  # (N, T, d) float32; ChunkedRows for multi-batch tables
    summary: np.ndarray  # (N, d_s) float32
    content_hash: list[str | None] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.utterance_id)

    def index(self) -> dict[str, int]:
        """Row number per utterance id, for joins against the manifest."""
        return {uid: i for i, uid in enumerate(self.utterance_id)}


def build_meta(
    modality: str,
    seq_len: int,
    seq_dim: int,
    summary_dim: int,
    feature_names: Sequence[str],
    summary_names: Sequence[str],
    extractor: dict[str, Any],
    config_hash: str,
) -> dict[str, Any]:
    """The metadata every table carries: shapes, names and the extractor recipe."""
    return {
        "format_version": FORMAT_VERSION,
        "modality": modality,
        "sequence_shape": [int(seq_len), int(seq_dim)],
        "summary_dim": int(summary_dim),
        "feature_names": list(feature_names),
        "summary_names": list(summary_names),
        "extractor": extractor,
        "config_hash": config_hash,
    }


def write_feature_table(path: str | Path, table: FeatureTable) -> None:
    """Validate shapes and write atomically; a killed writer leaves the old file intact."""
    n = len(table.utterance_id)
    seq = np.ascontiguousarray(table.sequence, dtype=np.float32)
    summ = np.ascontiguousarray(table.summary, dtype=np.float32)
    if seq.ndim != 3 or seq.shape[0] != n:
        raise ValueError(f"{path}: sequence must be (N={n}, T, d), got {seq.shape}")
    if summ.ndim != 2 or summ.shape[0] != n:
        raise ValueError(f"{path}: summary must be (N={n}, d_s), got {summ.shape}")
    for name, col in (("present", table.present), ("length", table.length), ("failure_reason", table.failure_reason)):
        if len(col) != n:
            raise ValueError(f"{path}: column {name} has {len(col)} rows, expected {n}")
    if np.any(table.length > seq.shape[1]) or np.any(table.length < 0):
        raise ValueError(f"{path}: length outside [0, T={seq.shape[1]}]")
    meta = dict(table.meta)
    meta.setdefault("modality", table.modality)
    meta["sequence_shape"] = [int(seq.shape[1]), int(seq.shape[2])]
    meta["summary_dim"] = int(summ.shape[1])
    t_d = seq.shape[1] * seq.shape[2]
    hashes = table.content_hash if table.content_hash else [None] * n
    arrays = [
        pa.array([str(u) for u in table.utterance_id], pa.string()),
        pa.array(np.asarray(table.present, dtype=bool)),
        pa.array(list(table.failure_reason), pa.string()),
        pa.array(np.asarray(table.length, dtype=np.int32)),
        pa.FixedSizeListArray.from_arrays(pa.array(seq.reshape(-1)), t_d),
        pa.FixedSizeListArray.from_arrays(pa.array(summ.reshape(-1)), summ.shape[1]),
        pa.array(list(hashes), pa.string()),
    ]
    names = ["utterance_id", "present", "failure_reason", "length", "sequence", "summary", "content_hash"]
    schema = pa.schema([pa.field(nm, arr.type) for nm, arr in zip(names, arrays)], metadata={META_KEY: json.dumps(meta).encode()})
    batch = pa.record_batch(arrays, schema=schema)
    with atomic_path(path) as tmp:
        with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
            writer.write_batch(batch)


def read_feature_table(path: str | Path, memory_map: bool = True) -> FeatureTable:
    """Open a table; with `memory_map` the big arrays are views onto the file, not copies."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: feature table not found (run the extraction or import stage)")
    source = pa.memory_map(str(path), "r") if memory_map else pa.OSFile(str(path), "rb")
    try:
        reader = pa.ipc.open_file(source)
        arrow = reader.read_all()
    except pa.ArrowInvalid as exc:
        raise ValueError(f"{path}: not a readable Arrow IPC feature table ({exc})") from exc
    raw = (arrow.schema.metadata or {}).get(META_KEY)
    if raw is None:
        raise ValueError(f"{path}: no '{META_KEY.decode()}' metadata; not an imer feature table")
    meta = json.loads(raw)
    t, d = meta["sequence_shape"]
    n = arrow.num_rows
    seq = _sequence_view(arrow.column("sequence"), n, t, d)
    summ = _fixed_list_to_numpy(arrow.column("summary"), n, meta["summary_dim"])
    return FeatureTable(
        modality=meta["modality"],
        utterance_id=np.asarray(arrow.column("utterance_id").to_pylist(), dtype=object),
        present=arrow.column("present").to_numpy(zero_copy_only=False).astype(bool),
        failure_reason=arrow.column("failure_reason").to_pylist(),
        length=arrow.column("length").to_numpy(zero_copy_only=False).astype(np.int32),
        sequence=seq,
        summary=summ,
        content_hash=arrow.column("content_hash").to_pylist(),
        meta=meta,
    )


class ChunkedRows:
    """Row access over the record batches of a streamed table without concatenating them.

    A table written in batches (importers stream MOSEI-size data) maps to one buffer
    per batch; joining them would copy gigabytes. Training only needs `shape` and
    row gathers (`rows[int_array]`), which this serves batch by batch.
    """

    def __init__(self, parts: list[np.ndarray]) -> None:
        self.parts = parts
        self.offsets = np.cumsum([0] + [len(p) for p in parts])  # row where each part starts
        self.shape = (int(self.offsets[-1]), *parts[0].shape[1:])
        self.dtype = parts[0].dtype
        self.ndim = parts[0].ndim

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index: Any) -> np.ndarray:
        if isinstance(index, tuple):  # (rows, *within-row): gather the rows first, then slice them
            if not index:
                return np.asarray(self)
            head, rest = index[0], index[1:]
            picked = self[head]
            return picked[rest] if isinstance(head, (int, np.integer)) else picked[(slice(None), *rest)]
        if isinstance(index, (int, np.integer)):
            index = int(index) + (self.shape[0] if int(index) < 0 else 0)
            part = int(np.searchsorted(self.offsets, index, side="right")) - 1
            return self.parts[part][index - self.offsets[part]]
        rows = np.arange(self.shape[0])[index]  # normalises slices, bool masks and negative ints
        out = np.empty((len(rows), *self.shape[1:]), dtype=self.dtype)
        part_of = np.searchsorted(self.offsets, rows, side="right") - 1
        for part in np.unique(part_of):
            sel = part_of == part
            out[sel] = self.parts[part][rows[sel] - self.offsets[part]]
        return out

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        whole = np.concatenate(self.parts)
        return whole if dtype is None else whole.astype(dtype)


def _sequence_view(column: pa.ChunkedArray, n: int, t: int, d: int) -> np.ndarray | ChunkedRows:
    # One chunk: a single zero-copy (N, T, d) view. Several: per-chunk views, still zero-copy.
    if column.num_chunks <= 1:
        return _fixed_list_to_numpy(column, n, t * d).reshape(n, t, d)
    parts = [c.flatten().to_numpy(zero_copy_only=False).reshape(len(c), t, d) for c in column.chunks if len(c)]
    return ChunkedRows(parts)


def _fixed_list_to_numpy(column: pa.ChunkedArray, n: int, width: int) -> np.ndarray:
    # A single-chunk fixed-size list over non-null float32 values is one contiguous buffer.
    if n == 0:
        return np.zeros((0, width), dtype=np.float32)
    chunks = [c.flatten().to_numpy(zero_copy_only=False) for c in column.chunks]
    flat = chunks[0] if len(chunks) == 1 else np.concatenate(chunks)
    return flat.reshape(n, width)


class FeatureTableWriter:
    """Write a feature table in record batches, for tables too large to hold at once.

    Same columns, schema metadata and atomicity as `write_feature_table`: rows go to
    a temporary file beside `path`, renamed over it only when the `with` block exits
    cleanly. Shapes are fixed up front because the IPC schema is written first.

        with FeatureTableWriter(path, "acoustic", T, d, d_s, meta) as w:
            w.write_batch(ids, present, reasons, lengths, seq, summ, hashes)
    """

    def __init__(self, path: str | Path, modality: str, seq_len: int, seq_dim: int, summary_dim: int, meta: dict[str, Any]) -> None:
        self.path = Path(path)
        self.shape = (int(seq_len), int(seq_dim))
        self.summary_dim = int(summary_dim)
        full = dict(meta)
        full.setdefault("modality", modality)
        full["sequence_shape"] = [self.shape[0], self.shape[1]]
        full["summary_dim"] = self.summary_dim
        self.schema = pa.schema(
            [
                pa.field("utterance_id", pa.string()),
                pa.field("present", pa.bool_()),
                pa.field("failure_reason", pa.string()),
                pa.field("length", pa.int32()),
                pa.field("sequence", pa.list_(pa.float32(), self.shape[0] * self.shape[1])),
                pa.field("summary", pa.list_(pa.float32(), self.summary_dim)),
                pa.field("content_hash", pa.string()),
            ],
            metadata={META_KEY: json.dumps(full).encode()},
        )
        self.rows = 0
        self._atomic: Any = None
        self._sink: Any = None
        self._writer: Any = None

    def __enter__(self) -> "FeatureTableWriter":
        self._atomic = atomic_path(self.path)
        tmp = self._atomic.__enter__()
        self._sink = pa.OSFile(str(tmp), "wb")
        self._writer = pa.ipc.new_file(self._sink, self.schema)
        return self

    def write_batch(
        self,
        utterance_id: Sequence[str],
        present: np.ndarray,
        failure_reason: Sequence[str | None],
        length: np.ndarray,
        sequence: np.ndarray,
        summary: np.ndarray,
        content_hash: Sequence[str | None] | None = None,
    ) -> None:
        """Append rows; `sequence` is (n, T, d) and `summary` (n, d_s), float32 after casting."""
        n = len(utterance_id)
        seq = np.ascontiguousarray(sequence, dtype=np.float32)
        summ = np.ascontiguousarray(summary, dtype=np.float32)
        if seq.shape != (n, *self.shape):
            raise ValueError(f"{self.path}: batch sequence must be {(n, *self.shape)}, got {seq.shape}")
        if summ.shape != (n, self.summary_dim):
            raise ValueError(f"{self.path}: batch summary must be {(n, self.summary_dim)}, got {summ.shape}")
        lengths = np.asarray(length, dtype=np.int32)
        for name, col in (("present", present), ("length", lengths), ("failure_reason", failure_reason)):
            if len(col) != n:
                raise ValueError(f"{self.path}: batch column {name} has {len(col)} rows, expected {n}")
        if np.any(lengths > self.shape[0]) or np.any(lengths < 0):
            raise ValueError(f"{self.path}: length outside [0, T={self.shape[0]}]")
        hashes = list(content_hash) if content_hash is not None else [None] * n
        arrays = [
            pa.array([str(u) for u in utterance_id], pa.string()),
            pa.array(np.asarray(present, dtype=bool)),
            pa.array(list(failure_reason), pa.string()),
            pa.array(lengths),
            pa.FixedSizeListArray.from_arrays(pa.array(seq.reshape(-1)), self.shape[0] * self.shape[1]),
            pa.FixedSizeListArray.from_arrays(pa.array(summ.reshape(-1)), self.summary_dim),
            pa.array(hashes, pa.string()),
        ]
        self._writer.write_batch(pa.record_batch(arrays, schema=self.schema))
        self.rows += n

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        try:
            self._writer.close()
            self._sink.close()
        finally:
            # On an exception the atomic context deletes the temporary file; the old table stays.
            self._atomic.__exit__(exc_type, exc, tb)
        return False
