"""Stage `adapt` on a tiny synthetic corpus with a shifted domain and a tiny trained model:
lr 0 is the identity, the source file never changes, pool labels are never read, the gate
decides, an accepted model is registered under its own name, and a corpus without shifted
rows is skipped cleanly."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.adaptation.casp import adapt_model
from pipeline.adaptation.config import AdaptConfig
from pipeline.adaptation.pool import LabelReadError, unlabelled
from pipeline.adaptation.run import run_adaptation
from pipeline.core.hashing import file_digest
from pipeline.methods import load_model
from pipeline.splits import build_splits
from pipeline.train import train_model
from pipeline.training.data import MultimodalData
from tests.factories import make_feature_dataset

FAST_TRAIN = {"seed": 5, "max_epochs": 4, "patience": 4, "batch_size": 32, "lr": 3e-3,
              "model": {"d_model": 32, "d_fusion": 64, "n_heads": 4}, "dpft": {"monitor_size": 64}}
FAST_ADAPT = {"contrastive_epochs": 4, "snapshot_every": 2, "pseudo_epochs": 2, "bootstrap": 50, "log_mlflow": False}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapt")
    manifest, features = make_feature_dataset(root, n=200, missing_share=0.15, seed=8, shifted=80,
                                              signal={"a": 0.5, "t": 0.6, "v": 0.4})
    build_splits(manifest, features, root / "splits", {"seed": 1})
    train_model(MultimodalData.load(manifest, features, root / "splits", include=("train", "val")), FAST_TRAIN, root)
    return root, manifest, features


def _cfg(root: Path, manifest, features, out: Path, **over) -> AdaptConfig:
    paths = dict(model=str(root / "models" / "model.pt"), manifest=str(manifest), features_dir=str(features),
                 splits_dir=str(root / "splits"), out_dir=str(out / "adapted"), metrics=str(out / "adapt_metrics.json"),
                 reports_dir=str(out / "adapt"), train_summary=str(root / "models" / "train_summary.json"),
                 registry=str(out / "registry.json"))
    return AdaptConfig.from_params({**paths, **FAST_ADAPT, **over})


def test_lr_zero_is_the_identity_and_the_gate_passes(trained, tmp_path):
    root, manifest, features = trained
    sha = file_digest(root / "models" / "model.pt")
    report = run_adaptation(_cfg(root, manifest, features, tmp_path, lr=0.0))
    assert report["status"] == "accepted" and report["gate"]["accepted"] and report["drift"] == 0.0
    source, _ = load_model(root / "models" / "model.pt")
    adapted, extra = load_model(tmp_path / "adapted" / "shifted" / "model.pt")
    for (name, a), b in zip(adapted.state_dict().items(), source.state_dict().values()):
        assert torch.equal(a, b), name
    assert extra["adapt"]["parent_sha256"] == sha
    for entry in report["shifted_test"]["fixed"].values():
        assert all(v == 0.0 for v in entry["delta"].values())
    assert file_digest(root / "models" / "model.pt") == sha == report["source_checkpoint"]["sha256"]
    saved = json.loads((tmp_path / "adapt_metrics.json").read_text())
    assert saved["status"] == "accepted" and saved["adapted_parameters"] == 384  # 3 encoders x (ln1, ln2) x 2 x 32


def test_casp_adapts_reports_and_keeps_the_source_file(trained, tmp_path):
    root, manifest, features = trained
    sha = file_digest(root / "models" / "model.pt")
    report = run_adaptation(_cfg(root, manifest, features, tmp_path))
    assert file_digest(root / "models" / "model.pt") == sha
    assert report["drift"] > 0 and report["pseudo"]["kept"] >= 1
    assert all(v >= 1 for v in report["pseudo"]["kept_per_class"].values() if v is not None)
    test = report["shifted_test"]
    assert set(test["random"]) == {f"{r / 10:.1f}" for r in range(8)} and "mean" in test["fixed"]
    lo, hi = test["natural"]["delta_ci95"]["wa"]
    assert lo <= test["natural"]["delta"]["wa"] + 1e-9 and hi >= test["natural"]["delta"]["wa"] - 1e-9
    assert "drop_points" in report["source_val"] and report["wall_time_s"] > 0
    snaps = (tmp_path / "adapt" / "snapshots.parquet")
    assert snaps.exists() and (tmp_path / "adapt" / "per_combination.csv").read_text().startswith("protocol,")
    import pyarrow.parquet as pq

    assert sorted(set(pq.read_table(snaps).column("epoch").to_pylist())) == [0, 2, 4]


def test_pool_labels_are_never_read(trained):
    root, manifest, features = trained
    data = MultimodalData.load(manifest, features, root / "splits", include=("shifted_adapt",))
    pool = unlabelled(data)
    with pytest.raises(LabelReadError):
        pool.view_target()
    source, _ = load_model(root / "models" / "model.pt")
    for method in ("casp", "tent", "input_stats"):
        cfg = AdaptConfig.from_params({**FAST_ADAPT, "method": method})
        result = adapt_model(source, pool, cfg)  # would raise LabelReadError on any target read
        assert result.n_parameters > 0


def test_a_failed_gate_rejects_and_saves_nothing(trained, tmp_path):
    root, manifest, features = trained
    report = run_adaptation(_cfg(root, manifest, features, tmp_path, gate={"min_anchor_agreement": 1.01}))
    assert report["status"] == "rejected" and report["gate"]["reasons"]
    assert report["gate"]["reasons"][0].startswith("anchor_agreement")
    assert not (tmp_path / "adapted" / "shifted" / "model.pt").exists()
    assert json.loads((tmp_path / "adapted" / "decision.json").read_text())["status"] == "rejected"


def test_skips_cleanly_without_shifted_rows(tmp_path):
    from pipeline.adapt import run_stage

    manifest, features = make_feature_dataset(tmp_path / "d", n=60, seed=1)
    build_splits(manifest, features, tmp_path / "splits", {"seed": 1})
    out = run_stage({"manifest": str(manifest), "features_dir": str(features), "splits_dir": str(tmp_path / "splits"),
                     "model": str(tmp_path / "absent.pt"), "out_dir": str(tmp_path / "adapted"),
                     "metrics": str(tmp_path / "adapt_metrics.json"), "reports_dir": str(tmp_path / "adapt")})
    assert out["status"] == "skipped"
    assert json.loads((tmp_path / "adapt_metrics.json").read_text())["status"] == "skipped"
    assert (tmp_path / "adapted" / "decision.json").exists() and (tmp_path / "adapt" / "per_combination.csv").exists()


def test_refuses_a_checkpoint_whose_features_differ(trained, tmp_path):
    root, _, _ = trained
    manifest, features = make_feature_dataset(tmp_path / "d", n=100, seed=2, shifted=40, dims={"a": 7, "t": 16, "v": 10})
    build_splits(manifest, features, tmp_path / "splits", {"seed": 1})
    cfg = _cfg(root, manifest, features, tmp_path)
    cfg.splits_dir = str(tmp_path / "splits")
    with pytest.raises(ValueError, match="feature dims"):
        run_adaptation(cfg)


@pytest.mark.slow  # a fresh SQLite MLflow store and a pyfunc log: ~30 s on the shared box
def test_accepted_model_is_registered_under_its_own_name_and_source_aliases_stay(trained, tmp_path):
    import mlflow

    from pipeline.methods.routing import serving_info
    from pipeline.tracking.pyfunc import frame_from_arrays, log_pyfunc_model
    from pipeline.tracking.registry import register_candidate
    from pipeline.tracking.runs import fluent_uri, start_run

    root, manifest, features = trained
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    data = MultimodalData.load(manifest, features, root / "splits", include=("train", "val"))
    tracking = start_run({"tracking_uri": uri, "experiment": "imer", "artifact_root": str(tmp_path / "art")},
                         {}, data.provenance)
    train_model(data, {**FAST_TRAIN, "max_epochs": 1}, tmp_path / "src", tracking)
    tracking.end()
    model_path = tmp_path / "src" / "models" / "model.pt"
    b = data.subset("val").batch(np.arange(2))
    example = frame_from_arrays({m: x.numpy() for m, x in b["features"].items()},
                                {m: x.numpy() for m, x in b["lengths_natural"].items()}, b["natural"].numpy())
    with fluent_uri(uri), mlflow.start_run(run_id=tracking.run_id):
        log_pyfunc_model(model_path, serving_info(data.task, data.classes, [0.25] * 4), example, tmp_path)
    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    decision = register_candidate(tracking.run_id, "imer-mculora", 0.5, {}, client)
    (tmp_path / "registry.json").write_text(json.dumps(decision.to_dict()))
    aliases_before = dict(client.get_registered_model("imer-mculora").aliases)

    cfg = _cfg(root, manifest, features, tmp_path, lr=0.0, log_mlflow=True)
    cfg.model, cfg.train_summary = str(model_path), str(tmp_path / "src" / "models" / "train_summary.json")
    report = run_adaptation(cfg)
    assert report["status"] == "accepted"
    reg = report["registered"]
    assert reg["model_name"] == "imer-mculora-shifted" and reg["parent_version"] == decision.version
    version = client.get_model_version("imer-mculora-shifted", reg["version"])
    assert version.tags["parent_version"] == decision.version and version.tags["parent_run_id"] == tracking.run_id
    assert dict(client.get_registered_model("imer-mculora").aliases) == aliases_before
    run = client.get_run(report["mlflow_run_id"])
    assert run.data.tags["imer.stage"] == "adapt" and run.data.tags["imer.training_run_id"] == tracking.run_id
    assert "shifted_test/wa/natural/delta" in run.data.metrics


def test_regression_keeps_the_lowest_instability_share_and_gates_on_spread(tmp_path):
    from pipeline.methods import MCULoRANet, ModelConfig, save_model

    manifest, features = make_feature_dataset(tmp_path / "d", n=100, seed=4, task="regression", shifted=48)
    build_splits(manifest, features, tmp_path / "splits", {"seed": 1})
    data = MultimodalData.load(manifest, features, tmp_path / "splits", include=("train",))
    torch.manual_seed(0)
    net = MCULoRANet(ModelConfig(input_dims=data.input_dims, seq_lens=data.seq_lens, task="regression", n_outputs=1,
                                 d_model=16, n_heads=2, d_fusion=16))
    (tmp_path / "models").mkdir()
    save_model(tmp_path / "models" / "model.pt", net.eval(), {"prior": [0.0], "classes": []})
    report = run_adaptation(_cfg(tmp_path, manifest, features, tmp_path / "out", splits_dir=str(tmp_path / "splits")))
    assert report["status"] in ("accepted", "rejected")
    assert report["pseudo"]["kept"] == round(0.25 * report["n_pool"])
    assert "std_ratio" in report["gate"]["checks"] and "acc2" in report["shifted_test"]["natural"]["delta"]
