"""DVC plots: validation and test side by side per combination, and task-independent CSVs (regression too)."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from pipeline.core.metrics import DEFAULT_SELECTION
from pipeline.core.modalities import COMBINATIONS
from pipeline.tracking import plots

ROOT = Path(__file__).resolve().parents[1]
DVC = str(Path(sys.executable).with_name("dvc"))


def _metrics(task: str) -> dict:
    names = {"classification": ("wa", "ua", "wf1"), "regression": ("acc2", "f1", "acc7", "mae", "corr")}[task]
    fixed = {c: {k: 0.1 * i + 0.01 * j for j, k in enumerate(names)} | {"n": 10}
             for i, c in enumerate((*COMBINATIONS, "mean"))}
    random = {str(mr / 10): {k: 0.5 - mr / 100 for k in names} for mr in range(3)}
    return {"val": {"fixed": fixed}, "test": {"fixed": fixed, "random": random}}


@pytest.mark.parametrize("task", ["classification", "regression"])
def test_rows_carry_the_tasks_primary_metric_under_fixed_columns(task):
    metrics = _metrics(task)
    assert plots.task_of(metrics) == task and plots.primary_metric(metrics) == DEFAULT_SELECTION[task]
    rows = plots.per_combination_rows(metrics)
    assert len(rows) == 2 * (len(COMBINATIONS) + 1)
    assert {tuple(r) for r in rows} == {("combination", "split", "metric", "score")}
    assert {r["metric"] for r in rows} == {DEFAULT_SELECTION[task]}
    assert rows[1]["score"] == pytest.approx(metrics["val"]["fixed"][COMBINATIONS[1]][DEFAULT_SELECTION[task]])
    curve = plots.mr_curve_rows(metrics)
    assert [r["mr"] for r in curve] == [0.0, 0.1, 0.2] and {tuple(r) for r in curve} == {("mr", "metric", "score")}


def test_dvc_yaml_plot_specs_use_task_independent_columns():
    specs = {}
    for stage in yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"].values():
        for entry in stage.get("plots", []):
            if isinstance(entry, dict):
                specs.update(entry)
    per_comb = specs["reports/plots/per_combination.csv"]
    assert (per_comb["x"], per_comb["y"]) == ("score", "combination")
    assert (ROOT / ".dvc/plots" / f"{per_comb['template']}.json").exists()
    assert specs["reports/plots/mr_curve.csv"]["y"] == "score"
    assert "wa" not in {str(v) for spec in specs.values() if spec for v in spec.values()}


def _regression_evaluation(root: Path) -> dict:
    """A real evaluation of a tiny random network on a synthetic regression corpus."""
    from pipeline.evaluate import evaluate_model
    from pipeline.methods import MCULoRANet, ModelConfig, save_model
    from pipeline.splits import build_splits
    from pipeline.training.data import MultimodalData
    from tests.factories import make_feature_dataset

    manifest, features = make_feature_dataset(root, n=80, missing_share=0.2, task="regression", seed=3)
    build_splits(manifest, features, root / "splits", {"seed": 1})
    data = MultimodalData.load(manifest, features, root / "splits")
    torch.manual_seed(0)
    cfg = ModelConfig(input_dims=data.input_dims, seq_lens=data.seq_lens, task=data.task,
                      n_outputs=data.n_outputs, d_model=8, n_heads=2, d_fusion=8, dropout=0.0)
    save_model(root / "model.pt", MCULoRANet(cfg).eval(), {})
    return evaluate_model(root / "model.pt", data, root / "splits", batch_size=32)


@pytest.mark.integration
def test_regression_corpus_gets_grouped_non_empty_dvc_plots(tmp_path):
    """evaluate's reports for a regression corpus, rendered by a real `dvc plots show --json`."""
    from pipeline.evaluate import write_reports

    torch.set_num_threads(1)
    repo = tmp_path / "repo"
    repo.mkdir()
    result = _regression_evaluation(tmp_path)
    pngs = write_reports(result, repo / "reports/metrics.json", repo / "reports/plots")
    assert all(p.stat().st_size > 0 for p in pngs)
    per_comb = pd.read_csv(repo / "reports/plots/per_combination.csv")
    assert set(per_comb["split"]) == {"val", "test"} and set(per_comb["metric"]) == {"acc2"}
    assert per_comb["score"].notna().any()

    subprocess.run([DVC, "init", "--no-scm", "-q"], cwd=repo, check=True)
    shutil.copytree(ROOT / ".dvc/plots", repo / ".dvc/plots")
    shutil.copy(ROOT / "dvc.yaml", repo / "dvc.yaml")
    shutil.copy(ROOT / "params.yaml", repo / "params.yaml")
    shown = subprocess.run([DVC, "plots", "show", "--json", "reports/plots/per_combination.csv",
                            "reports/plots/mr_curve.csv"], cwd=repo, capture_output=True, text=True, check=True)
    data = json.loads(shown.stdout)["data"]
    spec = data["reports/plots/per_combination.csv"][0]["content"]
    encoding = spec["encoding"]
    assert encoding["color"]["field"] == "split" and encoding["yOffset"]["field"] == "split"  # side by side
    assert encoding["x"]["field"] == "score" and encoding["x"].get("stack", "absent") is None  # never summed
    values = spec["data"]["values"]
    assert {v["split"] for v in values} == {"val", "test"} and len(values) == len(per_comb)
    curve = data["reports/plots/mr_curve.csv"][0]["content"]["data"]["values"]
    assert len(curve) == 8 and all(v["metric"] == "acc2" for v in curve)
