"""`imer compare` over imported datasets: dataset columns (IEMOCAP folds), one import shared by the
folds, cells keyed like profile cells (never recomputed), and profile data keys kept stable."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from flows.compare import Spec, run_matrix
from flows.compare_data import Column, column_params, data_key, dataset_columns, source_fingerprint
from pipeline.core.params import load_all_params
from pipeline.tracking.compare_report import write_compare_report
from tests.import_fixtures import write_gcnet_iemocap

PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"


def _settings(tmp_path: Path) -> Path:
    """A dataset overlay (as configs/iemocap4.yaml) for the tiny GCNet IEMOCAP fixture."""
    exp = write_gcnet_iemocap(tmp_path / "IEMOCAP", sessions=4, dialogues=2)
    overlay = {"import": {"format": "gcnet", "dataset": "iemocap4", "label_path": str(exp.label_path),
                          "feature_dirs": {m: str(p) for m, p in exp.feature_dirs.items()}},
               "splits": {"strategy": "loso", "fold": 0},
               "train": {"out_dir": "runs/elsewhere"}}  # the direct path's block: a compare cell ignores it
    path = tmp_path / "iemocap4.yaml"
    path.write_text(yaml.safe_dump(overlay))
    return path


def test_dataset_columns_and_spec(tmp_path: Path) -> None:
    cols = dataset_columns([{"name": "iemocap4", "folds": [0, 3]}, {"name": "mosi", "set": {"train.max_epochs": 5}}], "x")
    assert [c.label for c in cols] == ["iemocap4-fold0", "iemocap4-fold3", "mosi"]
    assert cols[1].dotted == {"splits.strategy": "loso", "splits.fold": 3} and cols[1].settings == "configs/iemocap4.yaml"
    assert cols[2].dotted == {"train.max_epochs": 5}
    with pytest.raises(ValueError, match="unknown keys"):
        dataset_columns([{"name": "mosi", "fold": 1}], "compare.yaml")
    spec_file = tmp_path / "compare.yaml"
    spec_file.write_text(yaml.safe_dump({"rows": [{"name": "plain"}], "seeds": [1], "datasets": [{"name": "mosi"}]}))
    spec = Spec.load(spec_file)
    assert spec.profiles == [] and [c.label for c in spec.columns()] == ["mosi"]  # no profile unless asked
    spec_file.write_text(yaml.safe_dump({"rows": [{"name": "plain"}], "seeds": [1], "profiles": []}))
    with pytest.raises(ValueError, match="at least one column"):
        Spec.load(spec_file)
    spec_file.write_text(yaml.safe_dump({"rows": [{"name": "plain"}], "seeds": [1], "profiles": ["mosi"],
                                         "datasets": [{"name": "mosi"}]}))
    with pytest.raises(ValueError, match="repeat a name"):
        Spec.load(spec_file)


def test_column_params_take_only_the_import_and_splits_blocks(tmp_path: Path) -> None:
    base = load_all_params(PARAMS)
    column = Column("iemocap4-fold2", "dataset", {"splits.strategy": "loso", "splits.fold": 2}, str(_settings(tmp_path)))
    params = column_params(base, {"train.max_epochs": 1}, column)
    assert params["import"]["dataset"] == "iemocap4" and params["import"]["face_reduce"] == base["import"]["face_reduce"]
    assert params["splits"]["fold"] == 2 and params["splits"]["seed"] == base["splits"]["seed"]
    assert params["train"]["out_dir"] == base["train"]["out_dir"] and params["train"]["max_epochs"] == 1
    profile = column_params({**base, "data": {"dir": "data/imported/mosi"}}, {}, Column("realistic", "profile"))
    assert profile["data"]["dir"] == "data" and profile["corpus"]["profile"] == "realistic"
    with pytest.raises(FileNotFoundError, match="settings of dataset column mosi"):
        column_params(base, {}, Column("mosi", "dataset", {}, str(tmp_path / "absent.yaml")))


def test_profile_data_key_is_the_one_explicit_paths_gave() -> None:
    """Stage paths left null resolve into data.dir before hashing: profile data built before the
    dataset switch (explicit data/ paths in the splits section) keeps its key and is not rebuilt."""
    params = load_all_params(PARAMS)
    explicit = json.loads(json.dumps(params))
    explicit["splits"].update(manifest="data/manifest.parquet", features_dir="data/features", out_dir="data/splits")
    explicit.pop("data")
    assert params["splits"]["manifest"] is None and data_key(params) == data_key(explicit)


def test_source_fingerprint_follows_the_files(tmp_path: Path) -> None:
    path = _settings(tmp_path)
    section = yaml.safe_load(path.read_text())["import"]
    before = source_fingerprint(section)
    assert len(before) == 4 and all(entry[1] > 0 for entry in before)  # label pickle + three feature folders
    extra = Path(section["feature_dirs"]["audio"]) / "Ses09F_impro01_F000.npy"
    extra.write_bytes(b"x" * 10)
    assert source_fingerprint(section) != before


@pytest.mark.slow
def test_tiny_matrix_over_iemocap_folds(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    tiny = {"train.max_epochs": 1, "train.patience": 1, "train.batch_size": 8, "train.model.d_model": 16,
            "train.model.n_heads": 2, "train.model.d_fusion": 16, "train.dpft.monitor_size": 16,
            "splits.missing_rates": [0.0, 0.5]}
    spec = Spec(rows={"plain": {"train.variant": "plain"}, "mculora": {}}, seeds=[1], profiles=[],
                datasets=dataset_columns([{"name": "iemocap4", "settings": str(settings), "folds": [0, 1]}], "spec"),
                common=tiny, out_dir=str(tmp_path / "runs"), prefect=False)
    records = run_matrix(spec, [str(PARAMS)])
    assert [r["cell"] for r in records] == ["iemocap4-fold0/plain/seed1", "iemocap4-fold0/mculora/seed1",
                                            "iemocap4-fold1/plain/seed1", "iemocap4-fold1/mculora/seed1"]
    assert all(r["status"] == "ok" for r in records), [r.get("log_tail", "")[-800:] for r in records]
    data = tmp_path / "runs" / "data"
    assert len(list(data.glob("iemocap4-import-*"))) == 1  # the folds share one import
    tested = {json.loads((f / "splits" / "splits.json").read_text())["groups"]["test"][0] for f in data.glob("iemocap4-fold*")}
    assert tested == {"Ses01", "Ses02"}
    cell = yaml.safe_load((Path(records[0]["folder"]) / "params.yaml").read_text())
    assert cell["train"]["manifest"].endswith("manifest.parquet") and "iemocap4-import-" in cell["train"]["manifest"]

    again = run_matrix(spec, [str(PARAMS)])  # finished cells and built data are reused
    assert not any(r["computed"] for r in again) and [r["key"] for r in again] == [r["key"] for r in records]
    summary = json.loads(Path(write_compare_report(again, ["plain"], tmp_path / "reports")["json"]).read_text())
    assert set(summary["profiles"]) == {"iemocap4-fold0", "iemocap4-fold1"}
    assert summary["profiles"]["iemocap4-fold1"]["rows"]["mculora"]["scores"]["atv"]["n"] == 1
