"""Imported datasets inside the DVC pipeline: `data.imports` declares stage import@<name>, `data.dir`
picks the dataset splits/train/evaluate/adapt read; the default resolves to the corpus layout."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from dvc.repo import Repo

from pipeline.core.hashing import file_digest
from pipeline.core.params import load_params
from pipeline.formats.manifest import read_manifest
from tests.import_fixtures import write_gcnet_iemocap
from tests.repo_copy import PROJECT_ROOT, dvc, make_repo_copy

CORPUS = ("data/manifest.parquet", "data/features/acoustic.arrow", "data/features/visual.arrow", "data/features/textual.arrow")
# Every stage's data/ dependencies and outputs as they were before the dataset switch existed.
DEFAULT_DATA = {
    "corpus": ((), ("data/corpus",)),
    "ingest": (("data/corpus",), ("data/manifest.parquet", "data/manifest.report.json")),
    "extract_acoustic": (("data/manifest.parquet", "data/corpus/audio"), ("data/features/acoustic.arrow", "data/cache/acoustic")),
    "extract_visual": (("data/manifest.parquet", "data/corpus/video"), ("data/features/visual.arrow", "data/cache/visual")),
    "extract_textual": (("data/manifest.parquet", "data/corpus/text"), ("data/features/textual.arrow", "data/cache/textual")),
    "feature_report": (CORPUS, ()),
    "splits": (CORPUS, ("data/splits",)),
    "train": ((*CORPUS, "data/splits"), ()),
    "evaluate": ((*CORPUS, "data/splits"), ()),
    "register": ((), ()),
    "adapt": ((*CORPUS, "data/splits"), ()),
    "report": ((), ()),
}


def _resolved(root: Path) -> dict[str, tuple[list[str], list[str]]]:
    """stage -> (deps, outs) paths after DVC resolved dvc.yaml's templates with params.yaml."""
    with Repo(str(root)) as repo:
        return {s.name: ([d.def_path for d in s.deps], [o.def_path for o in s.outs]) for s in repo.index.stages}


def _set_params(root: Path, **sections: dict) -> None:
    params = yaml.safe_load((root / "params.yaml").read_text())
    for name, values in sections.items():
        params.setdefault(name, {}).update(values)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def test_default_pipeline_resolves_to_the_corpus_layout() -> None:
    stages = _resolved(PROJECT_ROOT)
    assert list(stages) == list(DEFAULT_DATA)  # no import stage without data.imports
    for name, (deps, outs) in DEFAULT_DATA.items():
        got_deps, got_outs = stages[name]
        assert [d for d in got_deps if d.startswith("data/")] == list(deps), name
        assert [o for o in got_outs if o.startswith("data/")] == list(outs), name
    for name in ("splits", "train", "evaluate", "adapt"):
        assert load_params(name, PROJECT_ROOT / "params.yaml")["manifest"] == "data/manifest.parquet"
    assert load_params("splits", PROJECT_ROOT / "params.yaml")["out_dir"] == "data/splits"


def test_shipped_dataset_settings_write_where_dvc_expects() -> None:
    for path in sorted((PROJECT_ROOT / "configs").glob("*.yaml")):
        overlay = yaml.safe_load(path.read_text())
        name = path.stem
        assert overlay["import"]["manifest_out"] == f"data/imported/{name}/manifest.parquet", path
        assert overlay["import"]["features_dir"] == f"data/imported/{name}/features", path
        assert overlay["data"]["dir"] == f"data/imported/{name}", path
        direct = load_params("train", f"{PROJECT_ROOT / 'params.yaml'},{path}")  # the path without DVC
        assert direct["manifest"] == f"data/imported/{name}/manifest.parquet" and direct["out_dir"] == f"runs/{name}"
        register = load_params("register", f"{PROJECT_ROOT / 'params.yaml'},{path}")
        assert register["model"] == f"runs/{name}/models/model.pt" and register["metrics"].startswith(f"runs/{name}/")


def test_declared_import_and_data_dir_rewire_the_pipeline(tmp_path: Path) -> None:
    repo = make_repo_copy(tmp_path / "imer", {})
    _set_params(repo, data={"dir": "data/imported/iemocap4", "imports": {"iemocap4": "data/external/IEMOCAP"}})
    stages = _resolved(repo)
    deps, outs = stages["import@iemocap4"]
    assert "data/external/IEMOCAP" in deps and "configs/iemocap4.yaml" not in outs
    assert outs == ["data/imported/iemocap4/manifest.parquet", "data/imported/iemocap4/features"]
    imported = [p.replace("data/", "data/imported/iemocap4/", 1) for p in CORPUS]
    assert [d for d in stages["splits"][0] if d.startswith("data/")] == imported
    assert stages["splits"][1] == ["data/imported/iemocap4/splits"]
    for name in ("train", "evaluate", "adapt"):
        assert [d for d in stages[name][0] if d.startswith("data/")] == [*imported, "data/imported/iemocap4/splits"]
    assert stages["ingest"] == _resolved(PROJECT_ROOT)["ingest"]  # the corpus stages stay as they are
    train = load_params("train", repo / "params.yaml")
    assert train["splits_dir"] == "data/imported/iemocap4/splits" and train["out_dir"] == "."


