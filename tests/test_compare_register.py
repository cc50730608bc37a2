"""`imer compare --register`: each row's best-validation cell per column becomes a version of `imer-<row>`.

Fast: the choice among seeds (validation only, the metric's direction), cells without an MLflow
run reported, MLflow settings left out of the cell key. Slow: a tiny real matrix (2 rows x 2 seeds)
whose cells log to a real SQLite store; registered once, nothing registered again, then compared.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from flows.compare import Spec, plan_cells
from flows.compare_data import Column, ColumnData
from flows.compare_register import absolute_uri, best_cells, cell_tracking, register_best, row_model_name
from pipeline.core.modalities import COMBINATIONS
from pipeline.core.params import load_all_params
from tests.test_compare import TINY


def _cell(root: Path, row: str, seed: int, val_mean: float, test_mean: float, task: str = "classification",
          run_id: str | None = None) -> dict:
    """A finished cell's train summary and metrics.json (val and test sections), with chosen means."""
    folder = root / f"{row}-{seed}"
    (folder / "models").mkdir(parents=True)
    (folder / "reports").mkdir()
    key = "wa" if task == "classification" else "mae"
    split = lambda m: {"fixed": {**{c: {key: m} for c in COMBINATIONS}, "mean": {key: m}}, "natural": {key: m}}  # noqa: E731
    (folder / "reports" / "metrics.json").write_text(json.dumps({"val": split(val_mean), "test": split(test_mean)}))
    summary = {"seed": seed, "selection_metric": key, "mlflow_run_id": run_id}
    (folder / "models" / "train_summary.json").write_text(json.dumps(summary))
    return {"cell": f"balanced/{row}/seed{seed}", "row": row, "seed": seed, "profile": "balanced",
            "key": f"{row}{seed}", "folder": str(folder), "status": "ok", "seconds": 1.0, "computed": True}


def test_best_cell_is_chosen_on_validation_never_test(tmp_path: Path) -> None:
    records = [_cell(tmp_path, "plain", 1, 0.50, 0.90), _cell(tmp_path, "plain", 2, 0.60, 0.40),
               _cell(tmp_path, "mae_row", 1, 0.80, 0.10, "regression"),
               _cell(tmp_path, "mae_row", 2, 0.70, 0.90, "regression"),
               _cell(tmp_path, "tie", 1, 0.55, 0.1), _cell(tmp_path, "tie", 2, 0.55, 0.9),
               {"cell": "balanced/gone/seed1", "row": "gone", "seed": 1, "profile": "balanced", "status": "failed"}]
    best = best_cells(records)
    assert best[("balanced", "plain")][0].record["seed"] == 2  # best val, worst test
    assert best[("balanced", "mae_row")][0].record["seed"] == 2  # MAE: lower is better
    assert best[("balanced", "mae_row")][0].value == pytest.approx(0.70)
    assert best[("balanced", "tie")][0].record["seed"] == 1  # ties: the first seed declared
    assert best[("balanced", "gone")] == []


def test_cells_without_a_run_are_reported_not_registered(tmp_path: Path) -> None:
    records = [_cell(tmp_path, "plain", 1, 0.5, 0.5), _cell(tmp_path, "plain", 2, 0.6, 0.5),
               {"cell": "balanced/gone/seed1", "row": "gone", "seed": 1, "profile": "balanced", "status": "failed"}]
    out = register_best(records, tmp_path / "reports")
    rows = {e["row"]: e for e in out["rows"]}
    assert rows["plain"]["status"] == "not_registrable" and "trained without MLflow" in rows["plain"]["reason"]
    assert rows["plain"]["seed"] == 2 and rows["plain"]["model"] == "imer-plain"
    assert rows["plain"]["val_by_seed"] == {"1": 0.5, "2": 0.6} and rows["gone"]["status"] == "no_cell"
    assert json.loads((tmp_path / "reports" / "compare_register.json").read_text()) == out


