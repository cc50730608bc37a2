"""Spill mode of the restricted unpickler: large arrays go to `.npy` files while unpickling.

`load_pickle(..., spill_dir=...)` uses `SpillingUnpickler`: each plain array above the
threshold is written to disk as soon as its raw bytes are read and replaced by a
read-only memmap, so loading a multi-GB MMSA pickle holds about one array in memory.
The allow-list and the size caps are `RestrictedUnpickler`'s.
"""
from __future__ import annotations

import math
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.importers.safe_pickle import _ALLOWED, LeanRestrictedUnpickler, _LeanMemo

_FROMBUFFER = _ALLOWED[("numpy._core.numeric", "_frombuffer")]
_SWAPPED = ">" if np.little_endian else "<"  # ndarray.__setstate__ swaps data whose dtype says this byte order


class _SpillMemo(_LeanMemo):
    """Lean memo that can swap an array for its spilled memmap under every key it was stored at.

    numpy memoizes the empty array `_reconstruct` returns before BUILD fills it; a
    later reference to the array reads that memo entry, so it must see the memmap.
    """

    def __init__(self) -> None:
        super().__init__()
        self._array_keys: dict[int, list[Any]] = {}  # id(array) -> memo keys holding it

    def __setitem__(self, key: Any, value: Any) -> None:
        super().__setitem__(key, value)
        if type(value) is np.ndarray:
            self._array_keys.setdefault(id(value), []).append(key)

    def replace(self, old: np.ndarray, new: np.ndarray) -> None:
        """Point every memo entry that holds `old` at `new`."""
        for key in self._array_keys.pop(id(old), []):
            if dict.get(self, key) is old:
                dict.__setitem__(self, key, new)


def _array_nbytes(shape: Any, dtype: Any) -> int | None:
    """Data bytes of a plain (non-object) array of `shape` and `dtype`; None if they are not that."""
    if not isinstance(dtype, np.dtype) or dtype.hasobject:
        return None
    if not isinstance(shape, tuple) or not all(type(n) is int and n >= 0 for n in shape):
        return None
    return math.prod(shape) * dtype.itemsize


def spill_array(path: Path, raw: Any, dtype: np.dtype, shape: tuple[int, ...], fortran: bool, swap: bool = False) -> np.ndarray:
    """Write `raw` (the array's bytes in C or Fortran order) as `.npy` and map it back read-only.

    Plain file writes, not a writable memmap: the data leaves the process as page
    cache the kernel may write back and drop, and no dirty mapped pages stay behind.
    `swap` byte-swaps to native order on the way, in chunks, as `ndarray.__setstate__` does.
    """
    out_dtype = dtype.newbyteorder() if swap else dtype
    header = {"descr": np.lib.format.dtype_to_descr(out_dtype), "fortran_order": bool(fortran), "shape": shape}
    try:
        with path.open("wb") as out:
            np.lib.format.write_array_header_1_0(out, header)
            if not swap:
                out.write(raw)
            else:
                step = max(1, (16 << 20) // dtype.itemsize)  # elements per 16 MiB chunk
                count = len(raw) // dtype.itemsize
                for start in range(0, count, step):
                    chunk = np.frombuffer(raw, dtype, min(step, count - start), start * dtype.itemsize)
                    out.write(chunk.byteswap())
    except OSError as exc:
        raise OSError(exc.errno, f"cannot spill a {_gib(len(raw))} array to {path} ({exc.strerror}); spill mode needs "
                      "free disk about the size of the pickle") from exc
    return np.load(path, mmap_mode="r", allow_pickle=False)


def _gib(n: int) -> str:
    return f"{n / 1024**3:.2f} GiB"


class SpillingUnpickler(LeanRestrictedUnpickler):
    """`LeanRestrictedUnpickler` that spills arrays above `spill_bytes` to `.npy` files in `spill_dir`.

    Arrays arrive two ways: `_reconstruct(ndarray, (0,), "b")` + BUILD with state
    (version, shape, dtype, is_fortran, rawdata) (protocols <= 4, and non-contiguous
    arrays under 5), or `_frombuffer(buf, dtype, shape, order[, axis_order])`
    (protocol 5). Both are intercepted once the raw bytes are read; object arrays
    and anything unexpected take numpy's own path (in memory, as before).
    """

    dispatch = dict(LeanRestrictedUnpickler.dispatch)

    def __init__(self, file: Any, source: str, spill_dir: Path, spill_bytes: int, encoding: str = "latin1") -> None:
        super().__init__(file, source, encoding=encoding)
        self.memo = _SpillMemo()
        self.spill_dir = spill_dir
        self.spill_bytes = spill_bytes
        self.spilled = 0

    def find_class(self, module: str, name: str) -> Any:
        target = super().find_class(module, name)  # the allow-list refuses first
        return self._frombuffer if target is _FROMBUFFER else target

    def _spill(self, raw: Any, dtype: np.dtype, shape: tuple[int, ...], fortran: bool, swap: bool = False) -> np.ndarray:
        self.spilled += 1
        return spill_array(self.spill_dir / f"array-{self.spilled:05d}.npy", raw, dtype, shape, fortran, swap)

    def _frombuffer(self, buf: Any, dtype: Any, shape: Any, order: Any, *axis_order: Any) -> np.ndarray:
        """Protocol-5 array: spill the in-band buffer when large, else numpy's `_frombuffer`."""
        nbytes = _array_nbytes(shape, dtype)
        size = len(buf) if isinstance(buf, (bytes, bytearray)) else None
        permuted = order == "K" and bool(axis_order) and axis_order[0] is not None  # C-order buffer of a transposed array
        if nbytes is None or nbytes != size or nbytes <= self.spill_bytes or not (order in ("C", "F") or permuted):
            return _FROMBUFFER(buf, dtype, shape, order, *axis_order)
        if permuted:
            return self._spill(buf, dtype, shape, False).transpose(axis_order[0])
        return self._spill(buf, dtype, shape, order == "F")

    def _spilled_state(self, inst: Any, state: Any) -> np.ndarray | None:
        """The memmap for ndarray BUILD `state` when it is a large plain array, else None."""
        if type(inst) is not np.ndarray or not isinstance(state, tuple) or len(state) not in (4, 5):
            return None
        shape, dtype, fortran, raw = state[-4:]
        if isinstance(raw, str) and len(raw) > self.spill_bytes:  # a Python-2 str decoded as latin1: numpy encodes it back
            try:
                raw = raw.encode("latin1")
            except UnicodeEncodeError:
                return None  # not array bytes; numpy's own BUILD reports it
        nbytes = _array_nbytes(shape, dtype)
        if nbytes is None or not isinstance(raw, (bytes, bytearray)) or len(raw) != nbytes or nbytes <= self.spill_bytes:
            return None
        return self._spill(raw, dtype, shape, bool(fortran) and len(shape) > 1, dtype.byteorder == _SWAPPED)

    def load_build(self) -> None:
        """BUILD: a large ndarray becomes a memmap on the stack and in the memo; the rest as usual."""
        stack = self.stack
        spilled = self._spilled_state(stack[-2], stack[-1]) if len(stack) >= 2 else None
        if spilled is None:
            super().load_build()
            return
        del stack[-1]  # the state, with the raw bytes
        self.memo.replace(stack[-1], spilled)
        stack[-1] = spilled

    dispatch[pickle.BUILD[0]] = load_build
