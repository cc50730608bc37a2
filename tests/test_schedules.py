"""The two scheduled deployments never run at the same time on one checkout (a Prefect concurrency limit)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.prefect_server import create_pools, prefect_api, prefect_server  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]
SCHEDULED = ("nightly-retrain", "ingest-new-clips")


def _deployments() -> dict[str, dict]:
    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    return {d["name"]: d for d in spec["deployments"]}


def test_scheduled_deployments_share_one_limited_queue():
    deployments = _deployments()
    scheduled = [name for name, d in deployments.items() if d.get("schedules")]
    assert sorted(scheduled) == sorted(SCHEDULED)
    queues = {(deployments[n]["work_pool"]["name"], deployments[n]["work_pool"].get("work_queue_name"))
              for n in scheduled}
    assert len(queues) == 1 and None not in next(iter(queues))  # one named queue for both
    for name in scheduled:
        assert deployments[name]["concurrency_limit"]["limit"] == 1
    pool, queue = next(iter(queues))
    script = yaml.safe_load((ROOT / "prefect.yaml").read_text())["build"][0][
        "prefect.deployments.steps.run_shell_script"]["script"]
    assert f"work-queue create {queue} --pool {pool} --limit 1" in script


@pytest.mark.slow
@pytest.mark.integration
def test_server_hands_out_one_scheduled_run_at_a_time(prefect_api):  # noqa: F811
    """`prefect deploy` of both into a real server: the queue has limit 1, so of two due runs a worker gets one."""
    from prefect.client.orchestration import get_client

    url, env = prefect_api
    create_pools(url, ("cpu",))
    cmd = [str(Path(sys.executable).parent / "prefect"), "--no-prompt", "deploy"]
    cmd += [a for n in SCHEDULED for a in ("--name", n)]
    for _ in range(2):  # deploying again keeps the limit (the build step is idempotent)
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with get_client(sync_client=True) as client:
        queue = client.read_work_queue_by_name("checkout", work_pool_name="cpu")
        assert queue.concurrency_limit == 1
        runs = []
        for name in ("retrain/nightly-retrain", "ingest-new-clips/ingest-new-clips"):
            deployment = client.read_deployment_by_name(name)
            assert deployment.work_queue_name == "checkout"
            runs.append(client.create_flow_run_from_deployment(deployment.id).id)
        handed = client.get_scheduled_flow_runs_for_work_pool("cpu", work_queue_names=["checkout"])
        assert len([r for r in handed if r.flow_run.id in runs]) == 1
        client.update_work_queue(queue.id, concurrency_limit=None)  # control: without the limit both are due
        unlimited = client.get_scheduled_flow_runs_for_work_pool("cpu", work_queue_names=["checkout"])
    assert len([r for r in unlimited if r.flow_run.id in runs]) == 2
