"""MLflow for the adapt stage: one run per adaptation, a child of the training run, and the
registration of an accepted model under its own name (the source's aliases are never touched)."""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from pipeline.tracking.runs import flatten, fluent_uri

STAGE_TAG = "imer.stage"


def log_adapt_run(uri: str, training_run_id: str, params: dict[str, Any], metrics: dict[str, float],
                  artifacts: list[Path], model_path: Path | None, serving: dict[str, Any],
                  input_example: Any) -> tuple[str, str | None]:
    """(run id, model URI or None): a run in the training run's experiment, tagged with its parent."""
    import mlflow
    from mlflow import MlflowClient

    from pipeline.tracking.pyfunc import log_pyfunc_model

    client = MlflowClient(tracking_uri=uri)
    parent = client.get_run(training_run_id)
    tags = {STAGE_TAG: "adapt", "imer.training_run_id": training_run_id, "mlflow.parentRunId": training_run_id}
    run = client.create_run(parent.info.experiment_id, run_name=f"adapt-{params.get('method')}", tags=tags)
    run_id = run.info.run_id
    model_uri = None
    try:
        for k, v in flatten(params).items():
            client.log_param(run_id, k, v)
        for k, v in metrics.items():
            client.log_metric(run_id, k, v)
        for path in artifacts:
            client.log_artifact(run_id, str(path), "adapt")
        if model_path is not None:
            with fluent_uri(uri), mlflow.start_run(run_id=run_id), tempfile.TemporaryDirectory() as tmp:
                model_uri = log_pyfunc_model(model_path, serving, input_example, tmp).model_uri
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id, "FINISHED")
    return run_id, model_uri


def register_adapted(uri: str, name: str, run_id: str, parent: dict[str, Any], tags: dict[str, Any]) -> dict[str, Any]:
    """A new version of `name` from run `run_id`'s logged model, tagged with its parent; no alias moves."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from pipeline.tracking.registry import _tag_value, resolve_model_source

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name, description="imer model adapted to a shifted domain (stage adapt)")
    source, model_id = resolve_model_source(client, run_id)
    with fluent_uri(uri):
        version = str(client.create_model_version(name, source=source, run_id=run_id, model_id=model_id).version)
    all_tags = {"parent_model": parent.get("model_name"), "parent_version": parent.get("version"),
                "parent_run_id": parent.get("run_id"), "run_id": run_id, **tags}
    for key, value in all_tags.items():
        if value is not None:
            client.set_model_version_tag(name, version, key, _tag_value(value))
    return {"model_name": name, "version": version, "parent_model": parent.get("model_name"),
            "parent_version": parent.get("version")}


def flat_metrics(report: dict[str, Any]) -> dict[str, float]:
    """MLflow names: shifted_test/<metric>/<protocol>/<source|adapted|delta>, source_val/..."""
    out: dict[str, float] = {}
    section = report.get("shifted_test", {})
    entries = [(c, e) for c, e in section.get("fixed", {}).items()] + [("natural", section.get("natural"))]
    entries += [(f"mr_{mr}", e) for mr, e in section.get("random", {}).items()]
    for where, e in entries:
        if not e:
            continue
        for part in ("source", "adapted", "delta"):
            for metric, value in e[part].items():
                out[f"shifted_test/{metric}/{where}/{part}"] = float(value)
    val = report.get("source_val", {})
    if val:
        out["source_val/drop_points"] = float(val["drop_points"])
    out["adapt/parameters"] = float(report.get("adapted_parameters", 0))
    out["adapt/drift"] = float(report.get("drift", 0.0))
    out["adapt/wall_time_s"] = float(report.get("wall_time_s", 0.0))
    out["adapt/accepted"] = float(report.get("status") == "accepted")
    return {k: v for k, v in out.items() if v == v}  # drop NaN
