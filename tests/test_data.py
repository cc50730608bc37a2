"""Data layer and samplers: alignment, masks, homogeneous batches, q proportions."""
from __future__ import annotations

import numpy as np
import pytest

from pipeline.core.modalities import COMBINATIONS, MASKS, MODALITY_ORDER, TABLE_NAME
from pipeline.training.data import MultimodalData
from pipeline.formats.feature_table import read_feature_table, write_feature_table
from pipeline.training.samplers import BatchDataset, HomogeneousBatchSampler, ModalityDropoutSampler
from pipeline.splits import build_splits
from tests.factories import make_feature_dataset


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    manifest, features = make_feature_dataset(root, n=150, missing_share=0.25, seed=4)
    # Store the visual table in a shuffled row order: alignment must go by utterance_id.
    table = read_feature_table(features / "visual.arrow", memory_map=False)
    perm = np.random.default_rng(0).permutation(len(table))
    table.utterance_id, table.present, table.length = table.utterance_id[perm], table.present[perm], table.length[perm]
    table.failure_reason = [table.failure_reason[i] for i in perm]
    table.sequence, table.summary = table.sequence[perm], table.summary[perm]
    table.content_hash = [table.content_hash[i] for i in perm]
    write_feature_table(features / "visual.arrow", table)
    build_splits(manifest, features, root / "splits", {"seed": 1})
    return manifest, features, root / "splits"


def test_batch_is_aligned_by_utterance_id(paths):
    manifest, features, splits = paths
    data = MultimodalData.load(manifest, features, splits)
    local = np.arange(0, len(data), 7)
    batch = data.batch(local)
    for j, m in enumerate(MODALITY_ORDER):
        table = read_feature_table(features / f"{TABLE_NAME[m]}.arrow")
        index = table.index()
        rows = [index[u] for u in data.utterance_id[local]]
        expected = table.sequence[rows] * table.present[rows][:, None, None]
        assert np.array_equal(batch["features"][m].numpy(), expected)
        assert np.array_equal(batch["mask"][:, j].numpy(), table.present[rows])
        assert np.array_equal(batch["lengths"][m].numpy(), np.where(table.present[rows], table.length[rows], 0))
    assert batch["target"].dtype.is_floating_point is False and int(batch["target"].max()) < 4


def test_features_stay_memory_mapped(paths):
    manifest, features, splits = paths
    data = MultimodalData.load(manifest, features, splits)
    for m in MODALITY_ORDER:
        assert not data.features[m].flags.owndata  # a view onto the mapped file, not a copy


def test_combination_batch_masks_and_skips_absent_modalities(paths):
    manifest, features, splits = paths
    data = MultimodalData.load(manifest, features, splits).subset("train")
    local = np.arange(40)
    for c, name in enumerate(COMBINATIONS):
        batch = data.batch(local, combination=c)
        expected = data.view_natural()[local] & MASKS[c]
        assert np.array_equal(batch["mask"].numpy(), expected)
        assert batch["combination"] == c
        for j, m in enumerate(MODALITY_ORDER):
            if m not in name:
                assert not batch["features"][m].any() and not batch["lengths"][m].any()


def test_include_excludes_test_rows(paths):
    manifest, features, splits = paths
    full = MultimodalData.load(manifest, features, splits)
    part = MultimodalData.load(manifest, features, splits, include=("train", "val"))
    assert "test" not in set(part.split)
    assert len(part) == len(full.subset(["train", "val"])) < len(full)


def test_unknown_label_is_a_clear_error(tmp_path):
    import pyarrow as pa

    from pipeline.formats.manifest import read_manifest, write_manifest

    manifest, features = make_feature_dataset(tmp_path, n=30, seed=1)
    table, meta = read_manifest(manifest)
    labels = table.column("label").to_pylist()
    labels[0] = "bored"
    write_manifest(table.set_column(table.column_names.index("label"), "label", pa.array(labels)), manifest, meta)
    build_splits(manifest, features, tmp_path / "s", {"seed": 1})
    with pytest.raises(ValueError, match="bored"):
        MultimodalData.load(manifest, features, tmp_path / "s")


