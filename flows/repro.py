"""`imer repro`: `dvc repro` with one Prefect server for the whole run instead of one per stage.

Every stage DVC runs is an `imer <stage>` process whose flow needs a Prefect API.
With none configured, Prefect starts a temporary server inside each process (~10-17 s
per stage). This wrapper starts one `prefect server start` on a free 127.0.0.1 port
(scheduler off: a one-off server must not fire deployment schedules), points the
stages at it, and stops exactly that process group when DVC returns, also on error
or Ctrl-C. Nothing stale -> no server at all. An existing PREFECT_API_URL is used
as is; with Prefect off (IMER_NO_PREFECT=1, orchestration.prefect: false) none is started.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Sequence

from flows.settings import prefect_enabled
from flows.servers import free_port, prefect_spec, start_server, stop_server

SERVER_NAME = "prefect-repro"


def prefect_home() -> Path:
    """Where flow runs are stored: the same database the temporary server would use."""
    return Path(os.environ.get("PREFECT_HOME") or Path.home() / ".prefect")


def pipeline_is_current(root: Path) -> bool:
    """True when `dvc status` reports nothing to do (then no server is worth starting)."""
    done = subprocess.run(["dvc", "status", "--quiet"], cwd=root, capture_output=True, text=True)
    return done.returncode == 0


def repro(dvc_args: Sequence[str] = (), root: str | Path = ".", command: Sequence[str] | None = None) -> int:
    """Run `dvc repro *dvc_args` (or `command`) in `root` with a shared local Prefect API; its exit code."""
    root = Path(root).resolve()
    argv = list(command) if command is not None else ["dvc", "repro", *dvc_args]
    bare = not prefect_enabled(root / "params.yaml") or bool(os.environ.get("PREFECT_API_URL"))
    if bare or (command is None and not dvc_args and pipeline_is_current(root)):
        return subprocess.call(argv, cwd=root)
    run_dir = root / "run"
    spec = prefect_spec(free_port(), prefect_home(), scheduler=False)
    spec.name = SERVER_NAME  # its own pid/record files: never touches `imer servers`' prefect
    record = start_server(spec, run_dir)
    try:
        print(f"imer repro: Prefect API {record['url']} (pid {record['pid']}) for this run", file=sys.stderr)
        return subprocess.call(argv, cwd=root, env={**os.environ, "PREFECT_API_URL": record["url"]})
    finally:
        stop_server(run_dir, SERVER_NAME)


def main(argv: list[str] | None = None) -> int:
    """`imer repro [dvc repro options]`: `--help` is answered here, before any server starts."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="imer repro", allow_abbrev=False, usage="imer repro [-h] [dvc repro options and targets]",
        description=__doc__.splitlines()[0],
        epilog="Every other option and target is passed to `dvc repro` unchanged (see `dvc repro --help`).")
    _, dvc_args = parser.parse_known_args(list(sys.argv[1:] if argv is None else argv))
    return repro(dvc_args)
