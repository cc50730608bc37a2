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
