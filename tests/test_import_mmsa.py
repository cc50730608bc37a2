"""MMSA pickles (unaligned_50.pkl / aligned_50.pkl): round trips, lengths, layout errors."""
from __future__ import annotations

import pickle

import numpy as np
import pytest

from pipeline.formats.feature_table import read_feature_table
from pipeline.importers import mmsa, safe_pickle
from pipeline.importers.stage import TABLES, ImportConfig, import_dataset
from pipeline.formats.manifest import read_manifest
from tests.import_fixtures import write_malicious, write_mmsa


def _run(tmp_path, path, **kw):
    cfg = ImportConfig(format="mmsa", dataset="mosi", pickle_path=str(path), **kw)
    summary = import_dataset(cfg, tmp_path / "out" / "manifest.parquet", tmp_path / "out" / "features")
    manifest, meta = read_manifest(tmp_path / "out" / "manifest.parquet")
    tables = {m: read_feature_table(tmp_path / "out" / "features" / f"{t}.arrow") for m, t in TABLES.items()}
    return summary, manifest, meta, tables


@pytest.mark.parametrize("with_lengths, with_text_bert", [(True, False), (False, False), (False, True)])
def test_round_trip(tmp_path, with_lengths, with_text_bert):
    exp = write_mmsa(tmp_path / "unaligned_50.pkl", with_lengths=with_lengths, with_text_bert=with_text_bert)
    summary, manifest, meta, tables = _run(tmp_path, exp.pickle_path)
    ids = manifest.column("utterance_id").to_pylist()
    assert ids == exp.uids and meta["task"] == "regression"
    for row in manifest.to_pylist():
        uid = row["utterance_id"]
        assert row["score"] == pytest.approx(exp.score[uid], abs=1e-6) and row["label"] is None
        assert row["split"] == exp.split[uid] and row["session"] == exp.session[uid] == row["speaker"]
        assert row["dialogue"] == exp.dialogue[uid] and row["turn"] == exp.turn[uid]  # video, clip index
    for m, table in tables.items():
        assert table.utterance_id.tolist() == ids
        for i, uid in enumerate(ids):
            want = exp.steps[m][uid]
            assert table.failure_reason[i] == exp.reason[m][uid], (m, uid)
            assert manifest.column(f"{m}_missing").to_pylist()[i] == exp.reason[m][uid]
            if want is None:
                assert not table.present[i] and table.length[i] == 0
                continue
            assert table.length[i] == len(want)
            np.testing.assert_array_equal(table.sequence[i, : len(want)], want)
            np.testing.assert_allclose(table.summary[i], want.mean(axis=0), rtol=1e-5, atol=1e-6)
    source = tables["text"].meta["extractor"]["length_source"]["train"]
    assert source == ("text_bert_mask" if with_text_bert else "trailing_zeros")
    assert tables["audio"].meta["extractor"]["length_source"]["train"] == ("pickle" if with_lengths else "trailing_zeros")
    assert summary["splits"] == {"train": 12, "val": 5, "test": 6}


def test_max_len_and_nonfinite(tmp_path):
    exp = write_mmsa(tmp_path / "unaligned_50.pkl")
    data = pickle.loads(exp.pickle_path.read_bytes())
    data["train"]["audio"][0, 0, 0] = -np.inf  # MOSEI's COVAREP audio holds -inf
    exp.pickle_path.write_bytes(pickle.dumps(data, protocol=4))
    _, manifest, _, tables = _run(tmp_path, exp.pickle_path, max_len={"a": 3, "t": None, "v": None})
    assert tables["audio"].sequence.shape[1] == 3 and tables["audio"].present[0]
    assert tables["audio"].sequence[0, 0, 0] == 0.0 and np.isfinite(tables["audio"].sequence).all()
    _, _, _, tables = _run(tmp_path, exp.pickle_path, nonfinite="missing")
    assert tables["audio"].failure_reason[0] == "non_finite_features"


def _mutated(tmp_path, mutate, name="unaligned_50.pkl"):
    exp = write_mmsa(tmp_path / name)
    data = pickle.loads(exp.pickle_path.read_bytes())
    mutate(data)
    exp.pickle_path.write_bytes(pickle.dumps(data, protocol=4))
    return exp.pickle_path


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: d.pop("valid"), "dict with keys \\['train', 'valid', 'test'\\]"),
        (lambda d: d["train"].pop("vision"), "missing keys \\['vision'\\]"),
        (lambda d: d["test"].update(text_bert=np.zeros((6, 3, 6))) or d["test"].pop("text"), "only 'text_bert'"),
        (lambda d: d["train"].update(audio=d["train"]["audio"][:-1]), "'audio' has 11 rows but 'id' has 12"),
        (lambda d: d["valid"].update(vision=d["valid"]["vision"][:, :, :2]), "vision feature width differs"),
        (lambda d: d["train"].update(audio_lengths=np.full(12, 99)), "outside \\[0, T=9\\]"),
        (lambda d: d["train"].update(regression_labels=np.full(12, 5.0)), "expected a value in \\[-3, 3\\]"),
        (lambda d: d["test"].update(id=d["train"]["id"][:6]), "appears in both train and test"),
    ],
)
def test_layout_errors(tmp_path, mutate, message):
    path = _mutated(tmp_path, mutate)
    with pytest.raises(ValueError, match=message) as err:
        _run(tmp_path, path)
    assert str(path) in str(err.value)


