"""Champion/challenger promotion over a real MLflow SQLite registry."""
from __future__ import annotations

import json
import os

import mlflow
import pandas as pd
import pytest
from mlflow import MlflowClient

from pipeline.tracking.registry import CHALLENGER, CHAMPION, register_candidate
from pipeline.tracking.runs import fluent_uri

pytestmark = pytest.mark.integration


class _Constant(mlflow.pyfunc.PythonModel):
    """Smallest servable model: registry logic does not care what the model computes."""

    def predict(self, context, model_input, params=None):  # noqa: ARG002
        return pd.DataFrame({"score": [0.0] * len(model_input)})


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One SQLite store per module (schema creation is the slow part); tests use distinct model names."""
    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    exp_id = client.create_experiment("registry-test", artifact_location=(root / "artifacts").as_uri())
    return uri, client, exp_id


def _logged_run(store) -> str:
    uri, _, exp_id = store
    with fluent_uri(uri), mlflow.start_run(experiment_id=exp_id) as run:
        mlflow.pyfunc.log_model(name="model", python_model=_Constant(), pip_requirements=["mlflow"])
    return run.info.run_id


EVIDENCE = {"val_scores": {"a": 0.5, "atv": 0.7}, "data_hash": "abc123", "mask_hash": "m1", "git_rev": "deadbeef"}


def test_first_model_becomes_champion_with_evidence(store):
    _, client, _ = store
    run_id = _logged_run(store)
    d = register_candidate(run_id, "first-model", 0.6, EVIDENCE, client)
    assert d.decision == "promoted" and d.previous_champion_version is None
    mv = client.get_model_version("first-model", d.version)
    assert set(mv.aliases) == {CHAMPION, CHALLENGER} and sorted(d.aliases) == sorted(mv.aliases)
    assert float(mv.tags["val_score"]) == 0.6
    assert json.loads(mv.tags["val_scores"]) == EVIDENCE["val_scores"]
    assert mv.tags["data_hash"] == "abc123" and mv.tags["git_rev"] == "deadbeef"
    assert mv.tags["decision"] == "promoted" and mv.run_id == run_id
    # the registered version serves: it loads through its alias URI.
    with fluent_uri(store[0]):
        served = mlflow.pyfunc.load_model("models:/first-model@champion")
    assert len(served.predict(pd.DataFrame({"x": [1.0, 2.0]}))) == 2


def test_better_promotes_worse_and_tie_keep(store):
    _, client, _ = store
    name = "ladder"
    v1 = register_candidate(_logged_run(store), name, 0.60, EVIDENCE, client)
    v2 = register_candidate(_logged_run(store), name, 0.65, EVIDENCE, client)
    assert v2.decision == "promoted" and v2.previous_champion_version == v1.version
    assert v2.previous_champion_score == pytest.approx(0.60)
    assert set(client.get_model_version(name, v2.version).aliases) == {CHAMPION, CHALLENGER}
    assert client.get_model_version(name, v1.version).aliases == []  # lost both aliases

    worse = register_candidate(_logged_run(store), name, 0.55, EVIDENCE, client)
    assert worse.decision == "kept" and worse.champion_version == v2.version
    assert str(client.get_model_version_by_alias(name, CHAMPION).version) == v2.version
    assert str(client.get_model_version_by_alias(name, CHALLENGER).version) == worse.version
    assert client.get_model_version(name, worse.version).tags["decision"] == "kept"

    tie = register_candidate(_logged_run(store), name, 0.65, EVIDENCE, client)
    assert tie.decision == "kept" and "ties" in tie.reason
    assert str(client.get_model_version_by_alias(name, CHAMPION).version) == v2.version
    assert str(client.get_model_version_by_alias(name, CHALLENGER).version) == tie.version


def test_lower_is_better_and_rerun_reuses_version(store):
    _, client, _ = store
    name = "mae-model"
    run_a = _logged_run(store)
    a = register_candidate(run_a, name, 0.9, {}, client, greater_is_better=False)
    b = register_candidate(_logged_run(store), name, 0.8, {}, client, greater_is_better=False)
    assert a.decision == "promoted" and b.decision == "promoted"
    before = client.get_model_version(name, a.version)
    again = register_candidate(run_a, name, 0.2, {"git_rev": "other"}, client, greater_is_better=False)
    assert again.version == a.version  # no duplicate version for the same run
    assert again.decision == "already_registered" and "nothing changed" in again.reason
    assert again.candidate_score == pytest.approx(0.9) and again.champion_version == b.version
    after = client.get_model_version(name, a.version)
    assert after.tags == before.tags and after.aliases == before.aliases  # score and decision never rewritten
    assert str(client.get_model_version_by_alias(name, CHALLENGER).version) == b.version
    assert len(client.search_model_versions(f"name = '{name}'")) == 2


def test_champion_re_registered_keeps_its_decision(store):
    """Issue 13.1: re-registering the champion's own run used to overwrite its `decision` tag with "kept"."""
    _, client, _ = store
    name = "champion-rerun"
    run_id = _logged_run(store)
    first = register_candidate(run_id, name, 0.7, EVIDENCE, client)
    tags = client.get_model_version(name, first.version).tags
    again = register_candidate(run_id, name, 0.7, EVIDENCE, client)
    assert again.decision == "already_registered"
    mv = client.get_model_version(name, first.version)
    assert mv.tags == tags and mv.tags["decision"] == "promoted"
    assert set(mv.aliases) == {CHAMPION, CHALLENGER}


