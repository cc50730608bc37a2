"""Named reasons for a media path that cannot be used: one vocabulary for ingest and extraction.

Every per-path operation (stat, open, hash, decode) can fail at the OS level. Such a
failure belongs to that one clip (its modality is missing, with a reason a user can
act on), never to the stage. The reasons:

- `file_absent`: nothing at the path (ENOENT, or a path component is not a directory);
- `not_a_file`: the path names a directory, FIFO, socket or device, not a regular file;
- `symlink_loop`: resolving the path runs in circles (ELOOP);
- `permission_denied`: the running user may not read the file or search a directory on the way;
- `unreadable_file`: any other OS error (I/O error, name too long, ...).
"""
from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

FILE_ABSENT = "file_absent"
NOT_A_FILE = "not_a_file"
SYMLINK_LOOP = "symlink_loop"
PERMISSION_DENIED = "permission_denied"
UNREADABLE_FILE = "unreadable_file"
# A path with one of these has no file behind it: missing data, not a failed extraction.
NO_FILE_REASONS = frozenset({FILE_ABSENT, NOT_A_FILE, SYMLINK_LOOP})


def os_error_reason(exc: OSError) -> str:
    """The named reason for an OS-level failure on a media path."""
    if isinstance(exc, PermissionError) or exc.errno in (errno.EACCES, errno.EPERM):
        return PERMISSION_DENIED
    if exc.errno == errno.ELOOP:
        return SYMLINK_LOOP
    if isinstance(exc, IsADirectoryError):
        return NOT_A_FILE
    if isinstance(exc, (FileNotFoundError, NotADirectoryError)):
        return FILE_ABSENT
    return UNREADABLE_FILE


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "directory"), (stat.S_ISFIFO, "FIFO"), (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device")):
        if test(mode):
            return name
    return "special file"


def probe_file(path: str | os.PathLike) -> tuple[str, str] | None:
    """None when `path` names a regular file this process can open for reading, else (reason, detail).

    Follows symlinks (a link to a good file is good) but never raises for an OS-level
    failure, and never blocks: the open is non-blocking and only tried on regular files.
    """
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        return os_error_reason(exc), exc.strerror or str(exc)
    except ValueError as exc:  # an embedded NUL byte in the name
        return UNREADABLE_FILE, str(exc)
    if not stat.S_ISREG(mode):
        return NOT_A_FILE, f"is a {_kind(mode)}, not a regular file"
    try:
        os.close(os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0)))
    except OSError as exc:
        return os_error_reason(exc), exc.strerror or str(exc)
    return None


def listed_path(raw: str, base: Path) -> Path:
    """`raw` made absolute against `base` WITHOUT resolving symlinks (the manifest keeps what was listed)."""
    path = Path(raw)
    return Path(os.path.normpath(path if path.is_absolute() else base / path))
