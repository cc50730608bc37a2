"""Which Prefect API a process talks to, and sharing the temporary one with child processes.

With PREFECT_API_URL unset Prefect starts a temporary local server (SQLite under
PREFECT_HOME) inside the first process that needs it. We start it up front and export
its URL, so the processes this run spawns (DVC's `imer <stage>` commands, Dask
workers) report to the same server instead of each starting their own.
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

from prefect.settings import PREFECT_API_URL, get_current_settings, temporary_settings


def configured_api_url() -> str | None:
    """The API URL from settings/env, or None when Prefect would use a temporary server."""
    url = get_current_settings().api.url or os.environ.get("PREFECT_API_URL")
    return url or None


@contextmanager
def shared_api() -> Iterator[str]:
    """Yield an API URL usable by this process and its children for the duration of the block."""
    url = configured_api_url()
    if url:
        yield url
        return
    from prefect.server.api.server import SubprocessASGIServer

    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # offline: no telemetry
    server = SubprocessASGIServer()  # the same singleton Prefect's client would start
    server.start()
    previous = os.environ.get("PREFECT_API_URL")
    os.environ["PREFECT_API_URL"] = server.api_url
    try:
        with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
            yield server.api_url
    finally:
        if previous is None:
            os.environ.pop("PREFECT_API_URL", None)
        else:
            os.environ["PREFECT_API_URL"] = previous
