"""Manifest and feature-table contracts: round trips, memory mapping, atomicity, clear errors."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from pipeline.core.atomic import atomic_path
from pipeline.core.modalities import COMBINATIONS, MASKS, combination_mask, mask_to_index
from pipeline.formats.feature_table import FeatureTable, build_meta, read_feature_table, write_feature_table
from pipeline.formats.manifest import MANIFEST_SCHEMA, manifest_meta, read_manifest, write_manifest


def _table(n: int = 5, t: int = 4, d: int = 3) -> FeatureTable:
    rng = np.random.default_rng(0)
    present = np.array([True, False, True, True, False][:n])
    length = np.where(present, rng.integers(1, t + 1, n), 0).astype(np.int32)
    seq = rng.normal(size=(n, t, d)).astype(np.float32)
    seq[~present] = 0
    meta = build_meta("acoustic", t, d, 2, [f"f{i}" for i in range(d)], ["s0", "s1"], {"feature_set": "x"}, "abc")
    return FeatureTable("acoustic", np.array([f"u{i}" for i in range(n)], dtype=object), present,
                        [None if p else "no_face" for p in present], length, seq, rng.normal(size=(n, 2)).astype(np.float32), [f"h{i}" for i in range(n)], meta)


def test_feature_table_round_trip_is_exact_and_memory_mapped(tmp_path: Path) -> None:
    original = _table()
    write_feature_table(tmp_path / "acoustic.arrow", original)
    loaded = read_feature_table(tmp_path / "acoustic.arrow")
    np.testing.assert_array_equal(loaded.sequence, original.sequence)
    np.testing.assert_array_equal(loaded.summary, original.summary)
    assert list(loaded.utterance_id) == list(original.utterance_id)
    assert loaded.failure_reason == original.failure_reason and loaded.content_hash == original.content_hash
    assert loaded.meta["feature_names"] == ["f0", "f1", "f2"] and loaded.meta["extractor"] == {"feature_set": "x"}
    assert not loaded.sequence.flags.owndata  # a view onto the mapped file, not a copy


def test_feature_table_rejects_bad_shapes(tmp_path: Path) -> None:
    bad = _table()
    bad.length = bad.length + 10
    with pytest.raises(ValueError, match="length outside"):
        write_feature_table(tmp_path / "x.arrow", bad)
    bad = _table()
    bad.summary = bad.summary[:3]
    with pytest.raises(ValueError, match=r"x.arrow: summary must be \(N=5"):
        write_feature_table(tmp_path / "x.arrow", bad)
    assert not (tmp_path / "x.arrow").exists()


def test_reading_a_non_table_names_the_file(tmp_path: Path) -> None:
    (tmp_path / "junk.arrow").write_bytes(b"not arrow at all")
    with pytest.raises(ValueError, match="junk.arrow"):
        read_feature_table(tmp_path / "junk.arrow")


def test_atomic_path_keeps_old_file_when_writer_dies(tmp_path: Path) -> None:
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert target.read_text() == "old" and list(tmp_path.iterdir()) == [target]


def test_manifest_round_trip_and_duplicate_ids(tmp_path: Path) -> None:
    rows = {f.name: [None, None] for f in MANIFEST_SCHEMA}
    rows.update(utterance_id=["a", "b"], session=["S1", "S1"], speaker=["x", "y"], label=["sad", "happy"], domain=["source"] * 2)
    table = pa.table({k: pa.array(v, MANIFEST_SCHEMA.field(k).type) for k, v in rows.items()})
    write_manifest(table, tmp_path / "m.parquet", manifest_meta("classification", ["sad", "happy"], "test"))
    loaded, meta = read_manifest(tmp_path / "m.parquet")
    assert loaded.column("utterance_id").to_pylist() == ["a", "b"] and meta["classes"] == ["sad", "happy"]
    rows["utterance_id"] = ["a", "a"]
    dup = pa.table({k: pa.array(v, MANIFEST_SCHEMA.field(k).type) for k, v in rows.items()})
    with pytest.raises(ValueError, match="duplicate utterance_id"):
        write_manifest(dup, tmp_path / "d.parquet", manifest_meta("classification", [], "test"))


def test_combination_masks_and_indices_agree() -> None:
    assert MASKS.shape == (7, 3) and MASKS.any(axis=1).all()
    assert list(mask_to_index(MASKS)) == list(range(7))
    assert mask_to_index(np.zeros(3, dtype=bool)) == -1
    assert combination_mask("tv").tolist() == [False, True, True]
    assert len(set(map(tuple, MASKS.tolist()))) == len(COMBINATIONS)
    with pytest.raises(ValueError, match="unknown combination"):
        combination_mask("x")


def test_multi_batch_table_is_read_without_concatenating(tmp_path: Path) -> None:
    from pipeline.formats.feature_table import ChunkedRows, FeatureTableWriter

    rng = np.random.default_rng(1)
    seq = rng.normal(size=(10, 3, 2)).astype(np.float32)
    summ = rng.normal(size=(10, 2)).astype(np.float32)
    meta = build_meta("visual", 3, 2, 2, ["x", "y"], ["s0", "s1"], {}, "h")
    with FeatureTableWriter(tmp_path / "v.arrow", "visual", 3, 2, 2, meta) as writer:
        for lo, hi in ((0, 4), (4, 7), (7, 10)):
            writer.write_batch([f"u{i}" for i in range(lo, hi)], np.ones(hi - lo, bool), [None] * (hi - lo),
                               np.full(hi - lo, 3, np.int32), seq[lo:hi], summ[lo:hi])
    loaded = read_feature_table(tmp_path / "v.arrow")
    assert isinstance(loaded.sequence, ChunkedRows) and loaded.sequence.shape == (10, 3, 2)
    rows = np.array([9, 0, 5, 4, 3, 7])
    np.testing.assert_array_equal(loaded.sequence[rows], seq[rows])  # gathers across batch borders
    np.testing.assert_array_equal(loaded.sequence[-1], seq[-1])
    np.testing.assert_array_equal(np.asarray(loaded.sequence), seq)
    np.testing.assert_array_equal(loaded.summary, summ)
    for index in ((0, slice(None, 2)), (slice(3, 8), 1), (rows, slice(None), 0), (-2, 1, 1), (slice(None, None, -3),)):
        np.testing.assert_array_equal(loaded.sequence[index], seq[index])  # numpy-style multi-axis indexing
