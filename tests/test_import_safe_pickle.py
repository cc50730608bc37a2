"""The restricted unpickler: data loads, code never runs."""
from __future__ import annotations

import pickle
from collections import OrderedDict

import numpy as np
import pytest

from pipeline.importers.safe_pickle import UnsafePickleError, load_npy, load_pickle
from tests.import_fixtures import write_malicious, write_py2_style


@pytest.mark.parametrize("lean", [False, True])
def test_malicious_pickle_is_refused_and_runs_nothing(tmp_path, lean):
    marker = tmp_path / "pwned"
    path = write_malicious(tmp_path / "labels.pkl", marker)
    with pytest.raises(UnsafePickleError) as err:
        load_pickle(path, lean=lean)
    assert "posix.system" in str(err.value) or "os.system" in str(err.value)
    assert str(path) in str(err.value)
    assert not marker.exists()


@pytest.mark.parametrize("target", ["builtins.eval", "builtins.getattr", "numpy.load", "subprocess.Popen"])
@pytest.mark.parametrize("lean", [False, True])
def test_callables_outside_allow_list_are_refused(tmp_path, target, lean):
    module, name = target.rsplit(".", 1)
    # Hand-built protocol-2 pickle: GLOBAL module\nname\n, then call with an empty tuple.
    blob = b"\x80\x02c" + module.encode() + b"\n" + name.encode() + b"\n)R."
    path = tmp_path / "bad.pkl"
    path.write_bytes(blob)
    with pytest.raises(UnsafePickleError, match=f"{module}.{name}"):
        load_pickle(path, lean=lean)


@pytest.mark.parametrize("lean", [False, True])
@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_numpy_and_containers_round_trip(tmp_path, protocol, lean):
    rng = np.random.default_rng(protocol)
    obj = {
        "train": {"audio": rng.normal(size=(3, 4, 2)).astype(np.float32), "id": np.array(["a$_$1", "b$_$2", "c$_$3"]),
                  "regression_labels": np.array([0.5, -1.0, 2.0]), "n": np.int64(3), "f": np.float64(1.5)},
        "sets": [{"x", "y"}, frozenset({1}), (1, 2.0, "s", b"raw", True, None)],
        "ordered": OrderedDict(a=1),
        "objects": np.array(["x", 1], dtype=object),
    }
    path = tmp_path / "ok.pkl"
    path.write_bytes(pickle.dumps(obj, protocol=protocol))
    back = load_pickle(path, lean=lean)
    np.testing.assert_array_equal(back["train"]["audio"], obj["train"]["audio"])
    assert back["train"]["audio"].dtype == np.float32
    assert back["train"]["id"].tolist() == ["a$_$1", "b$_$2", "c$_$3"]
    assert back["train"]["n"] == 3 and back["train"]["f"] == 1.5
    assert back["sets"] == obj["sets"] and back["ordered"] == obj["ordered"]
    assert back["objects"].tolist() == ["x", 1]


def test_python2_byte_strings_load_with_latin1(tmp_path):
    obj = [{"Ses01F_impro01": ["Ses01F_impro01_F000"]}, {"Ses01F_impro01": ["caf\xe9 au lait"]}]
    path = write_py2_style(tmp_path / "py2.pkl", obj)
    assert load_pickle(path) == obj
    with pytest.raises(ValueError, match="not a readable pickle"):
        load_pickle(path, encoding="ascii")


def test_truncated_pickle_is_a_clear_error(tmp_path):
    path = tmp_path / "cut.pkl"
    path.write_bytes(pickle.dumps({"a": np.zeros(100)}, protocol=4)[:50])
    with pytest.raises(ValueError, match=str(path)):
        load_pickle(path)


def test_npy_object_arrays_are_refused(tmp_path):
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError):
        load_npy(tmp_path / "obj.npy")


def test_lean_load_of_large_arrays_matches(tmp_path):
    big = np.random.default_rng(0).normal(size=(64, 50, 80)).astype(np.float32)  # > 1 MiB buffer
    path = tmp_path / "big.pkl"
    path.write_bytes(pickle.dumps({"train": {"text": big, "again": big}}, protocol=4))
    back = load_pickle(path, lean=True)
    np.testing.assert_array_equal(back["train"]["text"], big)
    assert back["train"]["again"] is back["train"]["text"]  # memoized arrays still shared


