"""Issue 13.1: model.pt and train_summary.json from different training runs never reach MLflow or the registry.

Two real training runs against a real MLflow SQLite store; the first is evaluated and
registered (champion). Then the files are torn the way a kill or a partial checkout
tears them: model.pt from run B, train_summary.json from the champion's run A.
"""
from __future__ import annotations

import shutil

import pytest
import yaml
from mlflow import MlflowClient

from pipeline import evaluate, register, train
from pipeline.splits import build_splits
from pipeline.tracking.lineage import LineageError, matching_train_summary
from tests.factories import make_feature_dataset

TINY = {"max_epochs": 2, "patience": 2, "batch_size": 32, "lr": 3e-3, "num_threads": 1,
        "model": {"d_model": 16, "d_fusion": 16, "n_heads": 2}, "dpft": {"monitor_size": 32}}
MODEL_NAME = "imer-torn"


def test_lineage_check_names_both_files(tmp_path):
    """Fast check of the guard itself: real checkpoints written by save_model, two run ids."""
    import json

    import torch

    from pipeline.methods import MCULoRANet, ModelConfig, save_model

    cfg = ModelConfig(input_dims={"a": 4, "t": 4, "v": 4}, seq_lens={"a": 2, "t": 2, "v": 2}, task="classification",
                      n_outputs=2, d_model=8, n_heads=2, d_fusion=8)
    torch.manual_seed(0)
    save_model(tmp_path / "model.pt", MCULoRANet(cfg), {"mlflow_run_id": "run-b"})
    (tmp_path / "summary.json").write_text(json.dumps({"mlflow_run_id": "run-a", "best_val_mean": 0.5}))
    with pytest.raises(LineageError) as err:
        matching_train_summary(tmp_path / "model.pt", tmp_path / "summary.json")
    assert all(s in str(err.value) for s in (str(tmp_path / "model.pt"), str(tmp_path / "summary.json"), "run-a", "run-b"))
    (tmp_path / "summary.json").write_text(json.dumps({"mlflow_run_id": "run-b", "best_val_mean": 0.5}))
    assert matching_train_summary(tmp_path / "model.pt", tmp_path / "summary.json")["best_val_mean"] == 0.5


def _snapshot(client: MlflowClient, run_id: str) -> dict:
    """Everything the defect used to rewrite: each version's tags and aliases, and the champion run's metrics."""
    found = [client.get_model_version(MODEL_NAME, mv.version)  # search results carry no aliases
             for mv in client.search_model_versions(f"name = '{MODEL_NAME}'")]
    versions = {mv.version: (mv.run_id, dict(mv.tags), sorted(mv.aliases)) for mv in found}
    return {"versions": versions, "metrics": client.get_run(run_id).data.metrics}


@pytest.fixture(scope="module")
def torn(tmp_path_factory):
    root = tmp_path_factory.mktemp("torn")
    manifest, features = make_feature_dataset(root, n=120, missing_share=0.15, seed=4)
    splits = root / "splits"
    build_splits(manifest, features, splits, {"seed": 1})
    uri = f"sqlite:///{root / 'mlflow.db'}"
    data = {"manifest": str(manifest), "features_dir": str(features), "splits_dir": str(splits)}
    mlflow_p = {"tracking_uri": uri, "experiment": "torn", "artifact_root": str(root / "mlartifacts")}
    runs = {}
    for name, seed in (("A", 1), ("B", 2)):
        out = root / name
        runs[name] = train.run_stage({**data, **TINY, "seed": seed, "out_dir": str(out), "mlflow": mlflow_p})
        if name == "A":  # the champion: evaluated and registered from consistent files
            evaluate.run_stage({**data, "model": str(out / "models/model.pt"),
                                "train_summary": str(out / "models/train_summary.json"),
                                "metrics": str(out / "reports/metrics.json"), "plots_dir": str(out / "reports/plots")})
            champion = register.run_stage({"train_summary": str(out / "models/train_summary.json"),
                                           "model": str(out / "models/model.pt"), "model_name": MODEL_NAME,
                                           "metrics": str(out / "reports/metrics.json"),
                                           "out": str(out / "reports/registry.json")})
            assert champion["decision"] == "promoted"
    # the torn checkout: B's checkpoint next to A's summary; B's own metrics (evaluated without MLflow)
    work = root / "work"
    (work / "models").mkdir(parents=True)
    shutil.copy(root / "B/models/model.pt", work / "models/model.pt")
    shutil.copy(root / "A/models/train_summary.json", work / "models/train_summary.json")
    evaluate.run_stage({**data, "model": str(root / "B/models/model.pt"), "log_mlflow": False,
                        "metrics": str(work / "reports/metrics_B.json"), "plots_dir": str(work / "plots_B")})
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    assert runs["A"]["mlflow_run_id"] != runs["B"]["mlflow_run_id"]
    return root, work, data, client, runs


@pytest.mark.slow  # two real trainings + evaluate + register: ~50 s on 2 shared cores
def test_evaluate_refuses_torn_files_and_logs_nothing(torn):
    root, work, data, client, runs = torn
    run_a = runs["A"]["mlflow_run_id"]
    before = _snapshot(client, run_a)
    with pytest.raises(LineageError) as err:
        evaluate.run_stage({**data, "model": str(work / "models/model.pt"),
                            "train_summary": str(work / "models/train_summary.json"),
                            "metrics": str(work / "reports/metrics.json"), "plots_dir": str(work / "plots")})
    message = str(err.value)
    assert str(work / "models/model.pt") in message and str(work / "models/train_summary.json") in message
    assert run_a in message and runs["B"]["mlflow_run_id"] in message
    assert not (work / "reports/metrics.json").exists()  # refused before any work
    assert _snapshot(client, run_a) == before


@pytest.mark.slow  # two real trainings + evaluate + register: ~50 s on 2 shared cores
def test_register_refuses_torn_files_and_champion_is_untouched(torn, tmp_path, capsys):
    root, work, data, client, runs = torn
    run_a = runs["A"]["mlflow_run_id"]
    before = _snapshot(client, run_a)
    (champion_version,) = before["versions"]
    params = {"register": {"train_summary": str(work / "models/train_summary.json"),
                           "model": str(work / "models/model.pt"), "model_name": MODEL_NAME,
                           "metrics": str(work / "reports/metrics_B.json"), "out": str(work / "registry.json")}}
    with pytest.raises(LineageError, match="different training runs"):
        register.run_stage(params["register"])

    from flows.cli import main as imer

    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    assert imer(["register", "--no-prefect", "--params", str(path)]) == 1  # runtime error
    err = capsys.readouterr().err
    assert "imer register: error:" in err and "different training runs" in err and "Traceback" not in err
    assert not (work / "registry.json").exists()

    after = _snapshot(client, run_a)
    assert after == before
    _, tags, aliases = after["versions"][champion_version]
    assert aliases == ["challenger", "champion"] and tags["decision"] == "promoted"


@pytest.mark.slow  # two real trainings + evaluate + register: ~50 s on 2 shared cores
def test_re_registering_the_champion_changes_nothing(torn):
    root, work, data, client, runs = torn
    before = _snapshot(client, runs["A"]["mlflow_run_id"])
    again = register.run_stage({"train_summary": str(root / "A/models/train_summary.json"),
                                "model": str(root / "A/models/model.pt"), "model_name": MODEL_NAME,
                                "metrics": str(work / "reports/metrics_B.json"),  # other scores: never recorded
                                "out": str(work / "registry_again.json")})
    assert again["decision"] == "already_registered" and "nothing changed" in again["reason"]
    assert _snapshot(client, runs["A"]["mlflow_run_id"]) == before
