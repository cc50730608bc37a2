"""The run report (reports/summary.md + summary.html) from the files the stages write."""
from __future__ import annotations

import json
from pathlib import Path

import yaml

from pipeline.core.modalities import COMBINATIONS
from pipeline.report import run_stage
from pipeline.tracking import plots
from pipeline.tracking.report import write_run_report

ROOT = Path(__file__).resolve().parents[1]


def _write_reports(root: Path) -> Path:
    """A classification run's reports: metrics.json, features.json, registry.json, plots/ (real PNGs)."""
    reports = root / "reports"
    fixed = {c: {"wa": 0.5 + 0.01 * i, "ua": 0.4, "wf1": 0.45, "n": 20, "n_empty": 0}
             for i, c in enumerate((*COMBINATIONS, "mean"))}
    metrics = {"val": {"fixed": fixed, "natural": {"wa": 0.61, "ua": 0.6, "wf1": 0.6}},
               "test": {"fixed": fixed, "natural": {"wa": 0.62, "ua": 0.6, "wf1": 0.6},
                        "random": {"0.5": {"wa": 0.55, "ua": 0.5, "wf1": 0.5}, "0.0": {"wa": 0.62, "ua": 0.6, "wf1": 0.6}}}}
    features = {"clips": 50, "modalities": {
        "acoustic": {"failure_reasons": {"silent_audio": 2, "unreadable_audio": 5}},
        "visual": {"failure_reasons": {"black_video": 1}}, "textual": {"failure_reasons": {}}}}
    registry = {"decision": "rejected", "model_name": "imer-mculora", "version": "3", "reason": "not better",
                "candidate_score": 0.6, "previous_champion_version": "2", "previous_champion_score": 0.65,
                "champion_version": "2"}
    (reports / "plots").mkdir(parents=True)
    for name, data in (("metrics", metrics), ("features", features), ("registry", registry)):
        (reports / f"{name}.json").write_text(json.dumps(data))
    actual, predicted = ["sad", "sad", "happy", "angry"], ["sad", "happy", "happy", "sad"]
    plots.write_csv(reports / "plots/confusion.csv", plots.confusion_rows(actual, predicted))
    plots.plot_confusion(actual, predicted, ["angry", "happy", "sad"], "test", reports / "plots/confusion_natural.png")
    plots.plot_mr_curve(plots.mr_curve_rows(metrics), "wa", reports / "plots/mr_curve.png")
    return reports


def test_summary_holds_every_section(tmp_path):
    reports = _write_reports(tmp_path)
    paths = write_run_report(reports)
    md = Path(paths["markdown"]).read_text()
    assert "Decision: **rejected** for `imer-mculora` version 3" in md and "previous champion version 2" in md
    assert "| combination | val wa | val ua | val wf1 | test wa | test ua | test wf1 |" in md
    rows = [line.split(" | ")[0].strip("| ") for line in md.splitlines() if line.startswith("| ")]
    assert rows[1:10] == [*COMBINATIONS, "mean", "natural"]  # fixed protocol in combination order
    assert "| missing rate | wa | ua | wf1 |" in md and "| 0.5000 | 0.5500 | 0.5000 | 0.5000 |" in md
    assert md.index("| 0.0000 | 0.6200") < md.index("| 0.5000 | 0.5500")  # rates ascending
    assert "| sad | 0 | 1 | 1 |" in md  # confusion counts: actual sad -> happy once, sad once
    assert "| acoustic | unreadable_audio | 5 |" in md and "| visual | black_video | 1 |" in md
    assert "![mr_curve.png](plots/mr_curve.png)" in md and "per_combination.png" not in md  # only existing PNGs
    page = Path(paths["html"]).read_text()
    assert page.count("data:image/png;base64,") == 2 and "<b>rejected</b>" in page and "<table>" in page


def test_missing_inputs_are_named_not_fatal(tmp_path):
    (tmp_path / "reports").mkdir()
    md = Path(write_run_report(tmp_path / "reports")["markdown"]).read_text()
    assert "reports/registry.json absent" in md and "reports/metrics.json is absent" in md
    assert "reports/features.json is absent" in md


def test_report_stage_is_wired_in_dvc_params_and_cli(tmp_path):
    from flows.stages import STAGE_MODULES

    stage = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["report"]
    assert stage["cmd"] == "imer report" and stage["deps"][0] == "pipeline/report.py"
    assert STAGE_MODULES["report"] == "pipeline.report"
    assert set(yaml.safe_load((ROOT / "params.yaml").read_text())["report"]) == {"reports_dir", "title"}
    reports = _write_reports(tmp_path)
    summary = run_stage({"reports_dir": str(reports), "title": "run 7"})
    assert Path(summary["markdown"]).read_text().startswith("# run 7\n")
