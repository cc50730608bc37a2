"""GCNet / MoMKE layout: round trips, natural missingness and layout errors."""
from __future__ import annotations

import os
import pickle

import numpy as np
import pytest

from pipeline.formats.feature_table import read_feature_table
from pipeline.importers.stage import TABLES, ImportConfig, import_dataset
from pipeline.formats.manifest import read_manifest
from tests.import_fixtures import write_gcnet_iemocap, write_gcnet_mosi


def _cfg(exp, dataset="iemocap4", **kw):
    return ImportConfig(format="gcnet", dataset=dataset, label_path=str(exp.label_path),
                        feature_dirs={m: str(p) for m, p in exp.feature_dirs.items()}, **kw)


def _run(tmp_path, cfg):
    summary = import_dataset(cfg, tmp_path / "out" / "manifest.parquet", tmp_path / "out" / "features")
    manifest, meta = read_manifest(tmp_path / "out" / "manifest.parquet")
    tables = {m: read_feature_table(tmp_path / "out" / "features" / f"{t}.arrow") for m, t in TABLES.items()}
    return summary, manifest, meta, tables


def _check_features(exp, manifest, tables):
    ids = manifest.column("utterance_id").to_pylist()
    for m, table in tables.items():
        assert table.utterance_id.tolist() == ids
        seq_len = table.sequence.shape[1]
        for i, uid in enumerate(ids):
            want = exp.steps[m][uid]
            assert table.failure_reason[i] == exp.reason[m][uid], (m, uid)
            if want is None:
                assert not table.present[i] and table.length[i] == 0 and not table.sequence[i].any()
                continue
            keep = min(len(want), seq_len)
            assert table.present[i] and table.length[i] == keep
            np.testing.assert_allclose(table.sequence[i, :keep], want[:keep].astype(np.float32), rtol=0, atol=1e-6)
            assert not table.sequence[i, keep:].any()
            np.testing.assert_allclose(table.summary[i], want.mean(axis=0), rtol=1e-5, atol=1e-6)


def test_iemocap_round_trip(tmp_path):
    exp = write_gcnet_iemocap(tmp_path / "iemocap")
    summary, manifest, meta, tables = _run(tmp_path, _cfg(exp))
    assert manifest.column("utterance_id").to_pylist() == exp.uids
    rows = manifest.to_pylist()
    for row in rows:
        uid = row["utterance_id"]
        assert row["session"] == exp.session[uid] and row["speaker"] == exp.speaker[uid]
        assert row["label"] == exp.label[uid] and row["score"] is None
        assert row["split"] == exp.split[uid] and row["domain"] == "source"
        assert row["dialogue"] == exp.dialogue[uid] and row["turn"] == exp.turn[uid]  # the pickle's lists, in order
        assert row["audio_path"] is None and row["video_path"] is None
        for m in ("audio", "text", "video"):
            assert row[f"{m}_missing"] == exp.reason[m][uid]
    assert meta["task"] == "classification" and meta["classes"] == ["happy", "sad", "neutral", "angry"]
    _check_features(exp, manifest, tables)
    assert summary["tables"]["acoustic"]["missing"] == {"file_absent": 1}
    assert summary["tables"]["visual"]["missing"] == {"all_zero_features": 1}
    assert summary["tables"]["textual"]["missing"] == {"zero_length": 1}
    assert tables["audio"].meta["extractor"]["folder"] == str(exp.feature_dirs["audio"])


