"""The streaming FeatureTableWriter writes exactly what write_feature_table writes."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from pipeline.formats.feature_table import FeatureTable, FeatureTableWriter, build_meta, read_feature_table, write_feature_table


def _table(n=7, t=3, d=4, seed=0):
    rng = np.random.default_rng(seed)
    seq = rng.normal(size=(n, t, d)).astype(np.float32)
    present = rng.random(n) > 0.3
    seq[~present] = 0
    return FeatureTable(
        "visual", np.array([f"u{i}" for i in range(n)], dtype=object), present,
        [None if p else "no_face" for p in present], np.where(present, t, 0).astype(np.int32), seq, seq.mean(axis=1),
        [f"h{i}" for i in range(n)], build_meta("visual", t, d, d, list("abcd"), list("abcd"), {"name": "x"}, "cfg"),
    )


def test_batches_equal_single_write(tmp_path):
    table = _table()
    write_feature_table(tmp_path / "one.arrow", table)
    with FeatureTableWriter(tmp_path / "many.arrow", "visual", 3, 4, 4, table.meta) as writer:
        for s in (slice(0, 3), slice(3, 4), slice(4, 7)):
            writer.write_batch(table.utterance_id[s], table.present[s], table.failure_reason[s], table.length[s],
                               table.sequence[s], table.summary[s], table.content_hash[s])
    one, many = (pa.ipc.open_file(str(tmp_path / f)) for f in ("one.arrow", "many.arrow"))
    assert one.schema.equals(many.schema, check_metadata=True) and many.num_record_batches == 3
    a, b = read_feature_table(tmp_path / "one.arrow"), read_feature_table(tmp_path / "many.arrow")
    np.testing.assert_array_equal(a.sequence, b.sequence)
    assert a.failure_reason == b.failure_reason and a.content_hash == b.content_hash and a.meta == b.meta


def test_failed_write_keeps_old_table(tmp_path):
    table = _table()
    write_feature_table(tmp_path / "t.arrow", table)
    with pytest.raises(ValueError, match="batch sequence must be"):
        with FeatureTableWriter(tmp_path / "t.arrow", "visual", 3, 4, 4, table.meta) as writer:
            writer.write_batch(table.utterance_id[:2], table.present[:2], [None, None], table.length[:2],
                               table.sequence[:2, :2], table.summary[:2])
    assert len(read_feature_table(tmp_path / "t.arrow")) == 7
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.arrow"]
