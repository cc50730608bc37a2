"""Test helpers: a real `prefect server start` on a free loopback port, and process workers.

Import the fixtures into a test module (or into tests/conftest.py to share one server
across the session):

    from tests.prefect_server import prefect_api, prefect_server  # noqa: F401

Everything started here is stopped by its pid (its own process group) at the end.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from flows.servers import free_port, prefect_spec, start_server, stop_server

PROJECT_ROOT = Path(__file__).resolve().parents[1]


@contextmanager
def running_prefect_server(home: Path, timeout_s: float = 120.0) -> Iterator[str]:
    """Start `prefect server start` (scheduler off: no surprise runs) with PREFECT_HOME=home; yield its API URL."""
    run_dir = home / "run"
    spec = prefect_spec(free_port(), home / "prefect-home", scheduler=False)
    record = start_server(spec, run_dir, timeout_s=timeout_s)
    try:
        yield record["url"]
    finally:
        stop_server(run_dir, "prefect")


def client_env(api_url: str, home: Path) -> dict[str, str]:
    """Environment for subprocesses (workers, CLI) that talk to the test server."""
    env = dict(os.environ)
    env.update({
        "PREFECT_API_URL": api_url,
        "PREFECT_HOME": str(home / "client-home"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_WORKER_QUERY_SECONDS": "1",
        "PREFECT_WORKER_PREFETCH_SECONDS": "5",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    })
    return env


@contextmanager
def process_worker(pool: str, env: dict[str, str], log_path: Path) -> Iterator[subprocess.Popen]:
    """A `prefect worker start --pool <pool>` in its own process group, killed by pid on exit."""
    prefect = str(Path(sys.executable).parent / "prefect")
    with open(log_path, "ab") as log:
        proc = subprocess.Popen([prefect, "worker", "start", "--pool", pool, "--type", "process"],
                                cwd=PROJECT_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        yield proc
    finally:
        kill_group(proc)


def kill_group(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    """SIGTERM then SIGKILL the process group we started for `proc` (pgid == its pid)."""
    if proc.poll() is not None:
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace_s)
            return
        except subprocess.TimeoutExpired:
            continue


def create_pools(api_url: str, pools: tuple[str, ...]) -> None:
    """Create process work pools through the API (cheaper than one CLI process per pool)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect.workers.process import ProcessWorker

    template = ProcessWorker.get_default_base_job_template()
    with temporary_settings(updates={PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
        for pool in pools:
            try:
                client.create_work_pool(WorkPoolCreate(name=pool, type="process", base_job_template=template))
            except ObjectAlreadyExists:
                pass


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """(API URL, home dir) of one real Prefect server for the whole test session."""
    home = tmp_path_factory.mktemp("prefect")
    with running_prefect_server(home) as url:
        yield url, home


@pytest.fixture()
def prefect_api(prefect_server, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, dict[str, str]]]:
    """Point this process (settings) and its children (env) at the session's server."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    url, home = prefect_server
    env = client_env(url, home)
    for key in ("PREFECT_API_URL", "PREFECT_HOME", "PREFECT_SERVER_ANALYTICS_ENABLED", "HF_HUB_OFFLINE"):
        monkeypatch.setenv(key, env[key])
    monkeypatch.delenv("IMER_NO_PREFECT", raising=False)
    with temporary_settings(updates={PREFECT_API_URL: url}):
        yield url, env
        from prefect.logging.handlers import APILogWorker

        APILogWorker.drain_all(timeout=10)  # ship this test's logs while the server is still up
