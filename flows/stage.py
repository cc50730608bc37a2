"""One Prefect flow per pipeline stage, running the very function DVC runs (`imer <stage>`).

`stage_flow(stage, params_path)` is the generic flow: the stage's `run_stage` runs in
one task. Extraction stages instead map their clip chunks to tasks (flows/extract.py),
on the default runner or on Dask (`orchestration.extraction_runner`). The train stage
is sent to a work pool's deployment when `orchestration.train_pool` is set
(flows/dispatch.py), so a GPU worker elsewhere runs it while DVC waits here.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from flows.artifacts import publish_outcome, publish_stage_summary
from flows.settings import dataset_label, load_orchestration, section_hash
from pipeline.core.params import load_params
from flows.stages import STAGE_MODULES, stage_module

EXTRACTION_STAGES = {"extract_acoustic": "acoustic", "extract_visual": "visual", "extract_textual": "textual"}
OUTCOME_STAGES = {"train", "evaluate", "register"}


def stage_run_name() -> str:
    """`<stage>-<dataset>-p<hash of the stage's params section>`, e.g. `train-corpus-p1a2b3c4d`."""
    params = flow_run.parameters
    stage = params["stage"]
    path = params.get("params_path", "params.yaml")
    try:
        return f"{stage}-{dataset_label(path, stage)}-p{section_hash(stage_module(stage).SECTION, path)}"
    except Exception:  # noqa: BLE001 - a name must never fail the run
        return f"{stage}-unknown"


@task(name="run-stage", task_run_name="{stage}", cache_policy=NO_CACHE)
def run_stage_task(stage: str, params_path: str) -> dict[str, Any]:
    """The stage's own `run_stage` with its own params section (exactly what `imer <stage>` runs)."""
    module = stage_module(stage)
    return module.run_stage(load_params(module.SECTION, params_path))


def _run_extraction(stage: str, params_path: str, orch: dict[str, Any]) -> dict[str, Any]:
    from flows.extract import local_process_pool, prefect_chunk_mapper, run_extraction_stage

    params = load_params(stage_module(stage).SECTION, params_path)
    mapper = prefect_chunk_mapper(orch["chunk_retries"], orch["chunk_retry_delay_s"])
    if orch["extraction_runner"] == "dask":
        return run_extraction_stage(EXTRACTION_STAGES[stage], params, mapper)
    with local_process_pool(int(params.get("workers", 0))):
        return run_extraction_stage(EXTRACTION_STAGES[stage], params, mapper)


@flow(name="imer-stage", flow_run_name=stage_run_name, log_prints=True, validate_parameters=False)
def stage_flow(stage: str, params_path: str = "params.yaml", dispatch: bool = True) -> dict[str, Any]:
    """Run pipeline stage `stage`; `dispatch=False` forces an in-process run (what a pool worker does)."""
    if stage not in STAGE_MODULES:
        raise KeyError(f"unknown stage {stage!r}; known: {', '.join(STAGE_MODULES)}")
    orch = load_orchestration(params_path)
    if dispatch and stage == "train" and orch["train_pool"]:
        from flows.dispatch import dispatch_stage

        summary = dispatch_stage(stage, orch["train_pool"], params_path, orch)
    elif stage in EXTRACTION_STAGES:
        summary = _run_extraction(stage, params_path, orch)
    else:
        summary = run_stage_task(stage, params_path)
    publish_stage_summary(stage, summary)
    if stage in OUTCOME_STAGES:
        publish_outcome(root=Path("."))
    return summary


def flow_for_stage(stage: str, params_path: str = "params.yaml"):
    """`stage_flow`, with a DaskTaskRunner attached for extraction stages when configured."""
    orch = load_orchestration(params_path)
    if stage in EXTRACTION_STAGES and orch["extraction_runner"] == "dask":
        from flows.extract import dask_task_runner

        return stage_flow.with_options(task_runner=dask_task_runner(orch["dask_address"], orch["dask_workers"]))
    return stage_flow


def run_stage_in_prefect(stage: str, params_path: str = "params.yaml") -> dict[str, Any]:
    """Entry used by `imer <stage>`: run the stage's flow against the configured or a shared temporary API."""
    import os

    from prefect import tags

    from flows.api import shared_api

    parent = os.environ.get("IMER_PARENT_FLOW_RUN")  # set by the retrain flow around `dvc repro`
    with shared_api(), tags(*([f"parent:{parent}"] if parent else []), "dvc"):
        return flow_for_stage(stage, params_path)(stage=stage, params_path=params_path)