def test_homogeneous_batches_cover_their_combination(paths):
    manifest, features, splits = paths
    train = MultimodalData.load(manifest, features, splits).subset("train")
    sampler = HomogeneousBatchSampler(train.view_natural(), batch_size=16, seed=3)
    dataset = BatchDataset(train)
    for key in sampler:
        batch = dataset[key]
        required = MASKS[key.combination]
        assert (batch["natural"].numpy() | ~required).all(), "a sample lacks a modality of the batch combination"
        assert np.array_equal(batch["mask"].numpy(), np.broadcast_to(required, batch["mask"].shape))
    assert sum(sampler.last_counts.values()) == len(sampler)


def test_sampler_follows_q_and_is_seeded():
    natural = np.random.default_rng(0).random((400, 3)) > 0.2
    natural[~natural.any(axis=1), 0] = True
    q = np.array([0.05, 0.05, 0.1, 0.1, 0.1, 0.2, 0.4])
    sampler = HomogeneousBatchSampler(natural, batch_size=8, seed=9, batches_per_epoch=500)
    sampler.set_q(q)
    draws = np.concatenate([[k.combination for k in sampler.draw_epoch(e)] for e in range(8)])  # 4000 batches
    freq = np.bincount(draws, minlength=7) / len(draws)
    assert np.abs(freq - q).max() < 0.03
    again = HomogeneousBatchSampler(natural, batch_size=8, seed=9, batches_per_epoch=500)
    again.set_q(q)
    a, b = sampler.draw_epoch(2), again.draw_epoch(2)
    assert all(x.combination == y.combination and np.array_equal(x.index, y.index) for x, y in zip(a, b))


def test_sampler_never_draws_a_combination_nobody_has():
    natural = np.zeros((50, 3), dtype=bool)
    natural[:, :2] = True  # no visual at all
    sampler = HomogeneousBatchSampler(natural, batch_size=8, seed=1, batches_per_epoch=300)
    combos = {COMBINATIONS[k.combination] for k in sampler.draw_epoch(0)}
    assert combos == {"a", "t", "at"}


def test_dropout_sampler_keeps_a_nonempty_subset_of_present():
    natural = np.random.default_rng(1).random((200, 3)) > 0.3
    natural[~natural.any(axis=1), 2] = True
    sampler = ModalityDropoutSampler(natural, batch_size=32, seed=2)
    keys = list(sampler)
    seen = np.concatenate([k.index for k in keys])
    assert sorted(seen) == list(range(200))
    for key in keys:
        assert key.mask.any(axis=1).all()
        assert not (key.mask & ~natural[key.index]).any()
    full = natural.all(axis=1)
    masks = np.concatenate([k.mask for k in keys])[np.argsort(seen)]
    assert len({tuple(m) for m in masks[full]}) == 7  # all 7 subsets occur for complete samples


def test_feature_statistics_use_only_valid_frames_of_the_view(paths):
    """Standardisation statistics: train view only, padding frames and absent modalities ignored."""
    from pipeline.training.data import feature_statistics

    data = MultimodalData.load(*paths)
    assert (data.lengths["a"][data.lengths["a"] > 0] < data.features["a"].shape[1]).any()  # padding exists
    train = data.subset("train")
    stats = feature_statistics(train, chunk=7)  # several chunks
    pos = train._pos()
    for j, m in enumerate(MODALITY_ORDER):
        frames = [np.asarray(data.features[m][data.rows[m][p]])[: data.lengths[m][p]]
                  for p in pos if data.natural[p, j] and data.lengths[m][p] > 0]
        want = np.concatenate(frames).astype(np.float64)
        np.testing.assert_allclose(stats[m][0], want.mean(axis=0), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(stats[m][1], want.std(axis=0), rtol=1e-4, atol=1e-5)
    assert not np.allclose(stats["a"][0], feature_statistics(data.subset("val"))["a"][0])  # view-specific
