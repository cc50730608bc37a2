"""`dvc repro` end to end on a tiny corpus in a copy of the project, then a second no-op `dvc repro`."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.formats.feature_table import read_feature_table
from pipeline.formats.manifest import read_manifest
from tests.repo_copy import dvc, make_repo_copy

pytestmark = pytest.mark.integration

TINY = {
    "corpus": {"utterances": 40, "breakage_share": 0.15, "workers": 2},
    "train": {"max_epochs": 2, "patience": 2, "dpft": {"monitor_size": 64}},
}


@pytest.fixture(scope="module")
def reproduced(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    repo = make_repo_copy(tmp_path_factory.mktemp("dvc") / "imer", TINY)
    first = dvc(repo, "repro")
    assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-4000:]
    return repo, first.stdout


def test_every_stage_ran_and_no_clip_was_lost(reproduced: tuple[Path, str]) -> None:
    repo, log = reproduced
    for stage in ("corpus", "ingest", "extract_acoustic", "extract_visual", "extract_textual", "feature_report", "splits", "train", "evaluate", "register"):
        assert f"Running stage '{stage}'" in log
    manifest, _ = read_manifest(repo / "data/manifest.parquet")
    ids = manifest.column("utterance_id").to_pylist()
    assert len(ids) == 40
    for name in ("acoustic", "visual", "textual"):
        assert list(read_feature_table(repo / f"data/features/{name}.arrow").utterance_id) == ids


def test_injected_breakage_is_detected_and_reported(reproduced: tuple[Path, str]) -> None:
    report = json.loads((Path(reproduced[0]) / "reports/features.json").read_text())
    check = report["breakage_detection"]
    assert check["injected"] > 0 and check["detected"] == check["injected"] and check["undetected"] == []
    assert set(report["probe"]) >= {"acoustic", "visual", "textual", "all"}


def test_metrics_and_registry_outputs(reproduced: tuple[Path, str]) -> None:
    repo = reproduced[0]
    metrics = json.loads((repo / "reports/metrics.json").read_text())
    assert set(metrics["test"]["fixed"]) == {"a", "t", "v", "at", "av", "tv", "atv", "mean"}
    assert set(metrics["test"]["random"]) == {f"{r / 10:.1f}" for r in range(8)}
    registry = json.loads((repo / "reports/registry.json").read_text())
    assert registry["decision"] == "promoted" and "champion" in registry["aliases"]
    shown = dvc(repo, "metrics", "show", "--json")
    assert shown.returncode == 0 and "atv" in shown.stdout


def test_second_repro_is_a_no_op(reproduced: tuple[Path, str]) -> None:
    repo = reproduced[0]
    second = dvc(repo, "repro")
    assert second.returncode == 0, second.stderr[-2000:]
    assert "Running stage" not in second.stdout
    assert "Data and pipelines are up to date" in second.stdout