def test_interrupted_registration_is_completed(store):
    """A version created but never tagged (a kill mid-registration) gets its evidence and decision on re-run."""
    uri, client, _ = store
    from pipeline.tracking.registry import resolve_model_source

    name = "interrupted"
    run_id = _logged_run(store)
    client.create_registered_model(name)
    source, model_id = resolve_model_source(client, run_id)
    with fluent_uri(uri):
        bare = client.create_model_version(name, source=source, run_id=run_id, model_id=model_id)
    done = register_candidate(run_id, name, 0.6, EVIDENCE, client)
    assert done.version == str(bare.version) and done.decision == "promoted"
    assert client.get_model_version(name, done.version).tags["decision"] == "promoted"


def test_missing_logged_model_is_a_clear_error(store):
    uri, client, exp_id = store
    with fluent_uri(uri), mlflow.start_run(experiment_id=exp_id) as run:
        mlflow.log_metric("x", 1.0)
    with pytest.raises(Exception, match="no logged model named 'model'"):
        register_candidate(run.info.run_id, "nothing-model", 0.5, {}, client)


def test_fluent_uri_leaves_no_global_tracking_uri(store, monkeypatch):
    """A stage that logs a model must not redirect later runs in the same process."""
    uri, _, _ = store
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    before = mlflow.get_tracking_uri()
    with fluent_uri(uri):
        assert mlflow.get_tracking_uri() == uri and os.environ["MLFLOW_TRACKING_URI"] == uri
    assert "MLFLOW_TRACKING_URI" not in os.environ and "MLFLOW_REGISTRY_URI" not in os.environ
    assert mlflow.get_tracking_uri() == before


def test_a_candidate_selected_on_other_data_never_replaces_the_champion(store):
    _, client, _ = store
    name = "across-data"
    first = register_candidate(_logged_run(store), name, 0.60, {**EVIDENCE, "data": "realistic"}, client)
    other = register_candidate(_logged_run(store), name, 0.90, {**EVIDENCE, "data": "iemocap4"}, client)
    assert other.decision == "kept" and "different data" in other.reason
    assert str(client.get_model_version_by_alias(name, CHAMPION).version) == first.version
    same = register_candidate(_logged_run(store), name, 0.70, {**EVIDENCE, "data": "realistic"}, client)
    assert same.decision == "promoted"