def test_absolute_uri(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert absolute_uri("sqlite:///mlflow.db") == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert absolute_uri("sqlite:////abs/m.db") == "sqlite:////abs/m.db"
    assert absolute_uri("http://host:5000") == "http://host:5000"
    assert absolute_uri("mlruns") == str(tmp_path / "mlruns")


def test_mlflow_settings_do_not_change_cell_keys(tmp_path: Path) -> None:
    base = load_all_params(["params.yaml"])
    spec = Spec(rows={"plain": {"train.variant": "plain"}, "mculora": {}}, seeds=[1, 2], profiles=["balanced"],
                mlflow={"tracking_uri": f"sqlite:///{tmp_path / 'm.db'}", "experiment": "cmp"})
    data = ColumnData("datahash", tmp_path / "manifest.parquet", tmp_path / "features", tmp_path / "splits")
    column = Column("balanced", "profile")
    tracking = cell_tracking(spec.mlflow, base)
    assert tracking["artifact_root"] == str(tmp_path / "mlartifacts")  # next to the SQLite store
    off = plan_cells(base, spec, column, data, tmp_path)
    on = plan_cells(base, spec, column, data, tmp_path, tracking)
    assert [c.key for c in off] == [c.key for c in on] and len({c.key for c in on}) == 4
    assert not off[0].params["train"]["mlflow"]["enabled"] and not off[0].params["evaluate"]["log_mlflow"]
    assert on[0].params["train"]["mlflow"] == tracking and on[0].params["evaluate"]["log_mlflow"] is True
    assert row_model_name("mplmm_mult") == "imer-mplmm_mult"


def _val_score(folder: Path) -> float:
    metrics = json.loads((folder / "reports" / "metrics.json").read_text())
    return float(metrics["val"]["fixed"]["mean"]["wa"])


@pytest.mark.slow
def test_tiny_matrix_registers_each_rows_best_cell_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow import MlflowClient

    from flows.compare import main

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    spec = {"out_dir": str(tmp_path / "runs"), "report_dir": str(tmp_path / "reports"), "jobs": 2, "prefect": False,
            "profiles": ["balanced"], "seeds": [2, 1], "baselines": ["plain"], "set": TINY,
            "mlflow": {"tracking_uri": uri, "experiment": "cmp"},
            "rows": [{"name": "plain", "set": {"train.variant": "plain"}}, {"name": "mculora", "set": {}}]}
    (tmp_path / "compare.yaml").write_text(yaml.safe_dump(spec))
    argv = ["--spec", str(tmp_path / "compare.yaml"), "--params", str(Path("params.yaml").resolve()), "--no-report"]
    assert main([*argv, "--register"]) == 0

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    cells = {}
    for done in (tmp_path / "runs" / "cells").glob("*/cell.json"):
        rec = json.loads(done.read_text())
        summary = json.loads((done.parent / "models" / "train_summary.json").read_text())
        cells.setdefault(rec["row"], []).append((rec["seed"], _val_score(done.parent), summary["mlflow_run_id"]))
    assert sorted(cells) == ["mculora", "plain"] and all(len(v) == 2 for v in cells.values())
    best = {}
    for row, found in cells.items():
        found.sort(key=lambda f: spec["seeds"].index(f[0]))  # declaration order: the first seed wins a tie
        top = max(v for _, v, _ in found)
        best[row] = next(f for f in found if f[1] == top)
        versions = client.search_model_versions(f"name = '{row_model_name(row)}'")
        assert len(versions) == 1
        v = versions[0]
        assert v.run_id == best[row][2] and v.tags["seed"] == str(best[row][0])
        assert float(v.tags["val/wa/mean"]) == pytest.approx(best[row][1])
        assert v.tags["compare.row"] == row and v.tags["compare.column"] == "balanced" and v.tags["data"] == "balanced"
        assert json.loads(v.tags["compare.val_by_seed"]) == {str(s): pytest.approx(x) for s, x, _ in found}
        assert "champion" in client.get_registered_model(row_model_name(row)).aliases

    # again, with the registry comparison: nothing registered, nothing recomputed, both rows compared
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "runs" / "cells").glob("*/cell.json")}
    assert main([*argv, "--register", "--registry"]) == 0
    again = json.loads((tmp_path / "reports" / "compare_register.json").read_text())
    assert {e["status"] for e in again["rows"]} == {"already_registered"}
    assert all(len(client.search_model_versions(f"name = '{row_model_name(r)}'")) == 1 for r in cells)
    assert stamps == {p: p.stat().st_mtime_ns for p in (tmp_path / "runs" / "cells").glob("*/cell.json")}

    table = json.loads((tmp_path / "reports" / "registry_compare.json").read_text())["data"]["balanced"]
    assert {r["model"] for r in table["rows"]} == {"imer-plain", "imer-mculora"}
    rec = table["recommended"]
    assert rec["value"] == pytest.approx(max(b[1] for b in best.values()))
    winners = {row_model_name(r) for r, b in best.items() if b[1] == rec["value"]}
    assert rec["model"] in winners and rec["alias"] == "recommended-balanced"
    assert str(client.get_model_version_by_alias(rec["model"], "recommended-balanced").version) == rec["version"]