def test_fresh_clone_status_and_dry_run(tmp_path: Path) -> None:
    """No import stage and no external file needed by default. (`dvc repro --dry` on a fresh clone
    stops at ingest, whose dependency data/corpus only the corpus stage creates: DVC's dry run
    hashes deps it has not built; that was so before the dataset switch too.)"""
    repo = make_repo_copy(tmp_path / "imer", {})
    status = dvc(repo, "status")
    assert status.returncode == 0, status.stderr[-2000:]
    assert "splits:" in status.stdout and "import" not in status.stdout
    dry = dvc(repo, "repro", "--dry")
    assert "Running stage 'corpus'" in dry.stdout and "import" not in dry.stdout + dry.stderr
    assert dry.returncode == 0 or "failed to reproduce 'ingest'" in dry.stderr


def _iemocap_project(tmp_path: Path) -> Path:
    """A project copy with the tiny GCNet IEMOCAP fixture in data/external/IEMOCAP, declared as an import."""
    repo = make_repo_copy(tmp_path / "imer", {
        "train": {"max_epochs": 2, "patience": 2, "batch_size": 8, "mlflow": {"enabled": False},
                  "model": {"d_model": 16, "n_heads": 2, "d_fusion": 16}, "lora": {"rank": 2}, "dpft": {"monitor_size": 16}},
        "evaluate": {"log_mlflow": False},
        "splits": {"strategy": "loso", "missing_rates": [0.0, 0.5]},
        "data": {"imports": {"iemocap4": "data/external/IEMOCAP"}},
    })
    exp = write_gcnet_iemocap(repo / "data/external/IEMOCAP", sessions=4, dialogues=2)
    settings = yaml.safe_load((repo / "configs/iemocap4.yaml").read_text())
    settings["import"].update(label_path=str(exp.label_path.relative_to(repo)),
                              feature_dirs={m: str(p.relative_to(repo)) for m, p in exp.feature_dirs.items()})
    (repo / "configs/iemocap4.yaml").write_text(yaml.safe_dump(settings, sort_keys=False))
    for cmd in (["add", "-A"], ["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "iemocap"]):
        subprocess.run(["git", *cmd], cwd=repo, check=True, capture_output=True)
    return repo


@pytest.mark.slow
def test_dvc_exp_run_trains_an_imported_fold(tmp_path: Path) -> None:
    repo = _iemocap_project(tmp_path)
    first = dvc(repo, "exp", "run", "evaluate", "-S", "data.dir=data/imported/iemocap4", "-S", "splits.fold=1")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "Running stage 'import@iemocap4'" in first.stdout and "Running stage 'corpus'" not in first.stdout
    _, meta = read_manifest(repo / "data/imported/iemocap4/manifest.parquet")
    assert meta["source"] == "import:gcnet:iemocap4"
    splits = json.loads((repo / "data/imported/iemocap4/splits/splits.json").read_text())
    assert splits["strategy"] == "loso" and splits["fold"] == 1 and splits["groups"]["test"] == ["Ses02"]
    provenance = json.loads((repo / "models/train_summary.json").read_text())["provenance"]
    assert provenance["manifest_sha256"] == file_digest(repo / "data/imported/iemocap4/manifest.parquet")
    assert provenance["features"]["a"]["path"] == "data/imported/iemocap4/features/acoustic.arrow"
    assert provenance["splits_hash"] == splits["content_hash"]  # the model records the fold it trained on
    checkpoint = torch.load(repo / "models/model.pt", map_location="cpu", weights_only=False)
    assert checkpoint["extra"]["provenance"] == provenance
    assert set(json.loads((repo / "reports/metrics.json").read_text())["test"]["fixed"]) >= {"a", "t", "v", "atv"}

    second = dvc(repo, "exp", "run", "evaluate", "-S", "data.dir=data/imported/iemocap4", "-S", "splits.fold=2")
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "Running stage 'import@iemocap4'" not in second.stdout  # the import is cached, only the fold reruns
    assert json.loads((repo / "data/imported/iemocap4/splits/splits.json").read_text())["groups"]["test"] == ["Ses03"]
    shown = dvc(repo, "exp", "show", "--json")
    assert shown.returncode == 0 and "data/imported/iemocap4" in shown.stdout  # data.dir is a column
