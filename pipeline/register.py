"""Stage `register`: the evaluated run's model becomes a registry version (challenger),
promoted to champion only if its mean validation score strictly beats the champion's.
It refuses when models/model.pt and models/train_summary.json come from different
training runs, and registering an already registered run changes nothing.

The score compared is the validation mean over the 7 fixed combinations from
reports/metrics.json (selection metric: WA or Acc-2); test numbers travel along as
evidence tags but never decide anything. The version is also tagged with every validation
score (`val/<metric>/<where>`) and what identifies it: the data (`data`: corpus profile,
imported dataset or the listing's folder; `register.data_label` overrides), `seed`,
`options` (train params that differ from the defaults, plus the option sections in use) and
`params_hash` (the train params except paths, seed, threads and MLflow settings).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from pipeline.core.atomic import write_json
from pipeline.core.hashing import config_hash, file_digest
from pipeline.core.modalities import COMBINATIONS
from pipeline.core.metrics import LOWER_IS_BETTER, selection_metric as resolve_selection_metric
from pipeline.core.metrics import selection_score
from pipeline.methods.registry import default_model_name
from pipeline.tracking.lineage import LineageError, matching_train_summary
from pipeline.tracking.registry import DATA_TAG, UNKNOWN_DATA, RegistryDecision, register_candidate, val_score_tags
from pipeline.tracking.runs import flatten, git_revision

SECTION = "register"
NOT_RECIPE = ("manifest", "features_dir", "splits_dir", "out_dir", "seed", "num_threads")  # + mlflow.*


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
    evidence.update(val_score_tags(metrics["val"]))  # val/<metric>/<combination|mean|natural>
    return float(val_fixed["mean"][key]), evidence


def identity_tags(train: dict[str, Any], run_params: dict[str, str], run_tags: dict[str, str],
                  data_label: str | None = None) -> dict[str, Any]:
    """What identifies the version: data, seed, method/variant/regime, options and the params hash."""
    from pipeline.training.config import OPTION_SECTIONS, TrainConfig

    defaults = flatten(TrainConfig().to_dict())
    in_use = {train.get("method")} | ({"cggm"} if run_params.get("cggm.enabled") == "True" else set())
    recipe = {k: v for k, v in sorted(run_params.items()) if k.split(".")[0] not in NOT_RECIPE + ("mlflow",)
              and (k.split(".")[0] not in OPTION_SECTIONS or k.split(".")[0] in in_use)}
    options = {k: v for k, v in recipe.items() if k.split(".")[0] in OPTION_SECTIONS or defaults.get(k) != v}
    tags: dict[str, Any] = {"seed": train.get("seed"), "options": options, "params_hash": config_hash(recipe),
                            "imer.dpft_mode": train.get("dpft_mode")}
    for key in ("method", "variant", "regime"):  # the train stage tags its run with these; older runs may not
        tags[f"imer.{key}"] = run_tags.get(f"imer.{key}") or train.get(key)
    manifest = run_params.get("manifest")
    tags[DATA_TAG], tags["data_source"] = (data_label, "register.data_label") if data_label else \
        derived_data_label(manifest, run_tags.get("imer.manifest_sha256"))
    return tags


def derived_data_label(manifest: str | None, manifest_sha256: str | None) -> tuple[str, str]:
    """(label, manifest source) of the data the run trained on: the corpus profile (corpus.json next to
    the listing), the imported dataset (`import:<format>:<dataset>`), else the listing's folder name."""
    from pipeline.formats.manifest import read_manifest

    if not manifest or not Path(manifest).exists():
        print(f"register: warning: the run's manifest {manifest!r} is not here; data label {UNKNOWN_DATA!r} "
              "(set register.data_label)", file=sys.stderr)
        return UNKNOWN_DATA, ""
    if manifest_sha256 and file_digest(manifest) != manifest_sha256:
        print(f"register: warning: {manifest} changed since the run trained on it; data label {UNKNOWN_DATA!r}",
              file=sys.stderr)
        return UNKNOWN_DATA, ""
    source = str(read_manifest(manifest)[1].get("source", ""))
    if source.startswith("import:"):
        return source.rsplit(":", 1)[-1], source
    listing = Path(source)
    corpus = listing.parent / "corpus.json"
    if source and corpus.exists():
        profile = (json.loads(corpus.read_text()).get("config") or {}).get("profile")
        if profile:
            return str(profile), source
    return (listing.parent.name or listing.stem or UNKNOWN_DATA), source


def selection_of(train: dict[str, Any], metrics: dict[str, Any], selection_metric: str | None = None,
                 where: str | Path = "reports/metrics.json") -> tuple[str, str]:
    """(task, selection metric) of an evaluated run: the caller's metric, else the train stage's (WA / Acc-2)."""
    if "val" not in metrics:
        raise ValueError(f"{where}: no 'val' section; registration compares validation scores")
    task = "classification" if "wa" in metrics["val"]["fixed"]["mean"] else "regression"
    key = resolve_selection_metric(task, selection_metric or train.get("selection_metric"))
    selection_score(metrics["val"]["fixed"]["mean"], task, key)  # validates the key with a clear error
    return task, key


def register_from_reports(train_summary: str | Path, metrics_path: str | Path, model_name: str | None,
                          tracking_uri: str | None = None, selection_metric: str | None = None,
                          model_path: str | Path = "models/model.pt",
                          data_label: str | None = None,
                          extra_tags: dict[str, Any] | None = None) -> RegistryDecision:
    """Pure stage function: check model.pt and the summary name one run, read the reports, register.

    Raises `LineageError` (a ValueError naming both files) when the checkpoint's run id is
    not the summary's: the evidence would be another model's. `extra_tags` (e.g. `imer compare
    --register`'s row and column) are written with the evidence.
    """
    from mlflow import MlflowClient

    for path in (train_summary, metrics_path):
        if not Path(path).exists():
            raise FileNotFoundError(f"{path}: not found (run the train and evaluate stages)")
    train = matching_train_summary(model_path, train_summary)
    metrics = json.loads(Path(metrics_path).read_text())
    task, key = selection_of(train, metrics, selection_metric, metrics_path)
    model_name = model_name or default_model_name(train.get("method", "mculora"))
    uri = tracking_uri or train.get("mlflow_tracking_uri") or "sqlite:///mlflow.db"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    run_id = train["mlflow_run_id"]
    run = client.get_run(run_id)
    score, evidence = candidate_evidence(train, metrics, run.data.tags, key, task)
    evidence.update(identity_tags(train, run.data.params, run.data.tags, data_label))
    evidence.update(extra_tags or {})
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
        params.get("data_label"),  # null = derived from the manifest the run trained on
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