def _spill_fixture() -> dict:
    """Arrays just over the 1 MiB spill threshold in every layout numpy pickles, plus small ones."""
    rng = np.random.default_rng(5)
    text = rng.normal(size=(64, 50, 90)).astype(np.float32)  # 1.1 MiB, C order
    return {
        "train": {"text": text, "again": text,  # one array referenced twice: a memo back-reference
                  "fortran": np.asfortranarray(rng.normal(size=(420, 330))),  # 1.06 MiB, Fortran order
                  "permuted": rng.normal(size=(30, 60, 80)).transpose(1, 0, 2),  # neither C nor F: protocol 5 writes order K
                  "big_endian": rng.normal(size=(400, 400)).astype(">f8"),
                  "id": np.array([f"v{i:05d}$_$1" for i in range(30000)]),  # <U: 1.3 MiB
                  "small": np.arange(12, dtype=np.int64).reshape(3, 4)},
        "objects": np.array(["x", 1] * 70000, dtype=object),
    }


def _assert_same_arrays(back, ref) -> None:
    for key, want in ref["train"].items():
        got = back["train"][key]
        np.testing.assert_array_equal(got, want, err_msg=key)
        assert (got.dtype, got.shape, got.strides) == (want.dtype, want.shape, want.strides), key


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_spilled_load_matches_plain_load(tmp_path, protocol):
    obj = _spill_fixture()
    path = tmp_path / "big.pkl"
    path.write_bytes(pickle.dumps(obj, protocol=protocol))
    ref = pickle.loads(path.read_bytes())
    spill = tmp_path / "spill"
    back = load_pickle(path, lean=True, spill_dir=spill)
    _assert_same_arrays(back, ref)
    train = back["train"]
    assert train["again"] is train["text"]
    for key in ("text", "fortran", "permuted", "big_endian", "id"):
        assert isinstance(train[key], np.memmap) and not train[key].flags.writeable, key
    assert train["fortran"].flags.f_contiguous
    assert type(train["small"]) is np.ndarray and train["small"].flags.writeable  # small arrays stay in memory
    assert back["objects"].dtype == object and type(back["objects"]) is np.ndarray  # never spilled
    files = sorted(spill.glob("*.npy"))
    assert len(files) == 5  # text spilled once despite two references
    for f in files:
        assert np.load(f, allow_pickle=False).dtype != object


def test_spill_threshold_and_python2_strings(tmp_path):
    class Py2Bytes(pickle._Pickler):  # writes bytes as Python-2 str (BINSTRING), as numpy arrays pickled by Python 2
        dispatch = dict(pickle._Pickler.dispatch)

        def save_bytes(self, obj: bytes) -> None:
            self.write(pickle.BINSTRING + len(obj).to_bytes(4, "little") + obj)
            self.memoize(obj)

        dispatch[bytes] = save_bytes

    arrays = {"c": np.random.default_rng(1).normal(size=(50, 40)), "f": np.asfortranarray(np.arange(2000.0).reshape(40, 50))}
    path = tmp_path / "py2.pkl"
    with path.open("wb") as handle:
        Py2Bytes(handle, protocol=2).dump(arrays)
    ref = pickle.loads(path.read_bytes(), encoding="latin1")
    back = load_pickle(path, spill_dir=tmp_path / "spill", spill_bytes=1000)
    for key in arrays:
        np.testing.assert_array_equal(back[key], ref[key])
        assert isinstance(back[key], np.memmap) and back[key].strides == ref[key].strides
    kept = load_pickle(path, spill_dir=tmp_path / "spill2", spill_bytes=16000)
    assert type(kept["c"]) is np.ndarray and type(kept["f"]) is np.ndarray  # 16000 bytes each: at the limit, kept


def test_spill_mode_refuses_what_the_allow_list_refuses(tmp_path):
    marker = tmp_path / "pwned"
    path = write_malicious(tmp_path / "labels.pkl", marker)
    with pytest.raises(UnsafePickleError) as err:
        load_pickle(path, spill_dir=tmp_path / "spill", spill_bytes=0)
    assert "system" in str(err.value) and str(path) in str(err.value)
    assert not marker.exists()
    blob = b"\x80\x02cnumpy\nload\n)R."
    (tmp_path / "bad.pkl").write_bytes(blob)
    with pytest.raises(UnsafePickleError, match="numpy.load"):
        load_pickle(tmp_path / "bad.pkl", spill_dir=tmp_path / "spill", spill_bytes=0)
    assert not list((tmp_path / "spill").iterdir())


