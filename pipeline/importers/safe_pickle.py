"""Load pickles downloaded from the internet without letting them run code.

A pickle names the callables it wants called (`module.name`) and `pickle.load`
imports and calls them: a crafted file can call `os.system`. The published
feature pickles (GCNet label files, MMSA `aligned_50.pkl`) only need builtin
containers and numpy arrays, so everything else is refused by name.

Spill mode (`load_pickle(..., spill_dir=...)`) writes every large array to a
`.npy` file while unpickling and hands back a read-only memmap of it, so loading
a multi-GB MMSA pickle holds about one array in memory instead of all of them
(`pickle_spill`). Sizes a pickle asks for are capped by its file (`pickle_limits`).
"""
from __future__ import annotations

import pickle
import struct
import sys
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.importers.pickle_limits import CappedReader, PickleSizeError, check_call

# (module, name) pairs a feature pickle may reference. Python-2 module names are
# translated first (see `_PY2_MODULES`); `numpy.core` is the pre-2.0 name of `numpy._core`.
_BUILTINS = ("dict", "list", "tuple", "set", "frozenset", "int", "float", "complex", "str", "bytes", "bytearray", "bool")


def _allowed() -> dict[tuple[str, str], Any]:
    import builtins
    import codecs
    import collections

    from numpy._core import multiarray, numeric

    table: dict[tuple[str, str], Any] = {("builtins", n): getattr(builtins, n) for n in _BUILTINS}
    table[("collections", "OrderedDict")] = collections.OrderedDict
    # Python 3 writes numpy's bytes buffers as `_codecs.encode(text, "latin1")` under protocol <= 2.
    table[("_codecs", "encode")] = codecs.encode
    table[("numpy", "ndarray")] = np.ndarray
    table[("numpy", "dtype")] = np.dtype
    for core in ("numpy.core", "numpy._core"):
        table[(f"{core}.multiarray", "_reconstruct")] = multiarray._reconstruct
        table[(f"{core}.multiarray", "scalar")] = multiarray.scalar
        table[(f"{core}.numeric", "_frombuffer")] = numeric._frombuffer
    return table


_ALLOWED = _allowed()
_PY2_MODULES = {"__builtin__": "builtins", "copy_reg": "copyreg"}


class UnsafePickleError(ValueError):
    """A pickle asked for a class or function outside the allow-list."""


class RestrictedUnpickler(pickle._Unpickler):
    """An Unpickler whose `find_class` admits only containers, numbers, strings and numpy arrays.

    Pure Python on purpose: the C unpickler allocates a counted opcode's declared
    length before reading it (20 bytes of file can ask for 1 TiB). Here every read
    is capped at what is left in the file and every allowed call that takes a size
    is capped at the file's size (`pickle_limits`), so nothing is built that the
    file does not carry.
    """

    def __init__(self, file: Any, source: str, encoding: str = "latin1") -> None:
        self._reader = CappedReader(file, source)
        super().__init__(self._reader, encoding=encoding, fix_imports=True)
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        module = _PY2_MODULES.get(module, module)
        target = _ALLOWED.get((module, name))
        if target is None:
            raise UnsafePickleError(
                f"{self.source}: refused to load '{module}.{name}': this pickle asks for a class or function "
                "outside the allow-list (builtin containers, numbers, strings, numpy arrays/dtypes). "
                "A feature pickle never needs it; do not load this file with plain pickle.load."
            )
        return target

    def _check(self, func: Any, args: Any) -> None:
        check_call(func, args, _ALLOWED, self.source, self._reader.size)

    dispatch = dict(pickle._Unpickler.dispatch)

    def load_reduce(self) -> None:
        self._check(self.stack[-2], self.stack[-1])
        pickle._Unpickler.load_reduce(self)

    def load_newobj(self) -> None:
        self._check(self.stack[-2], self.stack[-1])  # cls.__new__(cls, *args): bytes.__new__ allocates
        pickle._Unpickler.load_newobj(self)

    def load_newobj_ex(self) -> None:
        self._check(self.stack[-3], self.stack[-2])
        pickle._Unpickler.load_newobj_ex(self)

    def _instantiate(self, klass: Any, args: Any) -> None:  # INST / OBJ opcodes
        self._check(klass, tuple(args))
        pickle._Unpickler._instantiate(self, klass, args)

    dispatch[pickle.REDUCE[0]] = load_reduce
    dispatch[pickle.NEWOBJ[0]] = load_newobj
    dispatch[pickle.NEWOBJ_EX[0]] = load_newobj_ex

    def load_bytearray8(self) -> None:
        """BYTEARRAY8 (protocol-5 arrays) read straight into the bytearray.

        The stock path reads a bytes copy and slice-assigns it, which copies once
        more: three times the array at once. Mirrors `_Unframer.readinto`, using
        `_Unpickler`'s private `_unframer` (CPython 3.8+) and the capped file's `readinto`;
        the size is checked against what is left before the buffer is allocated.
        """
        (size,) = struct.unpack("<Q", self.read(8))
        if size > sys.maxsize:
            raise pickle.UnpicklingError(f"BYTEARRAY8 of {size} bytes exceeds the system's maximum size")
        frame = self._unframer.current_frame
        in_frame = 0
        if frame is not None:
            with frame.getbuffer() as whole:
                in_frame = whole.nbytes - frame.tell()
        if in_frame == 0:
            self._reader.check(size, "read a BYTEARRAY8 of")  # before allocating it
        elif size > in_frame:
            raise PickleSizeError(f"{self.source}: a BYTEARRAY8 of {size} bytes does not fit in its frame; "
                                  "a truncated or crafted file; not loaded")
        buf = bytearray(size)
        view = memoryview(buf)
        if frame is not None:
            got = frame.readinto(view)
            if got == size:
                self.append(buf)
                return
            if got:
                raise pickle.UnpicklingError("pickle exhausted before end of frame")
            self._unframer.current_frame = None
        while view.nbytes:
            got = self._reader.readinto(view)
            if not got:
                raise EOFError(f"pickle ends inside a {size}-byte buffer")
            view = view[got:]
        self.append(buf)

    dispatch[pickle.BYTEARRAY8[0]] = load_bytearray8


