"""Issue 13.7: a SIGKILLed training leaves no RUNNING MLflow run and no temporary folder behind for good.

Real trainer processes (they open a run with `start_run` and a folder with `owned_tmpdir`, then
wait); one is SIGKILLed, one stays alive. The next training start closes only the dead one's run.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from mlflow import MlflowClient

import psutil

from pipeline.core.processes import Owner, current_owner, owned_tmpdir, remove_dead_tmpdirs
from pipeline.tracking.runs import NOTE_TAG, close_stale_runs, owner_tags, start_run

PROJECT_ROOT = Path(__file__).resolve().parents[1]

TRAINER = textwrap.dedent("""
    import sys, time
    from pipeline.core.processes import owned_tmpdir
    from pipeline.tracking.runs import start_run

    mlflow_p = {"tracking_uri": sys.argv[1], "experiment": "stale", "artifact_root": sys.argv[2]}
    tracking = start_run(mlflow_p, {"lr": 0.1}, {})
    with owned_tmpdir(sys.argv[3]) as tmp:
        (tmp / "best.ckpt").write_bytes(b"weights")
        print(tracking.run_id, tmp, flush=True)
        time.sleep(300)
""")


def _trainer(uri: str, root: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.Popen([sys.executable, "-c", TRAINER, uri, str(root / "mlartifacts"), str(root / ".imer/tmp")],
                            cwd=root, env=env, stdout=subprocess.PIPE, text=True, start_new_session=True)
    return proc


def _ready(proc: subprocess.Popen) -> tuple[str, Path]:
    line = proc.stdout.readline().split()
    assert len(line) == 2, f"trainer exited with {proc.poll()}"
    return line[0], Path(line[1])


@pytest.mark.slow  # two trainer processes importing mlflow: ~25 s on 2 shared cores
def test_next_start_closes_only_runs_of_dead_trainers(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    exp_id = client.create_experiment("stale", artifact_location=(tmp_path / "mlartifacts").as_uri())
    foreign = client.create_run(exp_id, tags=owner_tags(Owner("another-host", 1, 0.0))).info.run_id
    legacy = client.create_run(exp_id).info.run_id  # a run from before the trainer tags: never judged
    victim, survivor = _trainer(uri, tmp_path), _trainer(uri, tmp_path)
    try:
        (victim_run, victim_tmp), (survivor_run, survivor_tmp) = _ready(victim), _ready(survivor)
        os.killpg(victim.pid, signal.SIGKILL)
        victim.wait(timeout=30)
        assert client.get_run(victim_run).info.status == "RUNNING" and victim_tmp.exists()  # the torn state

        mlflow_p = {"tracking_uri": uri, "experiment": "stale", "artifact_root": str(tmp_path / "mlartifacts")}
        fresh = start_run(mlflow_p, {"lr": 0.2}, {})  # the next training start
        dead = client.get_run(victim_run)
        assert dead.info.status == "KILLED" and dead.info.end_time is not None
        assert f"pid {victim.pid}" in dead.data.tags[NOTE_TAG] and "gone" in dead.data.tags[NOTE_TAG]
        for alive in (survivor_run, foreign, legacy, fresh.run_id):
            assert client.get_run(alive).info.status == "RUNNING", alive
        assert fresh.client.get_run(fresh.run_id).data.tags["imer.trainer.pid"] == str(os.getpid())

        with owned_tmpdir(tmp_path / ".imer/tmp") as mine:  # the next training's folder sweeps dead ones
            assert mine.exists() and not victim_tmp.exists()
            assert survivor_tmp.exists() and (survivor_tmp / "best.ckpt").exists()
        assert not mine.exists()
        assert remove_dead_tmpdirs(tmp_path / ".imer/tmp") == []
    finally:
        for proc in (victim, survivor):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)


def test_close_stale_runs_judges_by_pid_and_start_time(tmp_path):
    """Fast: a real process that has exited, a recycled pid (same pid, other start time) and this live process."""
    import socket

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    exp_id = client.create_experiment("stale-fast", artifact_location=(tmp_path / "a").as_uri())
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.2)"])
    exited = Owner(socket.gethostname(), proc.pid, psutil.Process(proc.pid).create_time())
    proc.wait(timeout=30)
    me = current_owner()
    recycled = Owner(me.host, me.pid, me.started - 3600.0)  # our pid, but a process started an hour earlier
    runs = {name: client.create_run(exp_id, tags=owner_tags(owner)).info.run_id
            for name, owner in (("exited", exited), ("recycled", recycled), ("live", me))}
    closed = close_stale_runs(client, exp_id)
    assert sorted(closed) == sorted([runs["exited"], runs["recycled"]])
    assert client.get_run(runs["live"]).info.status == "RUNNING"
    assert all(client.get_run(runs[n]).info.status == "KILLED" for n in ("exited", "recycled"))
    assert close_stale_runs(client, exp_id) == []  # closed once
