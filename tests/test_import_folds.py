"""IEMOCAP leave-one-session-out: fold construction on imported data and fold aggregation."""
from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from flows.folds import aggregate, main as folds_main, run_folds
from pipeline.importers.stage import ImportConfig, import_dataset
from tests.import_fixtures import write_gcnet_iemocap

splits = pytest.importorskip("pipeline.splits", reason="pipeline/splits.py not yet available")


def _import(tmp_path, sessions=5):
    exp = write_gcnet_iemocap(tmp_path / "iemocap", sessions=sessions, dialogues=2)
    cfg = ImportConfig(format="gcnet", dataset="iemocap4", label_path=str(exp.label_path),
                       feature_dirs={m: str(p) for m, p in exp.feature_dirs.items()})
    import_dataset(cfg, tmp_path / "manifest.parquet", tmp_path / "features")
    return exp


def test_five_loso_folds_hold_out_each_session_once(tmp_path):
    exp = _import(tmp_path)
    tested = []
    for fold in range(5):
        out = splits.build_splits(tmp_path / "manifest.parquet", tmp_path / "features", tmp_path / f"s{fold}",
                                  {"strategy": "loso", "fold": fold, "seed": 0, "missing_rates": [0.0]})
        groups = out["groups"]
        assert len(groups["test"]) == 1 and groups["val"] and groups["train"]
        assert not set(groups["test"]) & (set(groups["train"]) | set(groups["val"]))
        assert out["speakers_in_several_splits"] == []  # speaker ids are session-scoped ("Ses01_F")
        tested += groups["test"]
    assert sorted(tested) == sorted(set(exp.session.values()))


def test_aggregate_mean_std_and_incomplete(tmp_path):
    rng = np.random.default_rng(3)
    values = rng.random((5, 2))
    files = []
    for k in range(5):
        metrics = {"test": {"fixed": {"at": {"wa": values[k, 0], "ua": values[k, 1]}}}, "note": "x", "flag": True}
        if k != 2:
            metrics["test"]["fixed"]["a"] = {"wa": 0.5}
        path = tmp_path / f"fold{k}" / "metrics.json"
        path.parent.mkdir()
        path.write_text(json.dumps(metrics))
        files.append(path)
    result = aggregate(files)
    assert result["n_folds"] == 5
    assert result["mean"]["test"]["fixed"]["at"]["wa"] == pytest.approx(values[:, 0].mean())
    assert result["std"]["test"]["fixed"]["at"]["ua"] == pytest.approx(values[:, 1].std())
    assert result["incomplete"] == ["test/fixed/a/wa"] and "flag" not in result["mean"]
    assert folds_main(["aggregate", *map(str, files), "--out", str(tmp_path / "mean.json")]) == 0
    assert json.loads((tmp_path / "mean.json").read_text())["mean"] == result["mean"]
    with pytest.raises(FileNotFoundError, match="fold9"):
        aggregate([tmp_path / "fold9" / "metrics.json"])


@pytest.mark.slow
def test_run_folds_end_to_end(tmp_path):
    pytest.importorskip("pipeline.train", reason="pipeline/train.py not yet available")
    _import(tmp_path, sessions=4)
    paths = {"manifest": str(tmp_path / "manifest.parquet"), "features_dir": str(tmp_path / "features"),
             "splits_dir": str(tmp_path / "splits")}
    params = {
        "splits": {**paths, "out_dir": paths["splits_dir"], "seed": 0, "missing_rates": [0.0]},
        "train": {**paths, "out_dir": str(tmp_path), "max_epochs": 1, "batch_size": 8, "mlflow": {"enabled": False},
                  "model": {"d_model": 16, "n_heads": 2, "d_fusion": 16}, "lora": {"rank": 2}, "dpft": {"monitor_size": 16}},
        "evaluate": {**paths, "model": str(tmp_path / "models" / "model.pt"), "metrics": str(tmp_path / "reports" / "metrics.json"),
                     "plots_dir": str(tmp_path / "reports" / "plots"), "log_mlflow": False},
    }
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    result = run_folds([0, 1], tmp_path / "loso", tmp_path / "params.yaml")
    assert result["n_folds"] == 2 and (tmp_path / "loso" / "fold1" / "metrics.json").exists()
    per_fold = [json.loads((tmp_path / "loso" / f"fold{k}" / "metrics.json").read_text()) for k in (0, 1)]
    wa = [f["test"]["fixed"]["atv"]["wa"] for f in per_fold]
    assert result["mean"]["test"]["fixed"]["atv"]["wa"] == pytest.approx(np.mean(wa))