_DROPPED = object()
LEAN_BYTES = 1 << 20
SPILL_BYTES = 1 << 20  # spill mode: arrays with more data bytes than this go to disk


def _is_large_buffer(value: Any) -> bool:
    return isinstance(value, (bytes, bytearray, str)) and len(value) > LEAN_BYTES


def _holds_large_buffer(value: Any) -> bool:
    """A large buffer, or a short tuple carrying one (numpy's BUILD state, `_frombuffer` / `_codecs.encode` args)."""
    return _is_large_buffer(value) or (type(value) is tuple and len(value) <= 8 and any(map(_is_large_buffer, value)))


class _LeanMemo(dict):
    """Unpickler memo that does not keep large byte strings alive.

    Protocol >= 2 pickles memoize every object, including the raw buffer numpy
    writes per array and the argument/state tuple that carries it; the memo then
    holds each buffer until the load ends, next to the array copied from it,
    doubling the peak. numpy never refers back to those, so they are dropped; a
    pickle that did refer back fails loudly. str too: protocol <= 2 writes each
    buffer as a latin1 text passed to `_codecs.encode`.
    """

    def __setitem__(self, key: Any, value: Any) -> None:
        if _holds_large_buffer(value):
            value = _DROPPED
        super().__setitem__(key, value)

    def __getitem__(self, key: Any) -> Any:
        value = super().__getitem__(key)
        if value is _DROPPED:
            raise pickle.UnpicklingError("pickle refers back to a large byte string (or a tuple holding one); load it with lean=False")
        return value


class LeanRestrictedUnpickler(RestrictedUnpickler):
    """`RestrictedUnpickler` with a memo that frees array buffers (for multi-GB MMSA pickles)."""

    def __init__(self, file: Any, source: str, encoding: str = "latin1") -> None:
        super().__init__(file, source, encoding=encoding)
        self.memo = _LeanMemo()


def load_pickle(
    path: str | Path, encoding: str = "latin1", lean: bool = False,
    spill_dir: str | Path | None = None, spill_bytes: int | None = None,
) -> Any:
    """Load `path` with the restricted unpickler.

    `encoding` only affects Python-2 `str` objects: "latin1" (default) maps every
    byte to one character, which numpy arrays pickled under Python 2 (GCNet-era
    label files) need; Python-3 pickles are unaffected by it. `lean` uses the
    pure-Python unpickler whose memo frees array buffers: peak memory ~1x instead
    of ~2x the arrays, for pickles made of a few big arrays (MMSA).

    `spill_dir` (implies lean) writes each non-object array of more than
    `spill_bytes` (default `SPILL_BYTES`) data bytes to a `.npy` file there and
    returns read-only memmaps in their place: peak memory ~ the largest array.
    The caller owns the folder: the memmaps need its files for as long as they
    are used, and it is left with partial files if loading fails.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: pickle not found")
    with path.open("rb") as handle:
        if spill_dir is not None:
            Path(spill_dir).mkdir(parents=True, exist_ok=True)
            limit = SPILL_BYTES if spill_bytes is None else int(spill_bytes)
            from pipeline.importers.pickle_spill import SpillingUnpickler

            unpickler: Any = SpillingUnpickler(handle, str(path), Path(spill_dir), limit, encoding=encoding)
        else:
            unpickler = (LeanRestrictedUnpickler if lean else RestrictedUnpickler)(handle, str(path), encoding=encoding)
        try:
            return unpickler.load()
        except (UnsafePickleError, PickleSizeError):
            raise
        except MemoryError as exc:
            raise PickleSizeError(f"{path}: out of memory while unpickling ({exc or 'MemoryError'}); for a pickle "
                                  "of large arrays, load it with spill_dir= (arrays go to .npy files)") from exc
        except (pickle.UnpicklingError, EOFError, UnicodeDecodeError, AttributeError, TypeError) as exc:
            raise ValueError(f"{path}: not a readable pickle ({type(exc).__name__}: {exc})") from exc


def load_npy(path: str | Path) -> np.ndarray:
    """Load one `.npy` array; object arrays are refused (`allow_pickle=False`)."""
    return np.load(path, allow_pickle=False)
