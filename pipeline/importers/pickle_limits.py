"""Size limits for the restricted unpickler: a pickle can only build what it carries.

Two ways let a tiny crafted pickle ask for gigabytes: a counted opcode (BINBYTES8,
BYTEARRAY8, FRAME, ...) whose 8-byte length is read and allocated before any data
arrives, and an allowed callable given a size (`bytearray(3_000_000_000)`,
`numpy.ndarray((10**10,))`, numpy's `_reconstruct` with a large shape). A feature
pickle never needs either: every byte of a real array is stored in the file. So a
read may not reach past the end of the file, and a call may not allocate more than
the file holds plus `ALLOC_SLACK`; both refuse with `PickleSizeError` naming the file.
"""
from __future__ import annotations

import io
import math
import os
from typing import Any

import numpy as np

ALLOC_SLACK = 1 << 20  # bytes a call may allocate beyond the file's own size (small headers, scalars)


class PickleSizeError(ValueError):
    """A pickle asked for more bytes than its file holds (a truncated or crafted file)."""


class CappedReader:
    """A binary file whose reads never ask for more than what is left in it.

    The unpickler's `read(n)` / `readinto(buf)` get `n` from the pickle itself; a
    request past the end of the file is refused before anything is allocated.
    """

    def __init__(self, handle: io.BufferedReader, source: str) -> None:
        self.handle = handle
        self.source = source
        self.size = os.fstat(handle.fileno()).st_size

    def remaining(self) -> int:
        return self.size - self.handle.tell()

    def check(self, n: int, what: str = "read") -> None:
        """Refuse a `what` of `n` bytes when fewer than `n` are left in the file."""
        left = self.remaining()
        if n > left:
            raise PickleSizeError(
                f"{self.source}: the pickle asks to {what} {n} bytes at offset {self.handle.tell()}, but the "
                f"file holds only {left} more ({self.size} bytes in all): a truncated or crafted file; not loaded"
            )

    def read(self, n: int = -1) -> bytes:
        if n is not None and n >= 0:
            self.check(n)
        return self.handle.read(n)

    def readinto(self, buf: Any) -> int:
        self.check(memoryview(buf).nbytes)
        return self.handle.readinto(buf)

    def readline(self) -> bytes:
        return self.handle.readline()  # grows with the line it finds: bounded by the file


def _int(value: Any) -> int | None:
    return value if type(value) is int else None


def _shape_items(shape: Any) -> int | None:
    """Element count of a numpy shape argument (int or tuple of ints); None when it is something else."""
    if _int(shape) is not None:
        return max(shape, 0)
    if isinstance(shape, (tuple, list)) and all(_int(n) is not None for n in shape):
        return math.prod(max(n, 0) for n in shape)
    return None


def _itemsize(dtype: Any) -> int | None:
    try:
        return np.dtype(dtype).itemsize
    except (TypeError, ValueError):
        return None  # numpy's own call reports the bad dtype


def requested_bytes(func: Any, args: tuple, allowed: dict[tuple[str, str], Any]) -> tuple[str, int] | None:
    """(what, bytes) a call to an allowed callable would allocate from a size argument, or None."""
    if func in (bytes, bytearray) and args and _int(args[0]) is not None:
        return f"{func.__name__}({args[0]})", args[0]
    if func is np.ndarray and args:
        items, size = _shape_items(args[0]), _itemsize(args[1] if len(args) > 1 else float)
        if items is not None and size is not None:
            return f"numpy.ndarray(shape={args[0]!r})", items * size
    if func is allowed[("numpy._core.multiarray", "_reconstruct")] and len(args) >= 3:
        items, size = _shape_items(args[1]), _itemsize(args[2])
        if items is not None and size is not None:
            return f"numpy _reconstruct(shape={args[1]!r})", items * size
    if func is allowed[("numpy._core.multiarray", "scalar")] and len(args) == 1:
        size = _itemsize(args[0])
        if size is not None:
            return f"numpy scalar of itemsize {size}", size
    return None


def check_call(func: Any, args: tuple, allowed: dict[tuple[str, str], Any], source: str, file_size: int) -> None:
    """Refuse a call that would allocate more than the file holds plus `ALLOC_SLACK`."""
    if not isinstance(args, tuple):
        return
    found = requested_bytes(func, args, allowed)
    if found is not None and found[1] > file_size + ALLOC_SLACK:
        what, n = found
        raise PickleSizeError(
            f"{source}: refused {what}: it would allocate {n} bytes from a {file_size}-byte file; a feature "
            f"pickle stores every byte it loads, so this is a crafted or corrupt file; not loaded"
        )
