"""Bring the DVC pipeline up to date under Prefect: `retrain` (nightly) and `ingest-new-clips`.

DVC decides what is stale, never us: `dvc status` says which stages are stale before,
`dvc repro` runs exactly those (each stage runs `imer <stage>`, i.e. its own Prefect
flow run, reporting to this run's API), and the stage entries of dvc.lock that changed
say which stages actually ran. The retrain run ends with the registry decision.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from flows.artifacts import REGISTRY, publish_outcome
from flows.settings import dataset_label, params_file_hash, under
from pipeline.core.atomic import write_json

EXTRACTION_TARGETS = ["extract_acoustic", "extract_visual", "extract_textual"]
PARENT_ENV = "IMER_PARENT_FLOW_RUN"
LAST_RETRAIN = Path("run/last_retrain.json")  # git-ignored: what the latest retrain found and ran


def _dvc() -> str:
    candidate = Path(sys.executable).parent / "dvc"
    return str(candidate) if candidate.exists() else "dvc"


def _env() -> dict[str, str]:
    """Child env: this run's API URL (already exported by the caller) and a parent-run tag."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    run_id = flow_run.get_id()
    if run_id:
        env[PARENT_ENV] = str(run_id)
    return env


@task(name="dvc-status", cache_policy=NO_CACHE)
def stale_stages(project_dir: str, targets: list[str] | None = None) -> dict[str, Any]:
    """`dvc status --json` for `targets` (all stages when None): {stage: [what changed]}."""
    # With targets, --with-deps also reports their upstream stages, which `dvc repro targets` runs too.
    scope = ["--with-deps", *targets] if targets else []
    proc = subprocess.run([_dvc(), "status", "--json", *scope], cwd=project_dir, env=_env(),
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{project_dir}: dvc status failed: {proc.stderr.strip()[-2000:]}")
    status = json.loads(proc.stdout or "{}")
    return {name.split(":")[-1]: changes for name, changes in status.items()}


def lock_entries(project_dir: str) -> dict[str, Any]:
    """Stage entries of dvc.lock (empty before the first repro)."""
    path = Path(project_dir) / "dvc.lock"
    if not path.exists():
        return {}
    return (yaml.safe_load(path.read_text()) or {}).get("stages", {})


@task(name="dvc-repro", cache_policy=NO_CACHE)
def dvc_repro(project_dir: str, targets: list[str] | None = None) -> list[str]:
    """Run `dvc repro` and return the stages it ran (their dvc.lock entries changed)."""
    logger = get_run_logger()
    before = lock_entries(project_dir)
    proc = subprocess.run([_dvc(), "repro", *(targets or [])], cwd=project_dir, env=_env(),
                          capture_output=True, text=True)
    logger.info("dvc repro output:\n%s", proc.stdout[-8000:])
    if proc.returncode != 0:
        raise RuntimeError(f"{project_dir}: dvc repro failed ({proc.returncode}): {proc.stderr.strip()[-4000:]}")
    after = lock_entries(project_dir)
    return [name for name in after if after[name] != before.get(name)]


def bring_up_to_date(project_dir: str, targets: list[str] | None) -> dict[str, Any]:
    """Stale stages before, stages that ran; `dvc repro` is skipped when nothing is stale."""
    stale = stale_stages(project_dir, targets)
    ran = dvc_repro(project_dir, targets) if stale else []
    return {"stale": sorted(stale), "ran": ran}


def retrain_run_name() -> str:
    path = under(flow_run.parameters.get("project_dir", "."), flow_run.parameters.get("params_path", "params.yaml"))
    try:
        return f"retrain-{dataset_label(path)}-p{params_file_hash(path)}"
    except Exception:  # noqa: BLE001 - a name must never fail the run
        return "retrain"


@flow(name="retrain", flow_run_name=retrain_run_name, log_prints=True)
def retrain_flow(project_dir: str = ".", params_path: str = "params.yaml") -> dict[str, Any]:
    """`dvc repro` of the whole pipeline, then the registry decision (reports/registry.json)."""
    from flows.api import shared_api

    with shared_api():
        outcome = bring_up_to_date(project_dir, None)
    registry = Path(project_dir) / REGISTRY
    outcome["registry"] = json.loads(registry.read_text()) if registry.exists() else None
    publish_outcome(root=Path(project_dir))
    write_json(Path(project_dir) / LAST_RETRAIN, {**outcome, "flow_run_id": str(flow_run.get_id())})
    decision = (outcome["registry"] or {}).get("decision", "no registry report")
    get_run_logger().info("stale before: %s; ran: %s; registry: %s", outcome["stale"], outcome["ran"], decision)
    return outcome


def ingest_run_name() -> str:
    path = under(flow_run.parameters.get("project_dir", "."), flow_run.parameters.get("params_path", "params.yaml"))
    try:
        return f"ingest-new-clips-{dataset_label(path)}"
    except Exception:  # noqa: BLE001
        return "ingest-new-clips"


@flow(name="ingest-new-clips", flow_run_name=ingest_run_name, log_prints=True)
def ingest_new_clips_flow(project_dir: str = ".", params_path: str = "params.yaml") -> dict[str, Any]:
    """Re-ingest the listing and extract features; the per-clip cache makes only new clips cost time."""
    from flows.api import shared_api

    with shared_api():
        outcome = bring_up_to_date(project_dir, EXTRACTION_TARGETS)
    write_json(Path(project_dir) / "run" / "last_ingest.json", {**outcome, "flow_run_id": str(flow_run.get_id())})
    return outcome
