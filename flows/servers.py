"""Local Prefect and MLflow servers for one checkout: `imer servers start|stop|status`.

Both bind to 127.0.0.1. Each server is started in its own process group (a new
session), its pid goes to `run/<name>.pid` with a JSON record next to it, and `stop`
signals exactly those process groups, after checking that the pid still belongs to
the process we started (pid reuse would otherwise let us kill a stranger).
A second `start` leaves running servers alone ("already running", exit 0), and a
start that fails stops only the servers that same call started (exit 1, no traceback).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import psutil

DEFAULT_PREFECT_PORT = 4200
DEFAULT_MLFLOW_PORT = 5000
HOST = "127.0.0.1"
# Work pools the deployments in prefect.yaml name; `prefect deploy` refuses unknown pools.
WORK_POOLS = ("cpu", "gpu")


@dataclass
class ServerSpec:
    """How to start one server and how to tell that it is up."""

    name: str
    argv: list[str]
    health_url: str
    url: str
    env: dict[str, str] = field(default_factory=dict)


def free_port() -> int:
    """A port that is free on 127.0.0.1 right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def _bin(name: str) -> str:
    """The console script `name` from this interpreter's environment (not from PATH)."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


def prefect_spec(port: int, prefect_home: Path, scheduler: bool = True) -> ServerSpec:
    """`prefect server start` on 127.0.0.1:port with its database under `prefect_home`."""
    url = f"http://{HOST}:{port}/api"
    env = {
        "PREFECT_HOME": str(prefect_home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_ENABLED": "true",
        # The server must never inherit a client URL pointing at another server.
        "PREFECT_API_URL": "",
    }
    if not scheduler:
        env["PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED"] = "false"
    argv = [_bin("prefect"), "server", "start", "--host", HOST, "--port", str(port)]
    return ServerSpec("prefect", argv, f"{url}/health", url, env)


def mlflow_spec(port: int, root: Path) -> ServerSpec:
    """`mlflow server` with a SQLite backend and a local artifact store under `root`."""
    argv = [
        _bin("mlflow"), "server", "--host", HOST, "--port", str(port),
        "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
        "--artifacts-destination", str(root / "mlartifacts"),
        "--workers", "1",
    ]
    url = f"http://{HOST}:{port}"
    return ServerSpec("mlflow", argv, f"{url}/health", url, {})


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return 200 <= resp.status < 300
    except (urllib.error.URLError, OSError):
        return False


def _record_path(run_dir: Path, name: str) -> Path:
    return run_dir / f"{name}.json"


def start_server(spec: ServerSpec, run_dir: Path, timeout_s: float = 90.0) -> dict:
    """Start `spec` in a new process group, record its pid, wait until its health URL answers.

    Returns the record written to `run/<name>.json` (pid, url, create_time, log).
    A server that dies or stays unhealthy is stopped and reported with its log tail.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    existing = read_record(run_dir, spec.name)
    if existing and _alive(existing):
        raise RuntimeError(f"{spec.name} already running (pid {existing['pid']}, {existing['url']})")
    log_path = run_dir / f"{spec.name}.log"
    env = {**os.environ, **spec.env}
    env = {k: v for k, v in env.items() if v != ""}  # an empty value means "unset"
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            spec.argv, stdout=log, stderr=subprocess.STDOUT, env=env,
            start_new_session=True,  # own process group: stop() kills exactly this tree
        )
    record = {
        "name": spec.name, "pid": proc.pid, "url": spec.url, "health_url": spec.health_url,
        "create_time": psutil.Process(proc.pid).create_time(), "log": str(log_path),
        "argv": spec.argv,
    }
    (run_dir / f"{spec.name}.pid").write_text(f"{proc.pid}\n")
    _record_path(run_dir, spec.name).write_text(json.dumps(record, indent=2))
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            stop_server(run_dir, spec.name)
            raise RuntimeError(f"{spec.name} exited with {proc.returncode}; log: {_tail(log_path)}")
        if _healthy(spec.health_url):
            return record
        time.sleep(0.3)
    stop_server(run_dir, spec.name)
    raise TimeoutError(f"{spec.name} not healthy after {timeout_s:.0f}s; log: {_tail(log_path)}")


