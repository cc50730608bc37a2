"""Import -> splits -> train -> evaluate on each fixture format, through the real stage functions."""
from __future__ import annotations

import math

import numpy as np
import pytest

from pipeline.importers.stage import ImportConfig, import_dataset
from tests.import_fixtures import write_gcnet_iemocap, write_gcnet_mosi, write_mmsa

splits = pytest.importorskip("pipeline.splits", reason="pipeline/splits.py not yet available")
train = pytest.importorskip("pipeline.train", reason="pipeline/train.py not yet available")
evaluate = pytest.importorskip("pipeline.evaluate", reason="pipeline/evaluate.py not yet available")
from pipeline.training.data import MultimodalData  # noqa: E402

TINY = {"seed": 0, "max_epochs": 2, "batch_size": 8, "patience": 5, "val_batch_size": 64,
        "model": {"d_model": 16, "n_heads": 2, "d_fusion": 16}, "lora": {"rank": 2, "alpha": 4.0},
        "dpft": {"monitor_size": 16}}


def _pipeline(tmp_path, cfg, split_params):
    out = tmp_path / "run"
    manifest, features = out / "manifest.parquet", out / "features"
    import_dataset(cfg, manifest, features)
    summary = splits.build_splits(manifest, features, out / "splits", {"seed": 0, "missing_rates": [0.0, 0.5], **split_params})
    data = MultimodalData.load(manifest, features, out / "splits", include=("train", "val"))
    trained = train.train_model(data, TINY, out, tracking=None)
    full = MultimodalData.load(manifest, features, out / "splits")
    result = evaluate.evaluate_model(out / "models" / "model.pt", full, out / "splits", batch_size=64)
    return summary, trained, result["metrics"]


def test_iemocap_gcnet_loso_fold(tmp_path):
    exp = write_gcnet_iemocap(tmp_path / "iemocap", sessions=3, dialogues=4)
    cfg = ImportConfig(format="gcnet", dataset="iemocap4", label_path=str(exp.label_path),
                       feature_dirs={m: str(p) for m, p in exp.feature_dirs.items()})
    summary, trained, metrics = _pipeline(tmp_path, cfg, {"strategy": "loso", "fold": 1})
    assert summary["groups"]["test"] == ["Ses02"] and "Ses02" not in summary["groups"]["train"] + summary["groups"]["val"]
    assert trained["n_train"] > 0 and trained["epochs_run"] >= 1
    for c in ("a", "t", "v", "at", "av", "tv", "atv"):
        wa = metrics["test"]["fixed"][c]["wa"]
        assert 0.0 <= wa <= 1.0


@pytest.mark.parametrize("source", ["mmsa", "gcnet"])
def test_mosi_regression_manifest_split(tmp_path, source):
    if source == "mmsa":
        exp = write_mmsa(tmp_path / "unaligned_50.pkl", sizes=(30, 12, 12))
        cfg = ImportConfig(format="mmsa", dataset="mosi", pickle_path=str(exp.pickle_path))
    else:
        exp = write_gcnet_mosi(tmp_path / "mosi", videos=20)
        cfg = ImportConfig(format="gcnet", dataset="mosi", label_path=str(exp.label_path),
                           feature_dirs={m: str(p) for m, p in exp.feature_dirs.items()})
    summary, trained, metrics = _pipeline(tmp_path, cfg, {"strategy": "manifest"})
    assert summary["counts"]["test"]["n"] == sum(1 for s in exp.split.values() if s == "test")
    atv = metrics["test"]["fixed"]["atv"]
    assert {"acc2", "acc7", "mae", "corr"} <= set(atv)
    assert 0.0 <= atv["acc2"] <= 1.0 and 0.0 <= atv["acc7"] <= 1.0 and atv["mae"] >= 0.0
    assert math.isnan(atv["corr"]) or -1.0 <= atv["corr"] <= 1.0
    assert np.isfinite(trained["best_val_mean"])
