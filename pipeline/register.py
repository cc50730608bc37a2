"""Stage `register`: the evaluated run's model becomes a registry version (challenger),
promoted to champion only if its mean validation score strictly beats the champion's.
It refuses when models/model.pt and models/train_summary.json come from different
training runs, and registering an already registered run changes nothing.

The score compared is the validation mean over the 7 fixed combinations from
reports/metrics.json (selection metric: WA or Acc-2); test numbers travel along as
evidence tags but never decide anything.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from pipeline.core.atomic import write_json
from pipeline.core.modalities import COMBINATIONS
from pipeline.core.metrics import LOWER_IS_BETTER, selection_metric as resolve_selection_metric
from pipeline.core.metrics import selection_score
from pipeline.methods.registry import default_model_name
from pipeline.tracking.lineage import LineageError, matching_train_summary
from pipeline.tracking.registry import RegistryDecision, register_candidate
from pipeline.tracking.runs import git_revision

SECTION = "register"


def candidate_evidence(train: dict[str, Any], metrics: dict[str, Any], run_tags: dict[str, str], key: str,
                       task: str) -> tuple[float, dict[str, Any]]:
    """(val mean score, evidence tags) from the train summary, metrics.json and the run's provenance tags."""
    val_fixed = metrics["val"]["fixed"]
    evidence: dict[str, Any] = {
        "selection_metric": key,
        "task": task,
        "val_scores": {c: val_fixed[c][key] for c in COMBINATIONS if key in val_fixed.get(c, {})},
        "not_applicable": [c for c in COMBINATIONS if key not in val_fixed.get(c, {})],
        "test_mean": metrics["test"]["fixed"]["mean"].get(key),
        "test_natural": metrics["test"]["natural"].get(key),
        "best_epoch": train.get("best_epoch"),
        "train_val_mean": train.get("best_val_mean"),
    }
    # data / feature / mask hashes and git revision, as the train stage tagged them on the run
    evidence.update({k: v for k, v in run_tags.items() if k.startswith("imer.")})
    evidence["git_rev"] = run_tags.get("imer.git_revision") or git_revision() or "uncommitted"
    return float(val_fixed["mean"][key]), evidence


def register_from_reports(train_summary: str | Path, metrics_path: str | Path, model_name: str | None,
                          tracking_uri: str | None = None, selection_metric: str | None = None,
                          model_path: str | Path = "models/model.pt") -> RegistryDecision:
    """Pure stage function: check model.pt and the summary name one run, read the reports, register.

    Raises `LineageError` (a ValueError naming both files) when the checkpoint's run id is
    not the summary's: the evidence would be another model's.
    """
    from mlflow import MlflowClient

    for path in (train_summary, metrics_path):
        if not Path(path).exists():
            raise FileNotFoundError(f"{path}: not found (run the train and evaluate stages)")
    train = matching_train_summary(model_path, train_summary)
    metrics = json.loads(Path(metrics_path).read_text())
    if "val" not in metrics:
        raise ValueError(f"{metrics_path}: no 'val' section; registration compares validation scores")
    task = "classification" if "wa" in metrics["val"]["fixed"]["mean"] else "regression"
    key = resolve_selection_metric(task, selection_metric or train.get("selection_metric"))
    model_name = model_name or default_model_name(train.get("method", "mculora"))
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
        params.get("model_name"),  # null = imer-<method> (one registered model per method)
        params.get("tracking_uri"),
        params.get("selection_metric"),
        params.get("model", "models/model.pt"),
    )
    out = decision.to_dict()
    write_json(params.get("out", "reports/registry.json"), out)
    return out


def main() -> None:
    from pipeline.core.params import load_params

    try:
        out = run_stage(load_params(SECTION))
    except LineageError as exc:
        print(f"register: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