def test_aligned_needs_equal_lengths(tmp_path):
    path = _mutated(tmp_path, lambda d: None, name="aligned_50.pkl")
    with pytest.raises(ValueError, match="aligned data must have the same T"):
        _run(tmp_path, path)


def test_malicious_mmsa_pickle_is_refused(tmp_path):
    marker = tmp_path / "marker"
    path = write_malicious(tmp_path / "unaligned_50.pkl", marker)
    with pytest.raises(ValueError, match="refused to load '(posix|os).system'"):
        _run(tmp_path, path)
    assert not marker.exists()


def test_classification_dataset_is_rejected_for_mmsa(tmp_path):
    with pytest.raises(ValueError, match="not available in that format"):
        ImportConfig.from_params({"format": "mmsa", "dataset": "iemocap4", "pickle_path": "x"})
    with pytest.raises(KeyError, match="unknown keys \\['pickle'\\]"):
        ImportConfig.from_params({"format": "mmsa", "dataset": "mosi", "pickle": "x"})


def _spy_spill(monkeypatch) -> list:
    """Spill every array (threshold 0) and record each spill folder with the arrays read from it."""
    monkeypatch.setattr(safe_pickle, "SPILL_BYTES", 0)
    seen: list = []
    real = mmsa.read_mmsa

    def spy(*args, spill_dir=None, **kw):
        splits = real(*args, spill_dir=spill_dir, **kw)
        seen.append((spill_dir, sorted(p.name for p in spill_dir.iterdir()), [a for s in splits for a in s.arrays.values()]))
        return splits

    monkeypatch.setattr(mmsa, "read_mmsa", spy)
    return seen


@pytest.mark.parametrize("with_lengths", [True, False])
def test_spilled_import_matches_in_memory_import(tmp_path, monkeypatch, with_lengths):
    exp = write_mmsa(tmp_path / "unaligned_50.pkl", with_lengths=with_lengths)
    _, _, _, plain = _run(tmp_path / "plain", exp.pickle_path)  # fixture arrays are far below 1 MiB: nothing spills
    seen = _spy_spill(monkeypatch)
    _, manifest, _, spilled = _run(tmp_path / "spilled", exp.pickle_path)
    (spill_dir, files, arrays), = seen
    assert spill_dir.parent == tmp_path / "spilled" / "out" / "features" and spill_dir.name.startswith(".mmsa-spill-")
    assert len(files) >= 9 and all(isinstance(a, np.memmap) and not a.flags.writeable for a in arrays)
    assert not spill_dir.exists()
    assert sorted(p.name for p in spill_dir.parent.iterdir()) == sorted(f"{t}.arrow" for t in TABLES.values())
    for m in TABLES:
        a, b = plain[m], spilled[m]
        assert a.failure_reason == b.failure_reason and a.content_hash == b.content_hash
        np.testing.assert_array_equal(a.length, b.length)
        np.testing.assert_array_equal(np.asarray(a.sequence[:]), np.asarray(b.sequence[:]))
        np.testing.assert_array_equal(a.summary, b.summary)


def test_spill_folder_is_removed_when_the_import_fails(tmp_path, monkeypatch):
    path = _mutated(tmp_path, lambda d: d["train"].update(regression_labels=np.full(12, 5.0)))
    monkeypatch.setattr(safe_pickle, "SPILL_BYTES", 0)
    spills = []
    real = safe_pickle.load_pickle

    def record(*args, spill_dir=None, **kw):
        obj = real(*args, spill_dir=spill_dir, **kw)
        spills.append((spill_dir, len(list(spill_dir.iterdir()))))
        return obj

    monkeypatch.setattr(mmsa, "load_pickle", record)
    with pytest.raises(ValueError, match="expected a value in"):
        _run(tmp_path, path)
    (spill_dir, count), = spills
    assert count >= 9 and not spill_dir.exists()
    assert not [p for p in (tmp_path / "out" / "features").iterdir() if p.name.startswith(".")]


def test_release_pages_keeps_data_readable(tmp_path):
    arr = np.arange(600_000, dtype=np.float32).reshape(100, 6000)
    np.save(tmp_path / "a.npy", arr)
    mapped = np.load(tmp_path / "a.npy", mmap_mode="r")
    assert float(mapped[50, 10]) == arr[50, 10]
    mmsa.release_pages(mapped[10:20])  # a view unmaps its whole file's pages
    mmsa.release_pages(arr)  # in memory: nothing to do
    np.testing.assert_array_equal(mapped, arr)