def test_max_len_truncates_and_face_stack_keeps_frames(tmp_path):
    exp = write_gcnet_iemocap(tmp_path / "iemocap")
    summary, manifest, _, tables = _run(tmp_path, _cfg(exp, max_len={"a": 2, "t": None, "v": 8}, face_reduce="stack"))
    assert tables["audio"].sequence.shape[1] == 2
    longest = max(len(s) for s in exp.steps["audio"].values() if s is not None)
    assert summary["tables"]["acoustic"]["truncated"] == sum(1 for s in exp.steps["audio"].values() if s is not None and len(s) > 2)
    assert longest > 2
    face_uid = exp.uids[1]
    i = manifest.column("utterance_id").to_pylist().index(face_uid)
    faces = np.stack([np.load(p) for p in sorted((exp.feature_dirs["video"] / face_uid).glob("*.npy"))])  # (3, d)
    assert tables["video"].length[i] == 3
    np.testing.assert_allclose(tables["video"].sequence[i, :3], faces, atol=1e-6)


def test_mosi_scores_and_published_splits(tmp_path):
    exp = write_gcnet_mosi(tmp_path / "mosi")
    summary, manifest, meta, tables = _run(tmp_path, _cfg(exp, dataset="mosi"))
    assert meta["task"] == "regression" and meta["classes"] == []
    rows = {r["utterance_id"]: r for r in manifest.to_pylist()}
    assert list(rows) == exp.uids
    for uid, row in rows.items():
        assert row["label"] is None and row["score"] == pytest.approx(exp.score[uid])
        assert row["split"] == exp.split[uid] and row["session"] == exp.session[uid]
        assert (row["dialogue"], row["turn"]) == (exp.dialogue[uid], exp.turn[uid])
    assert set(summary["splits"]) == {"train", "val", "test"}
    _check_features(exp, manifest, tables)
    assert all(t.sequence.shape[1] == 1 for t in tables.values())  # [d] vectors become T=1


def test_all_missing_ids_error_or_drop(tmp_path):
    exp = write_gcnet_iemocap(tmp_path / "iemocap")
    uid = exp.uids[0]
    for m in exp.feature_dirs:
        os.remove(exp.feature_dirs[m] / f"{uid}.npy")
    with pytest.raises(ValueError, match=f"no feature file in any.*{uid}"):
        _run(tmp_path, _cfg(exp))
    assert not (tmp_path / "out" / "manifest.parquet").exists()
    summary, manifest, _, _ = _run(tmp_path, _cfg(exp, on_all_missing="drop"))
    assert uid not in manifest.column("utterance_id").to_pylist()
    assert summary["dropped_all_absent"] == [uid] and summary["rows"] == len(exp.uids) - 1


def _rewrite_labels(exp, mutate):
    payload = pickle.loads(exp.label_path.read_bytes())
    exp.label_path.write_bytes(pickle.dumps(mutate(payload), protocol=4))


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda p: p[:5], "list of 6 \\(IEMOCAP\\) or 7"),
        (lambda p: {"videoIDs": p[0]}, "list of 6"),
        (lambda p: [p[0], list(p[1].values())] + p[2:], "videoLabels must be a dict"),
        (lambda p: p[:4] + [p[4] | {"Ses09F_impro01"}, p[5]], "Ses09F_impro01.*videoIDs lacks"),
        (lambda p: p[:4] + [p[4], p[5] | set(list(p[4])[:1])], "in both train and test"),
        (lambda p: [p[0], {k: v[:-1] for k, v in p[1].items()}] + p[2:], "ids, .* labels and .* speakers"),
        (lambda p: [p[0], {k: [7] * len(v) for k, v in p[1].items()}] + p[2:], "integer class index in \\[0, 4\\)"),
    ],
)
def test_label_pickle_layout_errors(tmp_path, mutate, message):
    exp = write_gcnet_iemocap(tmp_path / "iemocap")
    _rewrite_labels(exp, mutate)
    with pytest.raises(ValueError, match=message) as err:
        _run(tmp_path, _cfg(exp))
    assert str(exp.label_path) in str(err.value)


