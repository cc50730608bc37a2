"""`imer compare --register`: each row's best cell per column becomes a version of `imer-<row>`.

Per column (corpus profile or imported dataset) and row, the cell chosen is the one with the best
VALIDATION selection score among its seeds: the fixed-combination mean of the train stage's
selection metric in the cell's reports/metrics.json `val` section, in that metric's direction
(ties: the first seed of compare.yaml). Test scores never choose. The chosen cell is registered by
the register stage's own function (pipeline/register.py `register_from_reports`: lineage check,
evidence and identity tags, champion/challenger rule) under the model name `imer-<row>`, with the
column as its data label and the tags `compare.row`, `compare.column`, `compare.cell`,
`compare.cell_key` and `compare.val_by_seed` (the selection score of every seed).

Model names are per row, i.e. method x options (`imer-plain`, `imer-no_specific`,
`imer-mplmm_mult`), where a default run registers `imer-<train.method>`; a row named like a method
(`mculora`, `wander`) shares that model with the default runs, whose champion it may replace only
on the same data label (pipeline/tracking/registry.py).

Registering needs each cell's MLflow run with its logged pyfunc model: when compare.yaml names an
`mlflow.tracking_uri`, cells train and evaluate with MLflow on, into that store and experiment
(`with_cell_tracking`, applied after the cell key is computed: MLflow settings change no result, so
the keys of finished cells stay). A cell finished without a run cannot be registered; it is
reported with the fix (delete its folder, run again). A registered cell registers nothing again
(the register stage's `already_registered` answer). The outcome: reports/compare_register.json.
"""
from __future__ import annotations

import copy
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.core.atomic import write_json
from pipeline.core.metrics import selection_score
from pipeline.tracking.runs import DEFAULT_ARTIFACTS

REGISTERED = ("promoted", "kept", "already_registered")


def row_model_name(row: str) -> str:
    """The registered model of a compare row: `imer-<row>` (a default run uses `imer-<method>`)."""
    from pipeline.tracking.registry_compare import PREFIX  # imports mlflow: not at `imer compare` start

    return f"{PREFIX}{row}"


