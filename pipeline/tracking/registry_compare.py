"""`imer compare --registry`: every method's registered champion side by side, from the MLflow store alone.

Reads the model registry (the version tags the register stage writes, registry.py) and,
for the test columns only, the metrics logged on each version's run; never a report file.
Validation scores on different data do not compare, so there is one section per data label
(the version tag `data`: corpus profile or imported dataset). A section's rows: each `imer-*`
model's champion trained on that data, or, where its champion was trained on other data, the
model's best version on this data (marked "not champion").

Recommendation per data label: the alias `recommended-<label>` goes to the one version, across
all models, with the best VALIDATION selection score: the task's default metric
(core.metrics.DEFAULT_SELECTION) averaged over the 7 fixed combinations, in that metric's
direction(). Ties go to fewer trainable parameters, then the model name, then the lower version.
Test scores are shown and never decide. MLflow aliases are per registered model, so the alias
is removed from every other model, and the winner carries the tags `recommended_for`,
`recommended_metric`, `recommended_value`, `recommended_runner_up` (the best version of another
model). `recommended_model(client, label)` answers "which model is recommended for this profile".
An unchanged registry gives unchanged answers, and nothing is written the second time.
"""
from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from pipeline.core.atomic import atomic_path, write_json
from pipeline.core.metrics import DEFAULT_SELECTION, direction
from pipeline.core.modalities import COMBINATIONS
from pipeline.tracking.registry import CHAMPION, DATA_TAG, SCORE_TAG, UNKNOWN_DATA, float_or_none, val_tag

PREFIX = "imer-"  # registered model names of this project (register.model_name null = imer-<method>)
ALIAS_PREFIX = "recommended-"
REC_TAGS = ("recommended_for", "recommended_metric", "recommended_value", "recommended_runner_up")
COLUMNS = (*COMBINATIONS, "mean", "natural")
DEFAULT_URI = "sqlite:///mlflow.db"


def recommended_alias(label: str) -> str:
    """`recommended-<label>` with every character MLflow aliases refuse replaced by '-'."""
    return ALIAS_PREFIX + re.sub(r"[^A-Za-z0-9_-]+", "-", label)


def recommended_model(client: MlflowClient, label: str, prefix: str = PREFIX) -> tuple[str, str]:
    """(model name, version) holding `recommended-<label>`; LookupError when no model holds it."""
    alias = recommended_alias(label)
    holders = [(m.name, str(m.aliases[alias])) for m in _models(client, prefix) if alias in (m.aliases or {})]
    if len(holders) > 1:
        raise ValueError(f"alias {alias!r} is on several models {holders}: run `imer compare --registry` to repair")
    if not holders:
        raise LookupError(f"no {prefix}* model has the alias {alias!r} (run `imer compare --registry`)")
    return holders[0]


def registry_tracking_uri(explicit: str | None, params: dict[str, Any], compare_mlflow: dict[str, Any]) -> str:
    """The store to read: --tracking-uri, MLFLOW_TRACKING_URI, params register/train.mlflow, compare.yaml."""
    train_uri = ((params.get("train") or {}).get("mlflow") or {}).get("tracking_uri")
    return str(explicit or os.environ.get("MLFLOW_TRACKING_URI") or (params.get("register") or {}).get("tracking_uri")
               or train_uri or compare_mlflow.get("tracking_uri") or DEFAULT_URI)


def compare_registry(client: MlflowClient, prefix: str = PREFIX, set_aliases: bool = True) -> dict[str, Any]:
    """The comparison (JSON-able): per data label its rows, ranked by validation, and its recommendation;
    with `set_aliases`, the recommendation aliases and tags are brought in line (`changes` lists the writes)."""
    models = _models(client, prefix)
    versions = {m.name: _versions(client, m.name) for m in models}
    sections: dict[str, dict[str, Any]] = {}
    for label in sorted({_data(v) for vs in versions.values() for v in vs if _registered(v)}):
        rows = [r for m in models if (r := _row(client, m, versions[m.name], label)) is not None]
        task = rows[0]["task"] if rows else "classification"
        metric = DEFAULT_SELECTION.get(task, "wa")
        rows.sort(key=lambda r: _rank_key(r, metric))
        ranked = [r for r in rows if _score(r) is not None]
        rec = None
        if ranked and label != UNKNOWN_DATA:
            runner = ranked[1] if len(ranked) > 1 else None
            rec = {"model": ranked[0]["model"], "version": ranked[0]["version"], "alias": recommended_alias(label),
                   "metric": val_tag(metric, "mean"), "value": _score(ranked[0]),
                   "runner_up": None if runner is None else {k: runner[k] for k in ("model", "version")}
                   | {"value": _score(runner)}, "candidates": len(ranked)}
        sections[label] = {"task": task, "metric": metric, "direction": direction(metric), "rows": rows,
                           "recommended": rec}
    out = {"source": {"tracking_uri": client.tracking_uri, "models": f"{prefix}*",
                      "read": "MLflow model registry version tags; test columns from each version's run metrics"},
           "columns": {"val": "VALIDATION scores (they chose each champion and the recommendation)",
                       "test": "test scores logged on the version's run: shown, never used to choose"},
           "data": sections,
           "without_champion": sorted(m.name for m in models if CHAMPION not in (m.aliases or {}))}
    if set_aliases:
        out["changes"] = apply_recommendations(client, models, versions, sections)
    return out


