"""`imer compare --registry` over a real MLflow SQLite registry filled by the real register stage.

Each registered model comes from a run with a logged (constant) pyfunc model, the train
stage's params and tags, its test metrics (as evaluate names them), a manifest whose
corpus.json names the profile, and the files the register stage reads (model.pt with the
run id, train_summary.json, metrics.json). Validation and test scores are chosen so that the
best test model is NOT the best validation model.
"""
from __future__ import annotations

import json

import mlflow
import pandas as pd
import pyarrow as pa
import pytest
import torch
from mlflow import MlflowClient

from pipeline import register
from pipeline.core.modalities import COMBINATIONS
from pipeline.evaluate import flat_test_metrics
from pipeline.formats.manifest import MANIFEST_SCHEMA, manifest_meta, write_manifest
from pipeline.tracking.registry import CHAMPION, val_tag
from pipeline.tracking.registry_compare import (_rank_key, compare_registry, recommended_alias, recommended_model,
                                                write_registry_report)
from pipeline.tracking.runs import flatten, fluent_uri
from pipeline.training.config import TrainConfig

pytestmark = pytest.mark.integration
OFFSETS = (-0.03, -0.02, -0.01, 0.0, 0.01, 0.02, 0.03)  # per-combination spread around the mean


class _Constant(mlflow.pyfunc.PythonModel):
    def predict(self, context, model_input, params=None):  # noqa: ARG002
        return pd.DataFrame({"score": [0.0] * len(model_input)})


def _scores(mean: float) -> dict:
    """metrics.json split section: every combination, the mean and natural, for wa/ua/wf1."""
    fixed = {c: {"wa": mean + o, "ua": mean + o - 0.05, "wf1": mean + o - 0.01, "n": 10}
             for c, o in zip(COMBINATIONS, OFFSETS)}
    fixed["mean"] = {"wa": mean, "ua": mean - 0.05, "wf1": mean - 0.01}
    return {"fixed": fixed, "natural": {"wa": mean - 0.04, "ua": mean - 0.09, "wf1": mean - 0.05, "n": 10}}


def _manifest(root, profile: str):
    """A manifest whose listing sits next to a corpus.json naming `profile` (as corpus + ingest leave it)."""
    corpus = root / "data" / profile / "corpus"
    corpus.mkdir(parents=True, exist_ok=True)
    (corpus / "corpus.json").write_text(json.dumps({"config": {"profile": profile}}))
    path = root / "data" / profile / "manifest.parquet"
    if not path.exists():
        table = pa.table({f.name: pa.array([], f.type) for f in MANIFEST_SCHEMA})
        write_manifest(table, path, manifest_meta("classification", ["a", "b"], str(corpus / "listing.parquet")))
    return path


def register_model(store, root, method: str, profile: str, val: float, test: float, seed: int, trainable: int,
                   **train_overrides):
    """One training's worth of files and run, then the register stage itself."""
    uri, _, exp_id = store
    work = root / f"{method}-{profile}-{seed}"
    (work / "models").mkdir(parents=True)
    manifest = _manifest(root, profile)
    cfg = TrainConfig.from_params({"method": method, "seed": seed, "manifest": str(manifest), **train_overrides})
    metrics = {"val": _scores(val), "test": _scores(test)}
    with fluent_uri(uri), mlflow.start_run(experiment_id=exp_id) as run:
        mlflow.log_params(flatten(cfg.to_dict()))
        mlflow.set_tags({"imer.method": method, "imer.variant": cfg.variant, "imer.regime": cfg.regime,
                         "imer.trainable_params": str(trainable), "imer.manifest_sha256": _sha(manifest)})
        mlflow.log_metrics(flat_test_metrics(metrics))
        mlflow.pyfunc.log_model(name="model", python_model=_Constant(), pip_requirements=["mlflow"])
    run_id = run.info.run_id
    torch.save({"extra": {"mlflow_run_id": run_id}}, work / "models/model.pt")
    summary = {"seed": seed, "method": method, "regime": cfg.regime, "variant": cfg.variant, "dpft_mode": "uniform",
               "selection_metric": "wa", "best_epoch": 3, "best_val_mean": val, "mlflow_run_id": run_id,
               "mlflow_tracking_uri": uri}
    (work / "models/train_summary.json").write_text(json.dumps(summary))
    (work / "metrics.json").write_text(json.dumps(metrics))
    return register.run_stage({"model": str(work / "models/model.pt"),
                               "train_summary": str(work / "models/train_summary.json"),
                               "metrics": str(work / "metrics.json"), "out": str(work / "registry.json"),
                               "model_name": None, "tracking_uri": uri})


