"""`imer servers start` twice: running servers are left alone; a failed start stops only what it started.

Real processes on free 127.0.0.1 ports, stopped by pid at the end.
"""
from __future__ import annotations

import socket
import sys

import psutil
import pytest

from flows.servers import HOST, ServerSpec, ServersError, free_port, main, read_record, start_specs, stop_server


def _web(name: str) -> ServerSpec:
    port = free_port()
    return ServerSpec(name, [sys.executable, "-m", "http.server", str(port), "--bind", HOST],
                      f"http://{HOST}:{port}/", f"http://{HOST}:{port}")


def _failing(name: str) -> ServerSpec:
    port = free_port()
    return ServerSpec(name, [sys.executable, "-c", "import sys; sys.exit(3)"],
                      f"http://{HOST}:{port}/", f"http://{HOST}:{port}")


def _running(pid: int) -> bool:
    return psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE


def test_failed_start_stops_only_what_it_started(tmp_path):
    run_dir = tmp_path / "run"
    old = _web("old")
    try:
        first = start_specs(run_dir, [old], timeout_s=30)
        assert first["old"]["state"] == "started"
        old_pid = first["old"]["pid"]

        again = start_specs(run_dir, [old], timeout_s=30)  # second start: a no-op, not an error
        assert again["old"]["state"] == "already running" and again["old"]["pid"] == old_pid

        new = _web("new")
        with pytest.raises(ServersError, match=r"broken exited with 3.*stopped what this start had started: new"):
            start_specs(run_dir, [old, new, _failing("broken")], timeout_s=30)
        assert _running(old_pid), "a failing start stopped a server it had not started"
        assert read_record(run_dir, "new") is None and read_record(run_dir, "broken") is None
    finally:
        for name in ("old", "new", "broken"):
            stop_server(run_dir, name)


@pytest.mark.slow
def test_second_imer_servers_start_keeps_running_servers(tmp_path, capsys):
    """The real Prefect + MLflow pair: start, start again (exit 0, same pids), then a start whose MLflow port
    is taken by a stranger fails with exit 1 and leaves the running Prefect alone."""
    root = tmp_path / "checkout"
    root.mkdir()
    ports = ["--prefect-port", str(free_port()), "--mlflow-port", str(free_port())]
    try:
        assert main(["start", "--root", str(root), *ports]) == 0
        pids = {name: read_record(root / "run", name)["pid"] for name in ("prefect", "mlflow")}
        capsys.readouterr()

        assert main(["start", "--root", str(root), *ports]) == 0
        out = capsys.readouterr().out
        assert "prefect: already running" in out and "mlflow: already running" in out
        assert all(_running(pid) for pid in pids.values())
        assert {n: read_record(root / "run", n)["pid"] for n in pids} == pids

        stop_server(root / "run", "mlflow")
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as stranger:
            stranger.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # the stopped server's TIME_WAIT
            stranger.bind((HOST, int(ports[3])))
            stranger.listen()
            assert main(["start", "--root", str(root), *ports]) == 1
        err = capsys.readouterr().err
        assert f"port {ports[3]}" in err and "in use" in err and "Traceback" not in err
        assert _running(pids["prefect"]), "the failed start stopped the running Prefect server"
    finally:
        main(["stop", "--root", str(root)])