def apply_recommendations(client: MlflowClient, models: list[Any], versions: dict[str, list[Any]],
                          sections: dict[str, dict[str, Any]]) -> list[str]:
    """Move each `recommended-<label>` alias to its winner (and off every other model), tag the winner,
    clear the tags of versions that lost it; returns what was written (empty when all was in line)."""
    want = {rec["alias"]: rec for s in sections.values() if (rec := s["recommended"]) is not None}
    changes: list[str] = []
    for model in models:
        for alias, version in sorted((model.aliases or {}).items()):
            rec = want.get(alias)
            holder = (model.name, str(version))
            if alias.startswith(ALIAS_PREFIX) and (rec is None or (rec["model"], rec["version"]) != holder):
                client.delete_registered_model_alias(model.name, alias)
                changes.append(f"removed {alias} from {model.name} v{version}")
    for name, vs in versions.items():
        for v in vs:
            label = v.tags.get("recommended_for")
            rec = want.get(recommended_alias(label)) if label else None
            if label and (rec is None or (rec["model"], rec["version"]) != (name, str(v.version))):
                for key in REC_TAGS:
                    if key in v.tags:
                        client.delete_model_version_tag(name, str(v.version), key)
                changes.append(f"cleared recommended_* tags of {name} v{v.version}")
    for label, section in sections.items():
        rec = section["recommended"]
        if rec is None:
            continue
        mv = client.get_model_version(rec["model"], rec["version"])
        if rec["alias"] not in (mv.aliases or []):
            client.set_registered_model_alias(rec["model"], rec["alias"], rec["version"])
            changes.append(f"set {rec['alias']} on {rec['model']} v{rec['version']}")
        runner = rec["runner_up"]
        tags = {"recommended_for": label, "recommended_metric": rec["metric"],
                "recommended_value": f"{rec['value']:.6g}",
                "recommended_runner_up": "none" if runner is None else
                f"{runner['model']} v{runner['version']} ({rec['metric']} {runner['value']:.6g})"}
        for key, value in tags.items():
            if mv.tags.get(key) != value:
                client.set_model_version_tag(rec["model"], rec["version"], key, value)
                changes.append(f"tagged {rec['model']} v{rec['version']} {key}={value}")
    return changes


def write_registry_report(result: dict[str, Any], report_dir: str | Path) -> dict[str, Path]:
    """reports/registry_compare.json and registry_compare.md."""
    from pipeline.tracking.registry_report import registry_markdown

    report_dir = Path(report_dir)
    paths = {"json": report_dir / "registry_compare.json", "md": report_dir / "registry_compare.md"}
    write_json(paths["json"], result)
    with atomic_path(paths["md"]) as tmp:
        tmp.write_text(registry_markdown(result))
    return paths


