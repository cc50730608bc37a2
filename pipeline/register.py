"""Stage `register`: the evaluated run's model becomes a registry version (challenger),
promoted to champion only if its mean validation score strictly beats the champion's.

The score compared is the validation mean over the 7 fixed combinations from
reports/metrics.json (selection metric: WA or Acc-2); test numbers travel along as
evidence tags but never decide anything.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline.atomic import write_json
from pipeline.combinations import COMBINATIONS
from pipeline.metrics import selection_score
from pipeline.registry import RegistryDecision, register_candidate
from pipeline.tracking import git_revision

SECTION = "register"
LOWER_IS_BETTER = {"mae"}


def candidate_evidence(train: dict[str, Any], metrics: dict[str, Any], run_tags: dict[str, str], key: str,
                       task: str) -> tuple[float, dict[str, Any]]:
    """(val mean score, evidence tags) from the train summary, metrics.json and the run's provenance tags."""
    val_fixed = metrics["val"]["fixed"]
    evidence: dict[str, Any] = {
        "selection_metric": key,
        "task": task,
        "val_scores": {c: val_fixed[c][key] for c in COMBINATIONS},
        "test_mean": metrics["test"]["fixed"]["mean"].get(key),
        "test_natural": metrics["test"]["natural"].get(key),
        "best_epoch": train.get("best_epoch"),
        "train_val_mean": train.get("best_val_mean"),
    }
    # data / feature / mask hashes and git revision, as the train stage tagged them on the run
    evidence.update({k: v for k, v in run_tags.items() if k.startswith("imer.")})
    evidence["git_rev"] = run_tags.get("imer.git_revision") or git_revision() or "uncommitted"
    return float(val_fixed["mean"][key]), evidence


def register_from_reports(train_summary: str | Path, metrics_path: str | Path, model_name: str,
                          tracking_uri: str | None = None, selection_metric: str | None = None) -> RegistryDecision:
    """Pure stage function: read the two reports and call `register_candidate`."""
    from mlflow import MlflowClient

    for path in (train_summary, metrics_path):
        if not Path(path).exists():
            raise FileNotFoundError(f"{path}: not found (run the train and evaluate stages)")
    train = json.loads(Path(train_summary).read_text())
    metrics = json.loads(Path(metrics_path).read_text())
    if "val" not in metrics:
        raise ValueError(f"{metrics_path}: no 'val' section; registration compares validation scores")
    task = "classification" if "wa" in metrics["val"]["fixed"]["mean"] else "regression"
    key = selection_metric or train.get("selection_metric") or {"classification": "wa", "regression": "acc2"}[task]
    selection_score(metrics["val"]["fixed"]["mean"], task, key)  # validates the key with a clear error
    uri = tracking_uri or train.get("mlflow_tracking_uri") or "sqlite:///mlflow.db"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    run_id = train["mlflow_run_id"]
    score, evidence = candidate_evidence(train, metrics, client.get_run(run_id).data.tags, key, task)
    return register_candidate(run_id, model_name, score, evidence, client,
                              greater_is_better=key not in LOWER_IS_BETTER)


def run_stage(params: dict[str, Any]) -> dict[str, Any]:
    decision = register_from_reports(
        params.get("train_summary", "models/train_summary.json"),
        params.get("metrics", "reports/metrics.json"),
        params.get("model_name", "imer-mculora"),
        params.get("tracking_uri"),
        params.get("selection_metric"),
    )
    out = decision.to_dict()
    write_json(params.get("out", "reports/registry.json"), out)
    return out


def main() -> None:
    from pipeline.params import load_params

    print(json.dumps(run_stage(load_params(SECTION)), indent=2))


if __name__ == "__main__":
    main()
