"""Stage `splits`: independence of splits, seeded stored masks, natural presence."""
from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.core.modalities import MODALITY_ORDER, TABLE_NAME
from pipeline.formats.feature_table import read_feature_table
from pipeline.formats.manifest import read_manifest
from pipeline.splits import build_splits, random_missing_masks, read_assignment, read_random_masks
from tests.factories import make_feature_dataset


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("ds")
    manifest, features = make_feature_dataset(root, n=180, sessions=5, missing_share=0.2, seed=3, split_column=True)
    return root, manifest, features


def _groups(manifest_path, column):
    table, _ = read_manifest(manifest_path)
    return np.asarray(table.column(column).to_pylist())


@pytest.mark.parametrize("params", [
    {"strategy": "by_session"},
    {"strategy": "by_speaker"},
    {"strategy": "loso", "fold": 0},
    {"strategy": "loso", "fold": 3},
    {"strategy": "manifest"},
])
def test_no_speaker_or_session_in_two_splits(dataset, tmp_path, params):
    _, manifest, features = dataset
    summary = build_splits(manifest, features, tmp_path, {"seed": 1, **params})
    ids, split = read_assignment(tmp_path)
    speakers = _groups(manifest, "speaker")
    for s in np.unique(speakers):
        assert len(set(split[speakers == s])) == 1, f"speaker {s} in several splits"
    if params["strategy"] != "by_speaker":
        sessions = _groups(manifest, "session")
        for s in np.unique(sessions):
            assert len(set(split[sessions == s])) == 1
    assert set(split) == {"train", "val", "test"}
    assert sum(summary["counts"][s]["n"] for s in ("train", "val", "test")) == len(ids)


def test_loso_fold_holds_out_that_session_and_val_is_another(dataset, tmp_path):
    _, manifest, features = dataset
    sessions = _groups(manifest, "session")
    names = sorted(set(sessions))
    for fold in range(len(names)):
        build_splits(manifest, features, tmp_path, {"seed": 1, "strategy": "loso", "fold": fold})
        _, split = read_assignment(tmp_path)
        assert set(sessions[split == "test"]) == {names[fold]}
        assert len(set(sessions[split == "val"])) == 1 and names[fold] not in set(sessions[split == "val"])


def test_default_by_session_holds_out_last_two_sessions(dataset, tmp_path):
    _, manifest, features = dataset
    summary = build_splits(manifest, features, tmp_path, {"seed": 1})
    assert summary["groups"]["test"] == ["Ses05"] and summary["groups"]["val"] == ["Ses04"]


def test_manifest_strategy_needs_split_column(tmp_path):
    manifest, features = make_feature_dataset(tmp_path / "d", n=40, seed=1)
    with pytest.raises(ValueError, match="split"):
        build_splits(manifest, features, tmp_path / "s", {"strategy": "manifest"})


def test_deterministic_per_seed_and_seed_matters(dataset, tmp_path):
    _, manifest, features = dataset
    a = build_splits(manifest, features, tmp_path / "a", {"seed": 11})
    b = build_splits(manifest, features, tmp_path / "b", {"seed": 11})
    c = build_splits(manifest, features, tmp_path / "c", {"seed": 12})
    assert a["content_hash"] == b["content_hash"] != c["content_hash"]
    ma, mc = read_random_masks(tmp_path / "a", "test"), read_random_masks(tmp_path / "c", "test")
    assert not np.array_equal(ma[0.3][1], mc[0.3][1])
    assert pq.read_table(tmp_path / "a" / "random_masks.parquet").equals(pq.read_table(tmp_path / "b" / "random_masks.parquet"))


@pytest.mark.parametrize("n", [1, 7, 60, 301])
def test_masks_never_all_missing_and_hit_the_rate(n):
    rates = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7]
    masks = random_missing_masks(n, rates, np.random.default_rng(5))
    previous = np.ones((n, 3), dtype=bool)
    for mr in rates:
        mask = masks[mr]
        assert mask.shape == (n, 3)
        assert mask.any(axis=1).all(), "a sample lost all three modalities"
        expected = min(round(mr * 3 * n), 2 * n)
        assert (~mask).sum() == expected
        assert not (mask & ~previous).any(), "masks are not nested across MR"
        previous = mask


def test_stored_masks_cover_val_and_test_with_recorded_share(dataset, tmp_path):
    _, manifest, features = dataset
    summary = build_splits(manifest, features, tmp_path, {"seed": 2})
    ids, split = read_assignment(tmp_path)
    for name in ("val", "test"):
        stored = read_random_masks(tmp_path, name)
        assert sorted(stored) == [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7]
        for mr, (mids, mask) in stored.items():
            assert sorted(mids) == sorted(ids[split == name])
            share = 1.0 - mask.mean()
            assert abs(share - min(mr, 2 / 3)) <= 1.0 / (3 * len(mids)) + 1e-9
            assert summary["realised_missing_share"][name][f"{mr:.1f}"] == pytest.approx(share)
    assert len(read_random_masks(tmp_path, "train")) == 0


def test_stored_masks_are_read_not_redrawn(dataset, tmp_path):
    _, manifest, features = dataset
    build_splits(manifest, features, tmp_path, {"seed": 2})
    path = tmp_path / "random_masks.parquet"
    table = pq.read_table(path)
    flipped = pa.array(~table.column("a").to_numpy(zero_copy_only=False))
    pq.write_table(table.set_column(table.column_names.index("a"), "a", flipped), path)
    stored = read_random_masks(tmp_path, "test")
    sel = np.asarray(table.column("split").to_pylist()) == "test"
    mr = table.column("mr").to_numpy()[sel]
    assert np.array_equal(stored[0.2][1][:, 0], ~table.column("a").to_numpy(zero_copy_only=False)[sel][mr == 0.2])


