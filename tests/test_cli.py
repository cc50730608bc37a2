"""The `imer` console script: subcommands with their own help, --version, exit codes 0/1/2."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import flows.cli as cli
from flows.stages import STAGE_MODULES

ROOT = Path(__file__).resolve().parents[1]


def test_version_and_top_level_help_list_every_command(capsys):
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"imer {cli.version()}"
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in [*STAGE_MODULES, "servers", "repro", "predict", "demo", "compare", "folds"]:
        assert name in out


@pytest.mark.parametrize("stage", ["ingest", "train", "register"])
def test_each_stage_has_its_own_help(stage, capsys):
    assert cli.main([stage, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: imer {stage} ") and "--params" in out and "--no-prefect" in out


@pytest.mark.parametrize("tool, expect", [("servers", "{start,stop,status}"), ("folds", "{aggregate,run}"),
                                          ("repro", "passed to `dvc repro`"), ("demo", "--port"),
                                          ("compare", "--spec")])
def test_tools_answer_their_own_help(tool, expect, capsys):
    assert cli.main([tool, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: imer {tool}") and expect in out


def test_predict_is_wired_to_flows_predict(capsys):
    pytest.importorskip("flows.predict")
    assert cli.main(["predict", "--help"]) == 0
    assert "usage:" in capsys.readouterr().out


def test_repro_help_starts_no_server(tmp_path, monkeypatch, capsys):
    import flows.repro as repro

    def refuse(*args, **kwargs):
        raise AssertionError("imer repro --help started something")

    monkeypatch.setattr(repro, "start_server", refuse)
    monkeypatch.setattr(repro.subprocess, "call", refuse)
    monkeypatch.setattr(repro.subprocess, "run", refuse)
    monkeypatch.chdir(tmp_path)
    assert cli.main(["repro", "--help"]) == 0
    assert "dvc repro" in capsys.readouterr().out
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("argv", [["nosuch"], [], ["train", "--bogus"], ["train", "nosuch"],
                                  ["servers", "bogus"], ["folds"]])
def test_usage_errors_exit_2(argv, capsys):
    assert cli.main(argv) == 2
    assert "usage: imer" in capsys.readouterr().err


def test_runtime_error_exits_1_with_one_line(tmp_path, capsys):
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["feature_report"] = {**params["feature_report"], "manifest": str(tmp_path / "absent.parquet")}
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    assert cli.main(["feature_report", "--no-prefect", "--params", str(path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("imer feature_report: error:") and "absent.parquet" in err and "Traceback" not in err


def test_stages_run_in_order_with_overlaid_params(monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(cli, "run_named_stage", lambda name, path: calls.append((name, path)) or {"stage": name})
    assert cli.main(["splits", "train", "evaluate", "--params", "a.yaml", "--params", "b.yaml", "--no-prefect"]) == 0
    assert calls == [(s, "a.yaml,b.yaml") for s in ("splits", "train", "evaluate")]


def test_console_script_exit_codes():
    """The installed `imer` entry point passes main's code to the shell."""
    imer = Path(sys.executable).with_name("imer")
    if not imer.exists():
        pytest.skip("imer console script not installed in this environment")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    assert subprocess.run([imer, "--version"], capture_output=True, env=env).returncode == 0
    assert subprocess.run([imer, "nosuch"], capture_output=True, env=env).returncode == 2