def absolute_uri(uri: str) -> str:
    """A tracking URI that means the same store from any folder: relative SQLite / file paths made absolute."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + str(Path(uri[len("sqlite:///"):]).resolve())
    if "://" not in uri and not uri.startswith("file:"):
        return str(Path(uri).resolve())
    return uri


def cell_tracking(settings: dict[str, Any], base: dict[str, Any]) -> dict[str, Any] | None:
    """The `train.mlflow` block of every cell (absolute URI and artifact root, compare.yaml's experiment),
    the experiment created here once, before cells run in parallel; None when compare.yaml names no store.
    Artifacts: compare.yaml `mlflow.artifact_root`, else `mlartifacts` next to a SQLite store, else
    params.yaml's `train.mlflow.artifact_root` (an existing experiment keeps its own location)."""
    if not settings.get("tracking_uri"):
        return None
    from mlflow import MlflowClient

    uri = absolute_uri(str(settings["tracking_uri"]))
    artifacts = settings.get("artifact_root") or (
        Path(uri[len("sqlite:///"):]).parent / DEFAULT_ARTIFACTS if uri.startswith("sqlite:///") else
        ((base.get("train") or {}).get("mlflow") or {}).get("artifact_root") or DEFAULT_ARTIFACTS)
    tracking = {"enabled": True, "tracking_uri": uri, "experiment": str(settings.get("experiment", "imer-compare")),
                "artifact_root": str(Path(artifacts).resolve())}
    client = MlflowClient(tracking_uri=tracking["tracking_uri"])
    if client.get_experiment_by_name(tracking["experiment"]) is None:
        client.create_experiment(tracking["experiment"], artifact_location=Path(tracking["artifact_root"]).as_uri())
    return tracking


def with_cell_tracking(params: dict[str, Any], tracking: dict[str, Any] | None) -> dict[str, Any]:
    """The cell's params with training and evaluation logging (run + pyfunc model) into `tracking`."""
    if tracking is None:
        return params
    out = copy.deepcopy(params)
    out["train"]["mlflow"] = {**(out["train"].get("mlflow") or {}), **tracking}
    out["evaluate"].update(log_mlflow=True, tracking_uri=None)  # None: the training run's store
    return out


@dataclass
class ScoredCell:
    """A finished cell and its validation selection score."""

    record: dict[str, Any]
    metric: str
    value: float  # the metric's val fixed-combination mean, as register records it
    rank: float  # higher is better (lower-is-better metrics negated); NaN -> -inf
    run_id: str | None


def score_cell(record: dict[str, Any]) -> ScoredCell:
    """Read a finished cell's train summary and metrics.json; its validation selection score."""
    from pipeline.register import selection_of

    folder = Path(record["folder"])
    paths = {"train": folder / "models" / "train_summary.json", "metrics": folder / "reports" / "metrics.json"}
    for path in paths.values():
        if not path.exists():
            raise FileNotFoundError(f"{path}: missing in finished cell {record['cell']} (delete {folder} and rerun)")
    train = json.loads(paths["train"].read_text())
    metrics = json.loads(paths["metrics"].read_text())
    task, key = selection_of(train, metrics, None, paths["metrics"])
    mean = metrics["val"]["fixed"]["mean"]
    rank = selection_score(mean, task, key)
    return ScoredCell(record, key, float(mean[key]), -math.inf if math.isnan(rank) else rank,
                      train.get("mlflow_run_id"))


def best_cells(records: list[dict[str, Any]]) -> dict[tuple[str, str], list[ScoredCell]]:
    """(column, row) -> its finished cells, best validation first (ties: declaration order)."""
    groups: dict[tuple[str, str], list[ScoredCell]] = {}
    for r in records:
        groups.setdefault((r["profile"], r["row"]), [])
        if r["status"] == "ok":
            groups[(r["profile"], r["row"])].append(score_cell(r))
    return {k: sorted(v, key=lambda s: -s.rank) for k, v in groups.items()}  # sorted() is stable


def register_best(records: list[dict[str, Any]], report_dir: str | Path) -> dict[str, Any]:
    """Register each (column, row)'s best validation cell as `imer-<row>`; the outcome (also
    reports/compare_register.json). A row that cannot be registered is reported, the others go on."""
    from pipeline.register import register_from_reports

    entries, stores = [], set()
    for (column, row), scored in best_cells(records).items():
        entry: dict[str, Any] = {"column": column, "row": row, "model": row_model_name(row)}
        entries.append(entry)
        if not scored:
            entry.update(status="no_cell", reason="no cell of this row finished on this column")
            continue
        best = scored[0]
        folder = Path(best.record["folder"])
        entry.update(cell=best.record["cell"], seed=best.record["seed"], metric=f"val/{best.metric}/mean",
                     value=best.value, val_by_seed={str(s.record["seed"]): s.value for s in scored})
        if best.run_id is None:
            entry.update(status="not_registrable", reason=f"{folder} trained without MLflow (no run, no logged "
                         "model): set compare.yaml mlflow.tracking_uri, delete the folder and run again")
            continue
        tags = {"compare.row": row, "compare.column": column, "compare.cell": best.record["cell"],
                "compare.cell_key": best.record.get("key", ""), "compare.val_by_seed": entry["val_by_seed"]}
        try:
            decision = register_from_reports(folder / "models" / "train_summary.json",
                                             folder / "reports" / "metrics.json", entry["model"],
                                             model_path=folder / "models" / "model.pt", data_label=column,
                                             extra_tags=tags)
        except Exception as exc:  # noqa: BLE001  (one row's failure is reported; the other rows go on)
            entry.update(status="failed", reason=f"{type(exc).__name__}: {exc}")
            continue
        stores.add(json.loads((folder / "models" / "train_summary.json").read_text()).get("mlflow_tracking_uri"))
        entry.update(status=decision.decision, version=decision.version, champion_version=decision.champion_version,
                     reason=decision.reason)
    out = {"selected_on": "validation selection score (fixed-combination mean); test never decides",
           "stores": sorted(s for s in stores if s), "rows": entries}
    write_json(Path(report_dir) / "compare_register.json", out)
    for e in entries:
        where = f"{e['column']}/{e['row']} -> {e['model']}"
        what = f"v{e['version']} ({e['status']}) from {e['cell']}, {e['metric']} {e['value']:.4f}" \
            if e["status"] in REGISTERED else f"{e['status']}: {e['reason']}"
        print(f"imer compare --register: {where}: {what}", file=sys.stderr)
    return out


def registered_all(result: dict[str, Any]) -> bool:
    return all(e["status"] in REGISTERED for e in result["rows"])


def run_register(records: list[dict[str, Any]], mlflow_settings: dict[str, Any], report_dir: str | Path,
                 spec_path: str | Path, params_paths: list[str], tracking_uri: str | None = None,
                 registry: bool = False, set_aliases: bool = True) -> int:
    """`imer compare --register [--registry]`: register, then compare the store the cells logged to;
    1 when a row was not registered."""
    if not mlflow_settings.get("tracking_uri"):
        print(f"imer compare --register: {spec_path} names no mlflow.tracking_uri: cells log no model to register",
              file=sys.stderr)
        return 1
    result = register_best(records, report_dir)
    rc = 0 if registered_all(result) else 1
    if registry:
        from pipeline.tracking.registry_compare import run_registry_compare

        stores = result["stores"]
        uri = tracking_uri or (stores[0] if len(stores) == 1 else None)
        rc = max(rc, run_registry_compare(uri, params_paths, spec_path, set_aliases))
    return rc