def _tail(path: Path, n: int = 2000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return "<no log>"


def read_record(run_dir: Path, name: str) -> dict | None:
    path = _record_path(run_dir, name)
    return json.loads(path.read_text()) if path.exists() else None


def _alive(record: dict) -> bool:
    """True if the recorded pid is still the process we started (same create time)."""
    try:
        proc = psutil.Process(int(record["pid"]))
        return abs(proc.create_time() - float(record["create_time"])) < 1.0 and proc.is_running()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


def stop_server(run_dir: Path, name: str, grace_s: float = 10.0) -> bool:
    """Terminate the process group we started for `name`; True if something was stopped."""
    record = read_record(run_dir, name)
    stopped = False
    if record and _alive(record):
        pid = int(record["pid"])
        for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(pid, sig)  # pgid == pid: we started it with start_new_session
            except ProcessLookupError:
                break
            try:
                psutil.Process(pid).wait(timeout=wait)
                break
            except psutil.TimeoutExpired:
                continue
            except psutil.NoSuchProcess:
                break
        stopped = True
    for suffix in (".pid", ".json"):
        (run_dir / f"{name}{suffix}").unlink(missing_ok=True)
    return stopped


def ensure_work_pools(api_url: str, pools: tuple[str, ...] = WORK_POOLS) -> None:
    """Create the process work pools prefect.yaml deploys to (idempotent)."""
    env = {**os.environ, "PREFECT_API_URL": api_url}
    for pool in pools:
        inspect = subprocess.run([_bin("prefect"), "work-pool", "inspect", pool], env=env,
                                 capture_output=True, text=True)
        if inspect.returncode == 0:
            continue
        subprocess.run([_bin("prefect"), "work-pool", "create", pool, "--type", "process"],
                       env=env, check=True, capture_output=True, text=True)


class ServersError(RuntimeError):
    """A start that could not complete; what this call started has been stopped again."""


def start_specs(run_dir: Path, specs: list[ServerSpec], timeout_s: float = 90.0,
                after_start: dict[str, Callable[[dict], None]] | None = None) -> dict[str, dict]:
    """Start each spec that is not already running; on failure stop only what this call started.

    Returns {name: record} with `record["state"]` = "started" or "already running". A
    server recorded as running (same pid, same create time) is left alone, so a second
    `imer servers start` never touches the servers other runs are logging to.
    """
    records: dict[str, dict] = {}
    started: list[str] = []
    try:
        for spec in specs:
            existing = read_record(run_dir, spec.name)
            if existing and _alive(existing):
                records[spec.name] = {**existing, "state": "already running"}
                continue
            port = urllib.parse.urlsplit(spec.url).port
            if port is not None and not _port_free(port):
                raise ServersError(f"{spec.name}: port {port} on {HOST} is in use by a process this checkout did "
                                   f"not start (choose another with --{spec.name}-port)")
            record = start_server(spec, run_dir, timeout_s=timeout_s)
            started.append(spec.name)
            if after_start and spec.name in after_start:
                after_start[spec.name](record)
            records[spec.name] = {**record, "state": "started"}
    except Exception as exc:
        stopped = [name for name in reversed(started) if stop_server(run_dir, name)]
        note = f"; stopped what this start had started: {', '.join(stopped)}" if stopped else ""
        raise ServersError(f"{exc}{note}") from exc
    return records


def _port_free(port: int) -> bool:
    """True when nothing listens on HOST:port (SO_REUSEADDR: a just-stopped server's TIME_WAIT is no listener)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


def start_all(root: Path, prefect_port: int, mlflow_port: int) -> dict[str, dict]:
    """Start Prefect then MLflow for the checkout at `root`, skipping any already running.

    A failure stops only the servers this call started; running ones are never touched.
    """
    specs = [prefect_spec(prefect_port, root / ".prefect"), mlflow_spec(mlflow_port, root)]
    return start_specs(root / "run", specs, after_start={"prefect": lambda rec: ensure_work_pools(rec["url"])})


def stop_all(root: Path) -> list[str]:
    return [name for name in ("mlflow", "prefect") if stop_server(root / "run", name)]


def status_all(root: Path) -> dict[str, dict]:
    out = {}
    for name in ("prefect", "mlflow"):
        record = read_record(root / "run", name)
        if record is None:
            out[name] = {"running": False}
        else:
            out[name] = {"running": _alive(record), "healthy": _healthy(record["health_url"]),
                         "pid": record["pid"], "url": record["url"]}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="imer servers", description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["start", "stop", "status"])
    parser.add_argument("--root", default=".", help="project checkout (default: .)")
    parser.add_argument("--prefect-port", type=int, default=DEFAULT_PREFECT_PORT)
    parser.add_argument("--mlflow-port", type=int, default=DEFAULT_MLFLOW_PORT)
    args = parser.parse_args(argv)
    root = Path(args.root).resolve()
    if args.action == "start":
        try:
            records = start_all(root, args.prefect_port, args.mlflow_port)
        except ServersError as exc:
            print(f"imer servers start: {exc}", file=sys.stderr)
            return 1
        for name, rec in records.items():
            print(f"{name}: {rec['state']} (pid {rec['pid']} at {rec['url']})")
        print(f"export PREFECT_API_URL={records['prefect']['url']}")
        print(f"export MLFLOW_TRACKING_URI={records['mlflow']['url']}")
    elif args.action == "stop":
        stopped = stop_all(root)
        print("stopped: " + (", ".join(stopped) if stopped else "nothing was running"))
    else:
        print(json.dumps(status_all(root), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