def run_registry_compare(tracking_uri: str | None, params_paths: list[str], spec_path: str | Path,
                         set_aliases: bool = True) -> int:
    """`imer compare --registry`: resolve the store, compare, write the report, print the recommendations."""
    import sys

    import yaml

    from pipeline.core.params import load_all_params

    params = load_all_params([p for p in params_paths if p != "params.yaml" or Path(p).exists()])
    spec = (yaml.safe_load(Path(spec_path).read_text()) or {}) if Path(spec_path).exists() else {}
    uri = registry_tracking_uri(tracking_uri, params, spec.get("mlflow") or {})
    result = compare_registry(MlflowClient(tracking_uri=uri, registry_uri=uri), set_aliases=set_aliases)
    paths = write_registry_report(result, spec.get("report_dir", "reports"))
    for label, section in result["data"].items():
        rec = section["recommended"]
        line = "no recommendation" if rec is None else \
            f"{rec['alias']} -> {rec['model']} v{rec['version']} ({rec['metric']} {rec['value']:.4f})"
        print(f"imer compare --registry: {label}: {len(section['rows'])} model(s); {line}", file=sys.stderr)
    if not result["data"]:
        print(f"imer compare --registry: no registered {PREFIX}* version in {uri}", file=sys.stderr)
    print(json.dumps({k: str(v) for k, v in paths.items()}, indent=2))
    return 0


# ---------------------------------------------------------------- reading the registry
def _models(client: MlflowClient, prefix: str) -> list[Any]:
    models, token = [], None
    while True:
        page = client.search_registered_models(filter_string=f"name LIKE '{prefix}%'", max_results=100,
                                               page_token=token)
        models += list(page)
        token = page.token
        if not token:
            return sorted(models, key=lambda m: m.name)


def _versions(client: MlflowClient, name: str) -> list[Any]:
    found = client.search_model_versions(f"name = '{name}'")
    return sorted(found, key=lambda v: int(v.version))


def _registered(version: Any) -> bool:
    """Written by the register stage (a decision recorded), not e.g. an adapted model's version."""
    return "decision" in version.tags


def _data(version: Any) -> str:
    return version.tags.get(DATA_TAG) or UNKNOWN_DATA


def _row(client: MlflowClient, model: Any, versions: list[Any], label: str) -> dict[str, Any] | None:
    """The model's row in `label`'s section: its champion if trained on that data, else its best version there."""
    mine = [v for v in versions if _registered(v) and _data(v) == label]
    if not mine:
        return None
    champion = (model.aliases or {}).get(CHAMPION)
    rows = [_version_row(client, model.name, v, str(v.version) == str(champion)) for v in mine]
    chosen = [r for r in rows if r["champion"]]
    return chosen[0] if chosen else sorted(rows, key=lambda r: _rank_key(r, r["metric"]))[0]


def _version_row(client: MlflowClient, name: str, v: Any, champion: bool) -> dict[str, Any]:
    tags = v.tags
    task = tags.get("task", "classification")
    metric = DEFAULT_SELECTION.get(task, "wa")
    val = {c: x for c in COLUMNS if (x := float_or_none(tags.get(val_tag(metric, c)))) is not None}
    if not val and tags.get("selection_metric") == metric:  # versions registered before the val/* tags
        val = {c: float(x) for c, x in json.loads(tags.get("val_scores") or "{}").items()}
        if (mean := float_or_none(tags.get(SCORE_TAG))) is not None:
            val["mean"] = mean
    test: dict[str, float] = {}
    try:
        metrics = client.get_run(v.run_id).data.metrics if v.run_id else {}
        test = {c: float(metrics[f"test/{metric}/{c}"]) for c in COLUMNS if f"test/{metric}/{c}" in metrics}
    except MlflowException:
        pass  # the run was deleted: the registry row stands without test columns
    return {"model": name, "version": str(v.version), "champion": champion, "aliases": sorted(v.aliases or []),
            "data": _data(v), "task": task, "metric": metric, "method": tags.get("imer.method"),
            "variant": tags.get("imer.variant"), "options": json.loads(tags.get("options") or "{}"),
            "seed": tags.get("seed"), "params_hash": tags.get("params_hash"),
            "trainable_params": _int(tags.get("imer.trainable_params")), "run_id": v.run_id,
            "decision": tags.get("decision"), "val": val, "test": test or None}


def _score(row: dict[str, Any]) -> float | None:
    value = row["val"].get("mean")
    return None if value is None or math.isnan(value) else value


def _rank_key(row: dict[str, Any], metric: str) -> tuple:
    """Best validation mean first (in the metric's direction); ties: fewer trainable params, name, version."""
    score = _score(row)
    signed = math.inf if score is None else (score if direction(metric) == "min" else -score)
    params = row["trainable_params"] if row["trainable_params"] is not None else math.inf
    return (signed, params, row["model"], int(row["version"]))


def _int(value: str | None) -> int | None:
    f = float_or_none(value)
    return None if f is None or math.isnan(f) else int(f)
