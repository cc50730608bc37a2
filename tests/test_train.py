"""Stage `train`: learns, is deterministic, never reads test rows, tracks to a real MLflow store."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pipeline.core.modalities import COMBINATIONS, MODALITY_ORDER
from pipeline.training.data import MultimodalData
from pipeline.methods import load_model
from pipeline.splits import build_splits
from tests.factories import make_feature_dataset
from pipeline.train import train_model

FAST = {"seed": 5, "max_epochs": 4, "patience": 4, "batch_size": 32, "lr": 3e-3,
        "model": {"d_model": 32, "d_fusion": 64, "n_heads": 4}, "dpft": {"monitor_size": 64}}


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    manifest, features = make_feature_dataset(root, n=200, missing_share=0.15, seed=8,
                                              signal={"a": 0.5, "t": 0.6, "v": 0.4})
    build_splits(manifest, features, root / "splits", {"seed": 1})
    return manifest, features, root / "splits"


def _load(paths, include=("train", "val")):
    return MultimodalData.load(*paths, include=include)


def test_end_to_end_beats_chance_and_writes_outputs(paths, tmp_path):
    summary = train_model(_load(paths), FAST, tmp_path)
    assert summary["best_val_mean"] > 0.25 + 0.2  # 4 balanced-ish classes: chance ~0.25
    assert set(summary["best_val"]) == set(COMBINATIONS)
    model, extra = load_model(tmp_path / "models" / "model.pt")
    assert extra["classes"] == [f"class{k}" for k in range(4)] and extra["best_epoch"] == summary["best_epoch"]
    assert set(extra["feature_config_hashes"]) == set(MODALITY_ORDER)
    history = json.loads((tmp_path / "reports" / "train_history.json").read_text())
    assert len(history) == summary["epochs_run"]
    for entry in history:
        assert all(f"val/wa/{c}" in entry and f"dpft/q/{c}" in entry and f"dpft/sep/{c}" in entry for c in COMBINATIONS)
        assert sum(entry[f"dpft/q/{c}"] for c in COMBINATIONS) == pytest.approx(1.0)
    assert max(h["val/wa/mean"] for h in history) == pytest.approx(summary["best_val_mean"])
    q_csv = (tmp_path / "reports" / "plots" / "dpft_q.csv").read_text().splitlines()
    assert q_csv[0] == "epoch,stage," + ",".join(COMBINATIONS) and len(q_csv) == len(history) + 1
    # the saved weights are the selected epoch's, not the last epoch's, whenever those differ
    assert summary["best_epoch"] <= summary["epochs_run"] - 1


def test_deterministic_on_cpu(paths, tmp_path):
    params = {**FAST, "max_epochs": 2}
    a = train_model(_load(paths), params, tmp_path / "a")
    b = train_model(_load(paths), params, tmp_path / "b")
    ha = json.loads((tmp_path / "a" / "reports" / "train_history.json").read_text())
    hb = json.loads((tmp_path / "b" / "reports" / "train_history.json").read_text())
    keys = [k for k in ha[0] if k.startswith(("val/", "dpft/", "train/"))]
    assert keys and all(x[k] == y[k] for x, y in zip(ha, hb) for k in keys)
    ma, _ = load_model(tmp_path / "a" / "models" / "model.pt")
    mb, _ = load_model(tmp_path / "b" / "models" / "model.pt")
    assert all(torch.equal(x, y) for x, y in zip(ma.state_dict().values(), mb.state_dict().values()))
    assert a["q_history"] == b["q_history"]


class _Recorder(np.ndarray):
    """ndarray that records which first-axis rows are read through indexing."""

    log: set = set()

    def __getitem__(self, key):
        k = key[0] if isinstance(key, tuple) else key
        if isinstance(k, np.ndarray) and k.dtype == bool:
            _Recorder.log.update(np.flatnonzero(k).tolist())
        elif isinstance(k, (np.ndarray, list)):
            _Recorder.log.update(np.asarray(k).ravel().tolist())
        elif isinstance(k, (int, np.integer)):
            _Recorder.log.add(int(k))
        else:
            _Recorder.log.add(f"unbounded:{type(k).__name__}")
        return np.asarray(super().__getitem__(key))


def test_training_never_reads_test_rows(paths, tmp_path):
    data = _load(paths, include=("train", "val", "test"))  # the full data, test rows included
    test_pos = set(np.flatnonzero(data.split == "test").tolist())
    test_rows = {m: set(data.rows[m][sorted(test_pos)].tolist()) - {-1} for m in MODALITY_ORDER}
    _Recorder.log = shared = set()  # feature reads log table rows, target reads aligned positions
    for m in MODALITY_ORDER:
        data.features[m] = data.features[m].view(_Recorder)
    data.target = data.target.view(_Recorder)
    train_model(data, {**FAST, "max_epochs": 1}, tmp_path)
    assert shared, "instrumentation saw no reads"
    assert not any(isinstance(x, str) for x in shared), "an unbounded slice of features/targets was read"
    # in this dataset the table rows and the aligned positions coincide, so one log checks both
    assert all(np.array_equal(data.rows[m], np.arange(len(data))) for m in MODALITY_ORDER)
    assert not (shared & test_pos), f"test rows read: {sorted(shared & test_pos)[:5]}"
    assert all(not (shared & test_rows[m]) for m in MODALITY_ORDER)


def test_two_stage_and_plain_variants_run(paths, tmp_path):
    two = train_model(_load(paths), {**FAST, "regime": "two_stage", "stage1_epochs": 1, "max_epochs": 1}, tmp_path / "t")
    stage2 = two["parameter_counts"]["main"]
    assert stage2["trainable"] < stage2["total"] and stage2["trainable"] >= stage2["adapters"]
    assert two["parameter_counts"]["stage1"]["trainable"] == two["parameter_counts"]["stage1"]["base"]
    plain = train_model(_load(paths), {**FAST, "variant": "plain", "max_epochs": 1}, tmp_path / "p")
    assert plain["parameter_counts"]["main"]["adapters"] == 0 and plain["final_q"] is None


def test_regression_task_trains(tmp_path):
    manifest, features = make_feature_dataset(tmp_path / "d", n=120, task="regression", seed=2)
    build_splits(manifest, features, tmp_path / "s", {"seed": 1})
    data = MultimodalData.load(manifest, features, tmp_path / "s", include=("train", "val"))
    summary = train_model(data, {**FAST, "max_epochs": 2}, tmp_path / "o")
    assert summary["monitor"] == "val/acc2/mean" and 0.0 <= summary["best_val_mean"] <= 1.0


def test_mlflow_run_has_per_epoch_metrics(paths, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    from pipeline.tracking.runs import start_run

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow_p = {"tracking_uri": uri, "experiment": "imer-test", "artifact_root": str(tmp_path / "mlartifacts")}
    data = _load(paths)
    params = {**FAST, "max_epochs": 2, "mlflow": mlflow_p}
    tracking = start_run(mlflow_p, params, data.provenance)
    summary = train_model(data, params, tmp_path, tracking)
    tracking.end()
    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(summary["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["model.d_model"] == "32" and run.data.params["max_epochs"] == "2"
    assert run.data.tags["imer.splits_hash"] == data.provenance["splits_hash"]
    assert run.data.tags["imer.features.a.config_hash"] == data.feature_meta["a"]["config_hash"]
    for c in COMBINATIONS:
        for key in (f"val/wa/{c}", f"dpft/q/{c}", f"dpft/sep/{c}"):
            steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
            assert sorted(steps) == list(range(summary["epochs_run"])), key
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "train")}
    assert "train/train_summary.json" in artifacts


def test_config_defaults_are_the_params_yaml_values():
    """One home per default: params.yaml shows every key of TrainConfig with the dataclass's value."""
    from pipeline.core.params import load_params
    from pipeline.training.config import OPTION_SECTIONS, TrainConfig

    section = load_params("train")
    free = {name: {} for name in OPTION_SECTIONS}  # free-form option sections: their owners' tests check them
    assert TrainConfig.from_params({**section, **free}).to_dict() == TrainConfig().to_dict()
    flat = set(TrainConfig().to_dict()) - set(section)
    assert not flat, f"params.yaml train section lacks {sorted(flat)}"
    with pytest.raises(ValueError, match="train.lrr"):
        TrainConfig.from_params({"lrr": 0.1})
    with pytest.raises(ValueError, match="train.model.d_modle"):
        TrainConfig.from_params({"model": {"d_modle": 3}})