def _sha(path) -> str:
    from pipeline.core.hashing import file_digest

    return file_digest(path)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("registry-compare")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    exp_id = client.create_experiment("imer", artifact_location=(root / "artifacts").as_uri())
    return uri, client, exp_id


@pytest.fixture(scope="module")
def registered(store, tmp_path_factory):
    """realistic: mplmm best on validation, mculora best on test; balanced: only non-champion versions."""
    root = tmp_path_factory.mktemp("work")
    out = {
        "mculora": register_model(store, root, "mculora", "realistic", 0.60, 0.70, 1, 5000),
        "mplmm": register_model(store, root, "mplmm", "realistic", 0.65, 0.55, 1, 8000),
        "wander": register_model(store, root, "wander", "realistic", 0.62, 0.60, 1, 3000),
        "mculora_bal": register_model(store, root, "mculora", "balanced", 0.58, 0.66, 2, 5000, variant="no_specific"),
        "wander_bal": register_model(store, root, "wander", "balanced", 0.57, 0.50, 2, 3000),
    }
    return root, out


def _snapshot(client):
    """Every version's tags and aliases: what a no-op re-run must leave untouched."""
    return {(v.name, v.version): (dict(v.tags), sorted(v.aliases))
            for m in client.search_registered_models() for v in client.search_model_versions(f"name = '{m.name}'")}


def test_every_version_carries_val_scores_and_identity(store, registered):
    _, client, _ = store
    _, out = registered
    assert out["mculora_bal"]["decision"] == "kept"  # .58 on balanced does not beat .60 on realistic
    tags = client.get_model_version("imer-mplmm", out["mplmm"]["version"]).tags
    for c, o in zip(COMBINATIONS, OFFSETS):
        assert float(tags[val_tag("wa", c)]) == pytest.approx(0.65 + o)
    assert float(tags["val/wa/mean"]) == pytest.approx(0.65) and float(tags["val/wa/natural"]) == pytest.approx(0.61)
    assert float(tags["val/ua/mean"]) == pytest.approx(0.60)
    assert tags["data"] == "realistic" and tags["seed"] == "1" and tags["imer.method"] == "mplmm"
    assert json.loads(tags["options"])["method"] == "mplmm" and len(tags["params_hash"]) == 16
    bal = client.get_model_version("imer-mculora", out["mculora_bal"]["version"]).tags
    assert bal["data"] == "balanced" and json.loads(bal["options"])["variant"] == "no_specific"
    assert bal["params_hash"] != client.get_model_version("imer-mculora", out["mculora"]["version"]).tags["params_hash"]


def test_table_lists_each_champion_and_recommends_on_validation(store, registered, tmp_path):
    _, client, _ = store
    _, out = registered
    result = compare_registry(client)
    paths = write_registry_report(result, tmp_path)
    real = result["data"]["realistic"]
    rows = {r["model"]: r for r in real["rows"]}
    assert set(rows) == {"imer-mculora", "imer-mplmm", "imer-wander"}
    assert all(r["champion"] for r in rows.values())
    assert [r["model"] for r in real["rows"]] == ["imer-mplmm", "imer-wander", "imer-mculora"]  # by val mean
    assert rows["imer-mculora"]["val"]["atv"] == pytest.approx(0.63)
    assert rows["imer-mculora"]["val"]["natural"] == pytest.approx(0.56)
    assert rows["imer-mculora"]["test"]["mean"] == pytest.approx(0.70)
    assert rows["imer-wander"]["trainable_params"] == 3000
    rec = real["recommended"]  # mculora has the best TEST mean; validation decides
    assert (rec["model"], rec["version"]) == ("imer-mplmm", out["mplmm"]["version"])
    assert rec["value"] == pytest.approx(0.65) and rec["runner_up"]["model"] == "imer-wander"
    assert recommended_model(client, "realistic") == ("imer-mplmm", out["mplmm"]["version"])
    tags = client.get_model_version("imer-mplmm", out["mplmm"]["version"]).tags
    assert tags["recommended_for"] == "realistic" and tags["recommended_metric"] == "val/wa/mean"
    assert float(tags["recommended_value"]) == pytest.approx(0.65)
    assert tags["recommended_runner_up"].startswith("imer-wander")
    assert "recommended-realistic" not in client.get_registered_model("imer-mculora").aliases
    # balanced: both models' champions were trained on realistic, so their best balanced versions stand in
    bal = result["data"]["balanced"]
    assert [(r["model"], r["champion"]) for r in bal["rows"]] == [("imer-mculora", False), ("imer-wander", False)]
    assert recommended_model(client, "balanced") == ("imer-mculora", out["mculora_bal"]["version"])
    md = paths["md"].read_text()
    assert "**validation**" in md and "never used to choose" in md and "`recommended-realistic`" in md
    assert json.loads(paths["json"].read_text())["data"]["realistic"]["recommended"]["model"] == "imer-mplmm"


