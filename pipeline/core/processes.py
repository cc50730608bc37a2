"""Is the process that left something behind still alive? Decided safely, by pid, start time and host.

A killed training leaves its MLflow run RUNNING and its temporary folder on disk.
Whoever cleans up must never touch what a live training (this machine or another)
still uses, so every leftover records its owner: host name, pid and the process's
start time (a recycled pid has another start time). Only a leftover whose owner ran
on this host and is gone counts as stale; anything else is left alone.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import psutil


@dataclass(frozen=True)
class Owner:
    """The process that owns a run or a folder."""

    host: str
    pid: int
    started: float  # psutil create_time, seconds since the epoch

    def is_gone(self) -> bool:
        """True only when the owner ran on this host and that exact process no longer exists."""
        if self.host != socket.gethostname():
            return False  # another machine's process: we cannot tell, so it is not ours to close
        try:
            proc = psutil.Process(self.pid)
            if proc.status() == psutil.STATUS_ZOMBIE:
                return True
            return abs(proc.create_time() - self.started) > 1.0  # pid recycled by another process
        except psutil.NoSuchProcess:
            return True
        except psutil.AccessDenied:
            return False


def current_owner() -> Owner:
    return Owner(socket.gethostname(), os.getpid(), psutil.Process().create_time())


def _tmp_prefix(owner: Owner, prefix: str) -> str:
    return f"{prefix}{owner.pid}-{int(owner.started)}-"


def _owner_from_name(name: str, prefix: str) -> Owner | None:
    """The owner encoded in a folder name `<prefix><pid>-<start>-<random>`, or None if it is not one."""
    if not name.startswith(prefix):
        return None
    parts = name[len(prefix):].split("-")
    if len(parts) < 3 or not parts[0].isdigit() or not parts[1].isdigit():
        return None
    return Owner(socket.gethostname(), int(parts[0]), float(parts[1]))


def remove_dead_tmpdirs(root: str | Path, prefix: str = "train-") -> list[Path]:
    """Remove folders under `root` left by processes of this host that are gone; returns what was removed.

    Folder names carry only the pid and whole-second start time, so the start time is
    compared to the second (`Owner.is_gone` allows 1 s).
    """
    root = Path(root)
    removed = []
    if not root.is_dir():
        return removed
    for path in sorted(root.iterdir()):
        owner = _owner_from_name(path.name, prefix)
        if owner is not None and path.is_dir() and owner.is_gone():
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


@contextlib.contextmanager
def owned_tmpdir(root: str | Path, prefix: str = "train-") -> Iterator[Path]:
    """A fresh folder `<root>/<prefix><pid>-<start>-XXXX`, removed on exit; leftovers of dead owners first.

    A SIGKILL skips the `finally`; the next call (by any process on this host) removes
    that folder because its owner is gone.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    remove_dead_tmpdirs(root, prefix)
    path = Path(tempfile.mkdtemp(prefix=_tmp_prefix(current_owner(), prefix), dir=root))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