def test_test_rows_in_training_raise_a_clear_error(paths, tmp_path, monkeypatch):
    """The leak guard is an exception (an assert would vanish under python -O)."""
    from pipeline.training.loop import TestRowsInTraining

    data = _load(paths, include=("train", "val", "test"))
    monkeypatch.setattr(MultimodalData, "subset", lambda self, split: self)  # a view that leaks every row
    with pytest.raises(TestRowsInTraining, match="include=\\('train', 'val'\\)"):
        train_model(data, FAST, tmp_path)


def test_mae_selection_keeps_the_lowest_error_epoch(tmp_path):
    """With a lower-is-better selection metric the checkpoint, early stopping and summary take the minimum."""
    manifest, features = make_feature_dataset(tmp_path / "d", n=120, task="regression", seed=2)
    build_splits(manifest, features, tmp_path / "s", {"seed": 1})
    data = MultimodalData.load(manifest, features, tmp_path / "s", include=("train", "val"))
    summary = train_model(data, {**FAST, "max_epochs": 4, "selection_metric": "mae", "lr": 3e-2}, tmp_path / "o")
    history = json.loads((tmp_path / "o" / "reports" / "train_history.json").read_text())
    maes = [h["val/mae/mean"] for h in history]
    assert len(set(maes)) > 1, "the epochs must differ for the test to mean anything"
    assert summary["monitor"] == "val/mae/mean" and summary["best_val_mean"] == min(maes)
    assert history[summary["best_epoch"]]["val/mae/mean"] == min(maes)


