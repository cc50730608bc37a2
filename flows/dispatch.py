"""Send a stage to a work pool's deployment and wait for it (the GPU training path).

The deployment `imer-stage/stage-on-<pool>` (prefect.yaml) runs `stage_flow(stage,
dispatch=False)` on whichever worker serves the pool; its outputs land in that
worker's checkout, so caller and worker must share the project storage (flows/README.md).
"""
from __future__ import annotations

from typing import Any

from prefect import get_run_logger
from prefect.deployments import run_deployment


class DispatchFailed(RuntimeError):
    """The dispatched run did not complete; the message names the deployment and the run."""


def deployment_for_pool(pool: str, orch: dict[str, Any]) -> str:
    return str(orch["stage_deployment"]).format(pool=pool)


def dispatch_stage(stage: str, pool: str, params_path: str, orch: dict[str, Any]) -> dict[str, Any]:
    """Run `stage` through the pool's deployment as a subflow run and return its summary."""
    name = deployment_for_pool(pool, orch)
    get_run_logger().info("dispatching %s to work pool %r via deployment %s", stage, pool, name)
    run = run_deployment(
        name,
        parameters={"stage": stage, "params_path": params_path, "dispatch": False},
        timeout=float(orch["dispatch_timeout_s"]),
        tags=[f"stage:{stage}", f"pool:{pool}"],
    )
    state = run.state
    if state is None or not state.is_completed():
        raise DispatchFailed(f"{name}: flow run {run.name} ({run.id}) ended {state.type if state else 'unknown'}: "
                             f"{state.message if state else ''}")
    try:  # only available when the worker persisted results
        result = state.result(raise_on_failure=False)
    except Exception:  # noqa: BLE001 - the stage's files are the real output
        result = None
    summary = result if isinstance(result, dict) else {}
    return {**summary, "dispatched_run": str(run.id), "deployment": name, "pool": pool}
