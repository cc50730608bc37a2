"""Atomic file writes and output locks: a killed or concurrent run never leaves a half-written output.

Files are created with the mode a plain `open(path, "w")` would give (0666 minus the
umask), not the private 0600 of `tempfile.mkstemp`: outputs are read by other users
and by workers running under other accounts.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator


def current_umask() -> int:
    """This process's umask, read without changing it where the OS allows (Linux /proc)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)  # fallback: the only portable way is to set it and put it back
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `target`; rename it over `target` only on success.

    The temporary file lives in the same directory so the final `os.replace` is a
    same-filesystem rename, which POSIX guarantees to be atomic. It gets the mode a
    normal write would (0666 & ~umask) before anything is written to it.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        os.fchmod(fd, 0o666 & ~current_umask())
    finally:
        os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_json(target: str | os.PathLike, payload: Any) -> None:
    """Write JSON atomically, sorted and indented so diffs stay readable in Git."""
    with atomic_path(target) as tmp:
        tmp.write_text(json.dumps(payload, indent=2, sort_keys=True, default=_json_default) + "\n")


def _json_default(value: Any) -> Any:
    # numpy scalars and arrays show up in metrics; JSON has no type for them.
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


class OutputLocked(RuntimeError):
    """Another process is writing the same output; the message names it and the lock file."""


def lock_file_for(target: str | os.PathLike) -> Path:
    """The lock file guarding `target`: a hidden file beside it (never removed, see `output_lock`)."""
    target = Path(target)
    return target.with_name(f".{target.name}.lock")


@contextlib.contextmanager
def output_lock(target: str | os.PathLike, what: str = "this output") -> Iterator[Path]:
    """Hold an exclusive `flock` on `target`'s lock file, or raise `OutputLocked` at once.

    The lock is released by the kernel when the holder exits, however it exits (kill -9
    included), so a stale lock cannot block the next run. The file is left in place:
    deleting a lock file while another process waits on it would let two runs in.
    """
    path = lock_file_for(target)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"
            raise OutputLocked(
                f"{what}: another run (pid {holder}) is writing {target}; it holds {path}. "
                "Wait for it to finish, or stop it; the lock goes away with that process."
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield path
    finally:
        os.close(fd)  # closing the descriptor releases the flock