@pytest.mark.parametrize("protocol, bound_mib", [(2, 12), (3, 3), (4, 3), (5, 3)])
def test_spilled_load_holds_about_one_array(tmp_path, protocol, bound_mib):
    """Eight 2 MiB arrays: the lean load peaks at all of them (16 MiB), the spilled one at about one."""
    import tracemalloc

    obj = {f"a{i}": np.random.default_rng(i).normal(size=(512, 512)) for i in range(8)}  # random bytes: worst UTF-8 case
    path = tmp_path / "big.pkl"
    path.write_bytes(pickle.dumps(obj, protocol=protocol))
    tracemalloc.start()
    try:
        back = load_pickle(path, spill_dir=tmp_path / "spill")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < bound_mib * 2**20, peak / 2**20  # protocol 2 decodes each buffer from UTF-8 text: a few copies of one
    assert all(isinstance(back[k], np.memmap) and np.array_equal(back[k], obj[k]) for k in obj)


def _call(module: str, name: str, args: tuple, opcode: bytes = pickle.REDUCE) -> bytes:
    """Protocol-2 pickle of `module.name(*args)` (REDUCE) or `module.name.__new__(module.name, *args)` (NEWOBJ)."""
    body = pickle.dumps(args, protocol=2)[2:-1]  # the args tuple's opcodes, without PROTO and STOP
    return b"\x80\x02c" + module.encode() + b"\n" + name.encode() + b"\n" + body + opcode + b"."


SIZE = 1 << 28  # 256 MiB asked by a file of a few dozen bytes: the old loader allocated it and returned
CRAFTED_CALLS = {
    "bytearray": _call("builtins", "bytearray", (SIZE,)),
    "bytes": _call("builtins", "bytes", (SIZE,)),
    "bytes_newobj": _call("builtins", "bytes", (SIZE,), pickle.NEWOBJ),
    "ndarray": _call("numpy", "ndarray", ((SIZE // 8,), "f8")),
    "reconstruct": _call("numpy.core.multiarray", "_reconstruct", (np.ndarray, (SIZE,), b"b")),
    "scalar": _call("numpy.core.multiarray", "scalar", (np.dtype(f"V{SIZE}"),)),
}
CRAFTED_OPCODES = {  # a counted opcode whose declared length is far beyond the file: old loader, bare MemoryError
    "binbytes8": b"\x80\x04\x8e" + (1 << 40).to_bytes(8, "little") + b"abc.",
    "bytearray8": b"\x80\x05\x96" + (1 << 40).to_bytes(8, "little") + b"abc.",
    "binunicode8": b"\x80\x04\x8d" + (1 << 40).to_bytes(8, "little") + b"abc.",
    "frame": b"\x80\x04\x95" + (1 << 40).to_bytes(8, "little") + b"N.",
}


@pytest.mark.parametrize("mode", [{}, {"lean": True}, {"spill_dir": "spill"}])
@pytest.mark.parametrize("case", [*CRAFTED_CALLS, *CRAFTED_OPCODES])
def test_attacker_chosen_sizes_are_refused_before_allocating(tmp_path, case, mode):
    """Issue 13.6: a tiny pickle asking for a huge buffer is refused by name, never allocated, never MemoryError."""
    import tracemalloc

    from pipeline.importers.pickle_limits import PickleSizeError

    path = tmp_path / f"{case}.pkl"
    path.write_bytes({**CRAFTED_CALLS, **CRAFTED_OPCODES}[case])
    kwargs = {k: tmp_path / v if k == "spill_dir" else v for k, v in mode.items()}
    tracemalloc.start()
    try:
        with pytest.raises(PickleSizeError) as err:
            load_pickle(path, **kwargs)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert str(path) in str(err.value) and "not loaded" in str(err.value)
    assert peak < 8 << 20, f"allocated {peak / 2**20:.0f} MiB before refusing"


def test_size_caps_leave_real_arrays_alone(tmp_path):
    """Legit pickles build exactly what they carry: a 2 MiB array loads under every protocol and mode."""
    arr = np.random.default_rng(3).normal(size=(512, 512))
    for protocol in (2, 4, 5):
        path = tmp_path / f"ok{protocol}.pkl"
        path.write_bytes(pickle.dumps({"a": arr, "b": bytearray(b"xy" * 10), "c": bytes(3)}, protocol=protocol))
        for kwargs in ({}, {"lean": True}, {"spill_dir": tmp_path / f"s{protocol}"}):
            back = load_pickle(path, **kwargs)
            np.testing.assert_array_equal(back["a"], arr)
            assert back["b"] == bytearray(b"xy" * 10) and back["c"] == bytes(3)
