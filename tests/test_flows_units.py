"""Orchestration pieces that need no Prefect server: settings, artifact content, CLI routing, servers by pid."""
from __future__ import annotations

import json
from pathlib import Path

import psutil
import pytest
import yaml

from flows.artifacts import last_epoch_ratios, metrics_rows, outcome_markdown
from flows.settings import DEFAULTS, dataset_label, load_orchestration, prefect_enabled, section_hash
from pipeline.core.modalities import COMBINATIONS
from flows.servers import ServerSpec, free_port, read_record, start_server, stop_server

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def _params(tmp_path: Path, **orch) -> Path:
    params = yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())
    params["orchestration"] = {**params.get("orchestration", {}), **orch}
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def test_orchestration_defaults_and_escape_hatch(tmp_path, monkeypatch):
    path = _params(tmp_path, train_pool="gpu")
    orch = load_orchestration(path)
    assert orch["train_pool"] == "gpu" and set(orch) == set(DEFAULTS)
    monkeypatch.delenv("IMER_NO_PREFECT", raising=False)
    assert prefect_enabled(path)
    monkeypatch.setenv("IMER_NO_PREFECT", "1")
    assert not prefect_enabled(path)
    bad = _params(tmp_path, trian_pool="gpu")
    with pytest.raises(KeyError, match="trian_pool"):
        load_orchestration(bad)


def test_run_names_follow_dataset_and_params(tmp_path):
    path = _params(tmp_path)
    before = section_hash("train", path)
    assert dataset_label(path) == "corpus"
    data = yaml.safe_load(path.read_text())
    data["train"]["lr"] = 0.5
    path.write_text(yaml.safe_dump(data))
    assert section_hash("train", path) != before


def test_outcome_markdown_reads_reports(tmp_path):
    (tmp_path / "reports").mkdir()
    (tmp_path / "models").mkdir()
    metrics = {"test": {"fixed": {c: {"wa": 0.5 + i / 100, "ua": 0.4} for i, c in enumerate(COMBINATIONS)}}}
    (tmp_path / "reports" / "metrics.json").write_text(json.dumps(metrics))
    q = [[1 / 7] * 7, [0.1, 0.1, 0.1, 0.2, 0.2, 0.2, 0.1]]
    (tmp_path / "models" / "train_summary.json").write_text(json.dumps({"q_history": q, "mlflow_run_id": "abc"}))
    (tmp_path / "reports" / "registry.json").write_text(json.dumps({"decision": "promoted", "reason": "first",
                                                                    "version": "1", "champion_version": "1"}))
    rows = metrics_rows(metrics)
    assert [r["combination"] for r in rows] == list(COMBINATIONS)
    assert rows[3]["wa"] == pytest.approx(0.53)
    assert last_epoch_ratios({"q_history": q}) == dict(zip(COMBINATIONS, q[-1]))
    text = outcome_markdown(tmp_path)
    assert "**promoted**" in text and "runs:/abc" in text and "| test | at |" in text
    assert outcome_markdown(tmp_path / "nothing") is None


def test_cli_no_prefect_runs_the_bare_stage(tmp_path, monkeypatch):
    """`imer <stage> --no-prefect` must not import Prefect's engine or start a server."""
    import flows.cli as cli

    calls = []
    monkeypatch.setattr(cli, "run_named_stage", lambda name, path: calls.append((name, path)) or {"ok": 1})
    assert cli.main(["feature_report", "--no-prefect", "--params", str(_params(tmp_path))]) == 0
    assert calls == [("feature_report", str(tmp_path / "params.yaml"))]


def test_server_is_started_and_stopped_by_pid(tmp_path):
    """start_server waits for health, records the pid; stop_server kills exactly that process group."""
    port = free_port()
    spec = ServerSpec("web", ["python3", "-m", "http.server", str(port), "--bind", "127.0.0.1"],
                      f"http://127.0.0.1:{port}/", f"http://127.0.0.1:{port}")
    record = start_server(spec, tmp_path / "run", timeout_s=30)
    pid = record["pid"]
    assert (tmp_path / "run" / "web.pid").read_text().strip() == str(pid)
    assert psutil.Process(pid).is_running()
    with pytest.raises(RuntimeError, match="already running"):
        start_server(spec, tmp_path / "run", timeout_s=30)
    assert stop_server(tmp_path / "run", "web")
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert read_record(tmp_path / "run", "web") is None and not stop_server(tmp_path / "run", "web")


def test_dataset_label_follows_overlays(tmp_path):
    """An overlay that points training at an imported benchmark names runs after that benchmark."""
    base = _params(tmp_path)
    overlay = tmp_path / "mosi.yaml"
    overlay.write_text(yaml.safe_dump({"import": {"dataset": "mosi", "manifest_out": "data/imported/mosi/m.parquet"},
                                       "train": {"manifest": "data/imported/mosi/m.parquet"}}))
    assert dataset_label(f"{base},{overlay}") == "mosi"
    assert dataset_label(str(base)) == "corpus" and dataset_label(str(base), stage="import") == "iemocap4"
    assert load_orchestration(f"{base},{overlay}")["prefect"] is True