def test_natural_presence_matches_feature_tables(dataset, tmp_path):
    _, manifest, features = dataset
    summary = build_splits(manifest, features, tmp_path, {"seed": 2})
    natural = pq.read_table(tmp_path / "natural.parquet")
    for m in MODALITY_ORDER:
        table = read_feature_table(features / f"{TABLE_NAME[m]}.arrow")
        assert np.array_equal(natural.column(m).to_numpy(zero_copy_only=False), table.present)
        assert summary["inputs"]["features"][m]["config_hash"] == table.meta["config_hash"]
    assert not (natural.column("a").to_numpy(zero_copy_only=False) & True).all()  # some rows really missing
    recorded = json.loads((tmp_path / "splits.json").read_text())
    assert recorded["seed"] == 2 and recorded["strategy"] == "by_session"


# ---------------------------------------------------------------- domains (shifted rows for adaptation)
@pytest.fixture(scope="module")
def shifted_dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("shifted")
    manifest, features = make_feature_dataset(root, n=180, sessions=5, missing_share=0.2, seed=3, shifted=60)
    return root, manifest, features


@pytest.mark.parametrize("params", [{"strategy": "by_session"}, {"strategy": "by_speaker"},
                                    {"strategy": "loso", "fold": 1}])
def test_shifted_rows_never_reach_train_val_test(shifted_dataset, tmp_path, params):
    from pipeline.splits import SHIFTED_SPLITS, SPLITS, row_domains

    _, manifest, features = shifted_dataset
    summary = build_splits(manifest, features, tmp_path, {"seed": 1, **params})
    _, split = read_assignment(tmp_path)
    domain = row_domains(read_manifest(manifest)[0])
    assert set(split[domain == "shifted"]) == set(SHIFTED_SPLITS)
    assert set(split[domain == "source"]) == set(SPLITS)
    speakers = _groups(manifest, "speaker")
    assert not set(speakers[split == "shifted_adapt"]) & set(speakers[split == "shifted_test"])
    assert summary["domains"] == {"shifted": {"shifted_adapt": 30, "shifted_test": 30},
                                  "source": {s: summary["counts"][s]["n"] for s in SPLITS}}
    assert summary["groups"]["shifted_adapt"] == ["Shf01"] and summary["groups"]["shifted_test"] == ["Shf02"]


def test_shifted_rows_leave_source_splits_and_masks_unchanged(shifted_dataset, tmp_path):
    """The source rows of a shifted corpus split exactly as the same corpus without shifted rows."""
    root, manifest, features = shifted_dataset
    plain_manifest, plain_features = make_feature_dataset(root / "plain", n=180, sessions=5, missing_share=0.2, seed=3)
    build_splits(manifest, features, tmp_path / "s", {"seed": 1})
    build_splits(plain_manifest, plain_features, tmp_path / "p", {"seed": 1})
    ids_s, split_s = read_assignment(tmp_path / "s")
    ids_p, split_p = read_assignment(tmp_path / "p")
    assert list(ids_s[: len(ids_p)]) == list(ids_p) and list(split_s[: len(ids_p)]) == list(split_p)
    for name in ("val", "test"):
        got, want = read_random_masks(tmp_path / "s", name), read_random_masks(tmp_path / "p", name)
        assert all((got[mr][1] == want[mr][1]).all() and list(got[mr][0]) == list(want[mr][0]) for mr in want)
    shifted_masks = read_random_masks(tmp_path / "s", "shifted_test")
    assert len(shifted_masks) == 8 and all(len(ids) == 30 for ids, _ in shifted_masks.values())
    assert all(mask.any(axis=1).all() for _, mask in shifted_masks.values())


def test_one_shifted_session_is_split_by_speaker(tmp_path):
    manifest, features = make_feature_dataset(tmp_path / "d", n=100, seed=2, shifted=40, shifted_sessions=1)
    summary = build_splits(manifest, features, tmp_path / "s", {"seed": 1})
    _, split = read_assignment(tmp_path / "s")
    speakers = _groups(manifest, "speaker")
    assert set(speakers[split == "shifted_adapt"]) and set(speakers[split == "shifted_test"])
    assert not set(speakers[split == "shifted_adapt"]) & set(speakers[split == "shifted_test"])
    assert summary["counts"]["shifted_adapt"]["n"] + summary["counts"]["shifted_test"]["n"] == 40


def test_domain_guard_raises_on_a_leaked_row():
    from pipeline.splits import check_domain_separation

    domain = np.array(["source", "shifted", "shifted"], dtype=object)
    check_domain_separation(domain, np.array(["train", "shifted_adapt", "shifted_test"]))
    with pytest.raises(ValueError, match="shifted-domain rows are assigned to train/val/test"):
        check_domain_separation(domain, np.array(["train", "train", "shifted_test"]))
    with pytest.raises(ValueError, match="source-domain rows"):
        check_domain_separation(domain, np.array(["shifted_test", "shifted_adapt", "shifted_test"]))


def test_training_views_hold_no_shifted_row(shifted_dataset, tmp_path):
    from pipeline.training.data import MultimodalData

    _, manifest, features = shifted_dataset
    build_splits(manifest, features, tmp_path, {"seed": 1})
    for include in (("train", "val"), ("train", "val", "test")):
        data = MultimodalData.load(manifest, features, tmp_path, include=include)
        assert not any(u.startswith("s") for u in data.utterance_id.tolist())
        assert set(data.split) <= {"train", "val", "test"}
