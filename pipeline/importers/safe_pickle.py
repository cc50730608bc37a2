"""Load pickles downloaded from the internet without letting them run code.

A pickle names the callables it wants called (`module.name`) and `pickle.load`
imports and calls them: a crafted file can call `os.system`. The published
feature pickles (GCNet label files, MMSA `aligned_50.pkl`) only need builtin
containers and numpy arrays, so everything else is refused by name.
"""
from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np

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


class RestrictedUnpickler(pickle.Unpickler):
    """An Unpickler whose `find_class` admits only containers, numbers, strings and numpy arrays."""

    def __init__(self, file: Any, source: str, encoding: str = "latin1") -> None:
        super().__init__(file, encoding=encoding, fix_imports=True)
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


_DROPPED = object()
LEAN_BYTES = 1 << 20


class _LeanMemo(dict):
    """Unpickler memo that does not keep large byte strings alive.

    Protocol >= 2 pickles memoize every object, including the raw buffer numpy
    writes per array; the memo then holds each buffer until the load ends, next to
    the array copied from it, doubling the peak. numpy never refers back to those
    buffers, so large ones are dropped; a pickle that did refer back fails loudly.
    """

    def __setitem__(self, key: Any, value: Any) -> None:
        if isinstance(value, (bytes, bytearray)) and len(value) > LEAN_BYTES:
            value = _DROPPED
        super().__setitem__(key, value)

    def __getitem__(self, key: Any) -> Any:
        value = super().__getitem__(key)
        if value is _DROPPED:
            raise pickle.UnpicklingError("pickle refers back to a large byte string; load it with lean=False")
        return value


class LeanRestrictedUnpickler(pickle._Unpickler):  # the pure-Python unpickler exposes its memo
    """`RestrictedUnpickler`'s allow-list with a memo that frees array buffers (for multi-GB MMSA pickles)."""

    def __init__(self, file: Any, source: str, encoding: str = "latin1") -> None:
        super().__init__(file, encoding=encoding, fix_imports=True)
        self.source = source
        self.memo = _LeanMemo()

    find_class = RestrictedUnpickler.find_class


def load_pickle(path: str | Path, encoding: str = "latin1", lean: bool = False) -> Any:
    """Load `path` with the restricted unpickler.

    `encoding` only affects Python-2 `str` objects: "latin1" (default) maps every
    byte to one character, which numpy arrays pickled under Python 2 (GCNet-era
    label files) need; Python-3 pickles are unaffected by it. `lean` uses the
    pure-Python unpickler whose memo frees array buffers: peak memory ~1x instead
    of ~2x the arrays, for pickles made of a few big arrays (MMSA).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: pickle not found")
    unpickler = LeanRestrictedUnpickler if lean else RestrictedUnpickler
    with path.open("rb") as handle:
        try:
            return unpickler(handle, str(path), encoding=encoding).load()
        except UnsafePickleError:
            raise
        except (pickle.UnpicklingError, EOFError, UnicodeDecodeError, AttributeError, TypeError) as exc:
            raise ValueError(f"{path}: not a readable pickle ({type(exc).__name__}: {exc})") from exc


def load_npy(path: str | Path) -> np.ndarray:
    """Load one `.npy` array; object arrays are refused (`allow_pickle=False`)."""
    return np.load(path, allow_pickle=False)