@pytest.mark.parametrize("modalities", [("t",), ("a", "t")])
def test_dataset_without_some_modalities_trains_and_reports_only_formable_combinations(tmp_path, modalities):
    from pipeline.core.modalities import formable_combinations
    from pipeline.evaluate import evaluate_model

    manifest, features = make_feature_dataset(tmp_path / "d", n=160, seed=3, modalities=modalities)
    build_splits(manifest, features, tmp_path / "s", {"seed": 1})
    data = MultimodalData.load(manifest, features, tmp_path / "s", include=("train", "val"))
    summary = train_model(data, {**FAST, "max_epochs": 2}, tmp_path / "o")
    formable = formable_combinations(modalities)
    assert summary["combinations"] == list(formable) and summary["modalities"] == list(modalities)
    assert set(summary["best_val"]) == set(formable)
    history = json.loads((tmp_path / "o" / "reports" / "train_history.json").read_text())
    for h in history:  # only formable combinations are scored, drawn and averaged
        assert {k.split("/")[2] for k in h if k.startswith("val/wa/")} == set(formable) | {"mean"}
        assert h["val/wa/mean"] == pytest.approx(np.mean([h[f"val/wa/{c}"] for c in formable]))
        assert all(c in formable for c, k in ((k.split("/")[2], v) for k, v in h.items()
                                              if k.startswith("train/draws/")) if k)
    model, extra = load_model(tmp_path / "o" / "models" / "model.pt")
    assert model.config.modalities == modalities and extra["combinations"] == list(formable)
    full = MultimodalData.load(manifest, features, tmp_path / "s")
    metrics = evaluate_model(tmp_path / "o" / "models" / "model.pt", full, tmp_path / "s")["metrics"]
    assert metrics["combinations"] == list(formable)
    for c in COMBINATIONS:
        entry = metrics["test"]["fixed"][c]
        assert ("wa" in entry) == (c in formable) and (c in formable or entry == {"applicable": False})
    assert metrics["test"]["fixed"]["mean"]["wa"] == pytest.approx(
        np.mean([metrics["test"]["fixed"][c]["wa"] for c in formable]))
