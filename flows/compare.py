"""`imer compare`: one command for a matrix of methods x options x seeds x data columns.

The matrix is declared in a small YAML file (default `compare.yaml`). Its columns are corpus
profiles and imported datasets (IEMOCAP folds as one column each); each column's data is built
once (flows/compare_data.py); each cell (row x seed x column) is one
run of the `train` and `evaluate` stages, the same `imer <stage>` commands DVC runs (inside
their Prefect flows unless Prefect is off), in its own folder with its own params.yaml whose
data paths point at the column's data. Cells run in parallel (`jobs`); a finished cell is
never recomputed: its folder is keyed by the hash of its train/evaluate params and of the
data it reads, and holds `cell.json` once done. A failed cell is recorded (`failed.json`,
log tail) and reported; the other cells go on, and the next invocation retries only it.
The report (reports/compare.json as DVC metrics, compare.md, compare.html) and an MLflow
parent run with one child run per cell come from pipeline/tracking/compare_report.py.

    imer compare [--spec compare.yaml] [--jobs N] [--params params.yaml] [--no-report] [--register] [--registry]

With `mlflow.tracking_uri` in compare.yaml, cells train and evaluate with MLflow on (a run with the
pyfunc model each; not part of the cell key); `--register` then registers each row's best-validation
cell per column as `imer-<row>` (flows/compare_register.py), and `--registry` compares the registry.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from flows.compare_data import Column, ColumnData, column_params, dataset_columns, prepare, set_dotted
from flows.compare_register import cell_tracking, run_register, with_cell_tracking
from pipeline.core.atomic import write_json
from pipeline.core.hashing import config_hash
from pipeline.core.params import load_all_params

CELL_STAGES = ("train", "evaluate")
LOG_TAIL = 4000  # characters of a failed command's output kept in failed.json


@dataclass
class Spec:
    """The declared matrix (compare.yaml)."""

    rows: dict[str, dict[str, Any]]  # row name -> dotted params it sets
    seeds: list[int]
    profiles: list[str]
    datasets: list[Column] = field(default_factory=list)  # imported datasets (and folds): columns beside the profiles
    common: dict[str, Any] = field(default_factory=dict)  # dotted params of every cell and profile
    baselines: list[str] = field(default_factory=list)  # rows every other row is tested against
    jobs: int = 2
    out_dir: str = "runs/compare"
    report_dir: str = "reports"
    prefect: bool | None = None  # None = params.yaml orchestration.prefect
    mlflow: dict[str, Any] = field(default_factory=dict)  # tracking_uri, experiment (empty = off)

    @classmethod
    def load(cls, path: str | Path) -> "Spec":
        raw = yaml.safe_load(Path(path).read_text()) or {}
        rows = {str(r["name"]): dict(r.get("set") or {}) for r in raw.get("rows", [])}
        if not rows or not raw.get("seeds"):
            raise ValueError(f"{path}: needs `rows` (name + set) and `seeds`")
        datasets = dataset_columns(list(raw.get("datasets") or []), str(path))
        profiles = list(raw["profiles"] or []) if "profiles" in raw else ([] if datasets else ["balanced"])
        if not profiles and not datasets:
            raise ValueError(f"{path}: needs at least one column: `profiles` or `datasets`")
        spec = cls(rows=rows, seeds=[int(s) for s in raw["seeds"]], profiles=profiles, datasets=datasets,
                   common=dict(raw.get("set") or {}), baselines=list(raw.get("baselines") or []),
                   jobs=int(raw.get("jobs", 2)), out_dir=str(raw.get("out_dir", "runs/compare")),
                   report_dir=str(raw.get("report_dir", "reports")), prefect=raw.get("prefect"),
                   mlflow=dict(raw.get("mlflow") or {}))
        unknown = [b for b in spec.baselines if b not in rows]
        if unknown:
            raise ValueError(f"{path}: baselines {unknown} are not rows ({', '.join(rows)})")
        labels = [c.label for c in spec.columns()]
        if len(set(labels)) != len(labels):
            raise ValueError(f"{path}: columns {labels} repeat a name (profiles and datasets share one namespace)")
        return spec

    def columns(self) -> list[Column]:
        """Profiles first, then datasets, in declaration order."""
        return [Column(p, "profile") for p in self.profiles] + list(self.datasets)


@dataclass
class Cell:
    row: str
    seed: int
    profile: str  # the column's label: a profile, or a dataset (`mosi`, `iemocap4-fold3`)
    key: str = ""
    folder: Path = Path(".")
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{self.profile}/{self.row}/seed{self.seed}"


def cell_params(params: dict[str, Any], data: ColumnData) -> dict[str, Any]:
    """The cell's params: data paths point at the column's data; outputs and MLflow stay in the cell."""
    data_paths = {"manifest": data.manifest, "features_dir": data.features_dir, "splits_dir": data.splits_dir}
    out = copy.deepcopy(params)
    for section in CELL_STAGES:
        out[section].update({k: str(v) for k, v in data_paths.items() if k in out[section]})
    out["train"]["out_dir"] = "."
    out["train"].setdefault("mlflow", {})["enabled"] = False  # the report logs cells as child runs
    out["evaluate"]["log_mlflow"] = False
    return out


def cell_key(params: dict[str, Any], data_hash: str) -> str:
    return config_hash({"train": params["train"], "evaluate": params["evaluate"], "data": data_hash})


def _imer() -> list[str]:
    exe = Path(sys.executable).with_name("imer")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "flows.cli"]


def run_imer(stages: tuple[str, ...], cwd: Path, prefect: bool, env: dict[str, str]) -> tuple[int, str, float]:
    """`imer <stages> --params params.yaml` in `cwd`; (exit code, output tail, seconds)."""
    argv = [*_imer(), *stages, "--params", "params.yaml"] + ([] if prefect else ["--no-prefect"])
    started = time.perf_counter()
    with open(cwd / "log.txt", "w") as log:
        rc = subprocess.call(argv, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, env=env)
    return rc, (cwd / "log.txt").read_text(errors="replace")[-LOG_TAIL:], time.perf_counter() - started


def plan_cells(base: dict[str, Any], spec: Spec, column: Column, data: ColumnData, out_dir: Path,
               tracking: dict[str, Any] | None = None) -> list[Cell]:
    """The cells of one column whose data is ready, in declaration order (rows, then seeds);
    `tracking` (compare_register.cell_tracking) turns MLflow on after the key is taken."""
    prof = column_params(base, spec.common, column)
    cells = []
    for row, dotted in spec.rows.items():
        for seed in spec.seeds:
            params = cell_params(set_dotted(prof, {**dotted, "train.seed": seed}), data)
            key = cell_key(params, data.key)
            params = with_cell_tracking(params, tracking)
            cells.append(Cell(row, seed, column.label, key, out_dir / "cells" / key[:16], params))
    return cells


def _data_failed(spec: Spec, profile: str, error: Exception) -> list[dict[str, Any]]:
    """Records of the cells a profile could not run because its data failed."""
    return [{"cell": f"{profile}/{row}/seed{seed}", "row": row, "seed": seed, "profile": profile, "key": "",
             "folder": "", "status": "failed", "exit_code": None, "seconds": 0.0, "computed": True,
             "log_tail": str(error)[-LOG_TAIL:]} for row in spec.rows for seed in spec.seeds]


def run_cell(cell: Cell, prefect: bool, env: dict[str, str]) -> dict[str, Any]:
    """Train and evaluate one cell unless it is already done; its record (also cell.json / failed.json)."""
    done = cell.folder / "cell.json"
    if done.exists():
        return {**json.loads(done.read_text()), "computed": False}
    if cell.folder.exists():
        shutil.rmtree(cell.folder)  # a failed or interrupted attempt: start clean
    cell.folder.mkdir(parents=True)
    (cell.folder / "params.yaml").write_text(yaml.safe_dump(cell.params, sort_keys=False))
    record = {"cell": cell.name, "row": cell.row, "seed": cell.seed, "profile": cell.profile, "key": cell.key,
              "folder": str(cell.folder)}
    rc, tail, seconds = run_imer(CELL_STAGES, cell.folder, prefect, env)
    record["seconds"] = round(seconds, 2)
    if rc != 0:
        record.update(status="failed", exit_code=rc, log_tail=tail)
        write_json(cell.folder / "failed.json", record)
        return {**record, "computed": True}
    record["status"] = "ok"
    write_json(done, record)
    return {**record, "computed": True}


def run_matrix(spec: Spec, params_paths: list[str], jobs: int | None = None) -> list[dict[str, Any]]:
    """Every cell's record, in declaration order (columns, rows, seeds).

    Each column's data is built once (in parallel across columns); a column's cells start as
    soon as its data is ready, `jobs` processes at a time."""
    from flows.settings import prefect_enabled

    base = load_all_params(params_paths)
    out_dir = Path(spec.out_dir)
    tracking = cell_tracking(spec.mlflow, base)  # the store and experiment, created before cells start
    prefect = prefect_enabled(params_paths[0]) if spec.prefect is None else bool(spec.prefect)
    env = {**os.environ}
    if not prefect:
        env["IMER_NO_PREFECT"] = "1"
    jobs = max(1, jobs or spec.jobs)
    with _prefect_api(prefect, out_dir, env), ThreadPoolExecutor(max_workers=jobs) as pool:  # one process per task
        futures = {c.label: (c, pool.submit(_prepare, base, spec, c, out_dir, prefect, env)) for c in spec.columns()}
        records: dict[str, list] = {}
        for label, (column, future) in futures.items():
            try:
                data = future.result()
            except Exception as exc:  # noqa: BLE001  (a column's data failed: its cells are reported, others go on)
                records[label] = _data_failed(spec, label, exc)
                continue
            cells = plan_cells(base, spec, column, data, out_dir, tracking)
            records[label] = [pool.submit(run_cell, c, prefect, env) for c in cells]
        return [r if isinstance(r, dict) else r.result() for label in futures for r in records[label]]


def _prepare(base: dict[str, Any], spec: Spec, column: Column, out_dir: Path, prefect: bool,
             env: dict[str, str]) -> ColumnData:
    return prepare(column, column_params(base, spec.common, column), out_dir, prefect, env, run_imer)


class _prefect_api:
    """One local Prefect server for all cells (as `imer repro`), unless Prefect is off or already set."""

    def __init__(self, prefect: bool, out_dir: Path, env: dict[str, str]) -> None:
        self.active = prefect and not env.get("PREFECT_API_URL")
        self.run_dir, self.env = out_dir / "run", env

    def __enter__(self) -> None:
        if self.active:
            from flows.repro import prefect_home
            from flows.servers import free_port, prefect_spec, start_server

            spec = prefect_spec(free_port(), prefect_home(), scheduler=False)
            spec.name = "prefect-compare"
            self.env["PREFECT_API_URL"] = start_server(spec, self.run_dir)["url"]

    def __exit__(self, *exc: object) -> None:
        if self.active:
            from flows.servers import stop_server

            stop_server(self.run_dir, "prefect-compare")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="imer compare", description=__doc__.splitlines()[0])
    parser.add_argument("--spec", default="compare.yaml", help="the matrix declaration (default compare.yaml)")
    parser.add_argument("--params", action="append", help="params file(s) the cells start from (default params.yaml)")
    parser.add_argument("--jobs", type=int, default=None, help="cells run in parallel (default: the spec's jobs)")
    parser.add_argument("--no-report", action="store_true", help="run the cells only")
    parser.add_argument("--register", action="store_true", help="after the matrix (finished cells reused): "
                        "register each row's best-validation cell per column as imer-<row>")
    parser.add_argument("--registry", action="store_true", help="run no cell: compare the registered champions of "
                        "every imer-* model from the MLflow registry and mark the recommended version per profile "
                        "(with --register: after registering, in the cells' store)")
    parser.add_argument("--tracking-uri", default=None, help="--registry: the MLflow store (default: "
                        "MLFLOW_TRACKING_URI, params.yaml register/train.mlflow, compare.yaml mlflow)")
    parser.add_argument("--no-alias", action="store_true", help="--registry: write the table, move no alias")
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.registry and not args.register:
        from pipeline.tracking.registry_compare import run_registry_compare

        return run_registry_compare(args.tracking_uri, args.params or ["params.yaml"], args.spec, not args.no_alias)
    spec = Spec.load(args.spec)
    started = time.perf_counter()
    records = run_matrix(spec, args.params or ["params.yaml"], args.jobs)
    wall = time.perf_counter() - started
    failed = [r for r in records if r["status"] != "ok"]
    computed = sum(r["computed"] for r in records)
    print(f"imer compare: {len(records)} cells, {computed} computed, {len(failed)} failed, {wall:.0f} s", file=sys.stderr)
    for r in failed:
        print(f"  failed: {r['cell']} (exit {r.get('exit_code')}), log {r['folder']}/log.txt", file=sys.stderr)
    if not args.no_report:
        from pipeline.tracking.compare_report import write_compare_report

        paths = write_compare_report(records, spec.baselines, spec.report_dir, spec.mlflow,
                                     {"wall_s": round(wall, 1), "jobs": args.jobs or spec.jobs, "computed": computed})
        print(json.dumps({k: str(v) for k, v in paths.items()}, indent=2))
    if args.register:
        return max(int(bool(failed)), run_register(records, spec.mlflow, spec.report_dir, args.spec, args.params
                                                   or ["params.yaml"], args.tracking_uri, args.registry,
                                                   not args.no_alias))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