def test_rerun_changes_nothing(store, registered):
    _, client, _ = store
    first = compare_registry(client)
    before = _snapshot(client)
    again = compare_registry(client)
    assert again["changes"] == [] and _snapshot(client) == before
    assert {k: v for k, v in again.items() if k != "changes"} == {k: v for k, v in first.items() if k != "changes"}


def test_ties_go_to_fewer_params_then_name_then_version():
    def row(model, version, score, params):
        return {"model": model, "version": version, "val": {"mean": score}, "trainable_params": params}

    rows = [row("imer-b", "2", 0.6, 100), row("imer-a", "3", 0.6, 100), row("imer-c", "1", 0.6, 50),
            row("imer-a", "1", 0.6, 100), row("imer-d", "1", 0.5, 1), row("imer-e", "1", float("nan"), 1)]
    order = [(r["model"], r["version"]) for r in sorted(rows, key=lambda r: _rank_key(r, "wa"))]
    assert order == [("imer-c", "1"), ("imer-a", "1"), ("imer-a", "3"), ("imer-b", "2"), ("imer-d", "1"),
                     ("imer-e", "1")]
    assert [r["model"] for r in sorted(rows[3:5], key=lambda r: _rank_key(r, "mae"))] == ["imer-d", "imer-a"]


def test_data_label_names_profile_dataset_or_folder(tmp_path):
    from pipeline.core.hashing import file_digest

    path = _manifest(tmp_path, "realistic")
    assert register.derived_data_label(str(path), file_digest(path))[0] == "realistic"
    imported = tmp_path / "imported.parquet"
    write_manifest(pa.table({f.name: pa.array([], f.type) for f in MANIFEST_SCHEMA}), imported,
                   manifest_meta("classification", ["a"], "import:gcnet:iemocap4"))
    assert register.derived_data_label(str(imported), None) == ("iemocap4", "import:gcnet:iemocap4")
    assert register.derived_data_label(str(path), "0" * 64)[0] == "unknown"  # manifest changed since training
    assert recommended_alias("my corpus/v2") == "recommended-my-corpus-v2"


def test_recommendation_moves_and_cli_reports(store, registered, tmp_path, monkeypatch, capsys):
    """A better-validated wander version takes the alias; mplmm loses alias and tags; the CLI writes the report."""
    from flows.compare import main

    uri, client, _ = store
    root, out = registered
    compare_registry(client)
    better = register_model(store, root, "wander", "realistic", 0.70, 0.40, 3, 3000)
    monkeypatch.chdir(tmp_path)
    assert main(["--registry", "--tracking-uri", uri, "--spec", str(tmp_path / "absent.yaml")]) == 0
    assert recommended_model(client, "realistic") == ("imer-wander", better["version"])
    assert "recommended-realistic" not in client.get_registered_model("imer-mplmm").aliases
    old = client.get_model_version("imer-mplmm", out["mplmm"]["version"]).tags
    assert "recommended_for" not in old and "recommended_value" not in old
    assert CHAMPION in client.get_model_version("imer-mplmm", out["mplmm"]["version"]).aliases
    report = json.loads((tmp_path / "reports/registry_compare.json").read_text())
    assert report["data"]["realistic"]["recommended"]["runner_up"]["model"] == "imer-mplmm"
    assert "recommended-realistic -> imer-wander" in capsys.readouterr().err