def test_feature_layout_errors(tmp_path):
    exp = write_gcnet_iemocap(tmp_path / "iemocap")
    np.save(exp.feature_dirs["text"] / f"{exp.uids[5]}.npy", np.ones((2, 99), np.float32))
    with pytest.raises(ValueError, match="feature width differs.*d=99"):
        _run(tmp_path, _cfg(exp))
    np.save(exp.feature_dirs["text"] / f"{exp.uids[5]}.npy", np.ones((2, 3, 6), np.float32))
    with pytest.raises(ValueError, match="must be \\[d\\], \\[T, d\\] or \\[1, T, d\\]"):
        _run(tmp_path, _cfg(exp))
    cfg = _cfg(exp)
    cfg.feature_dirs["text"] = str(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        _run(tmp_path, cfg)


def test_wrong_folder_and_missing_share(tmp_path):
    exp = write_gcnet_iemocap(tmp_path / "iemocap")
    other = write_gcnet_mosi(tmp_path / "mosi")
    cfg = _cfg(exp)
    cfg.feature_dirs["video"] = str(other.feature_dirs["video"])
    with pytest.raises(ValueError, match="no usable feature for any"):
        _run(tmp_path, cfg)
    for uid in exp.uids[: len(exp.uids) // 2 + 2]:
        path = exp.feature_dirs["text"] / f"{uid}.npy"
        if path.exists():
            os.remove(path)
    with pytest.raises(ValueError, match="textual is missing for .*max_missing_share"):
        _run(tmp_path, _cfg(exp))
    assert not list((tmp_path / "out" / "features").glob("*.arrow"))  # nothing half-written


def test_unreadable_npy_is_routed_missing(tmp_path):
    exp = write_gcnet_iemocap(tmp_path / "iemocap")
    uid = exp.uids[6]
    (exp.feature_dirs["audio"] / f"{uid}.npy").write_bytes(b"not a numpy file")
    _, manifest, _, tables = _run(tmp_path, _cfg(exp))
    i = manifest.column("utterance_id").to_pylist().index(uid)
    assert tables["audio"].failure_reason[i] == "unreadable_file" and not tables["audio"].present[i]
    assert manifest.column("audio_missing").to_pylist()[i] == "unreadable_file"


def _label_pickle(path, counts):
    """A GCNet IEMOCAP label pickle whose integer labels occur `counts[k]` times (one dialogue per session)."""
    ids, labels, speakers, sentences = {}, {}, {}, {}
    ys = [k for k, n in enumerate(counts) for _ in range(n)]
    per = -(-len(ys) // 5)
    for s in range(5):
        vid = f"Ses{s + 1:02d}F_impro01"
        chunk = ys[s * per:(s + 1) * per]
        ids[vid] = [f"{vid}_F{j:03d}" for j in range(len(chunk))]
        labels[vid], speakers[vid], sentences[vid] = chunk, ["F"] * len(chunk), [""] * len(chunk)
    vids = sorted(ids)
    path.write_bytes(pickle.dumps([ids, labels, speakers, sentences, set(vids[:4]), {vids[4]}], protocol=2))
    return path


@pytest.mark.parametrize("dataset,counts,published", [
    # the real GCNet pickles' per-integer counts, and IEMOCAP's published per-class counts
    ("iemocap4", (1636, 1084, 1708, 1103), {"neutral": 1708, "happy": 1636, "sad": 1084, "angry": 1103}),
    ("iemocap6", (648, 1084, 1708, 1103, 1041, 1849),
     {"happy": 648, "sad": 1084, "neutral": 1708, "angry": 1103, "excited": 1041, "frustrated": 1849}),
])
def test_default_iemocap_class_order_matches_published_counts(tmp_path, dataset, counts, published):
    from collections import Counter

    from pipeline.importers.gcnet import read_labels

    path = _label_pickle(tmp_path / "labels.pkl", counts)
    cfg = ImportConfig(format="gcnet", dataset=dataset, label_path=str(path), feature_dirs={})
    read = Counter(u.label for u in read_labels(path, dataset, cfg.class_names()))
    assert dict(read) == published
