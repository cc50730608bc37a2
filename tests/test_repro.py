"""`imer repro`: one real Prefect server for the whole `dvc repro`, stopped by pid afterwards."""
from __future__ import annotations

import json
import sys

import psutil

from flows.repro import SERVER_NAME, repro

PROBE = (
    "import json, os, shutil, sys, urllib.request\n"
    "url = os.environ['PREFECT_API_URL']\n"
    "urllib.request.urlopen(url + '/health', timeout=10).read()\n"
    "shutil.copy(sys.argv[1], sys.argv[2])\n"
    "print(url)\n"
)


def test_repro_serves_one_prefect_api_and_stops_it(tmp_path, monkeypatch):
    monkeypatch.delenv("IMER_NO_PREFECT", raising=False)
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect-home"))
    record_file, seen = tmp_path / "run" / f"{SERVER_NAME}.json", tmp_path / "seen.json"
    code = repro(root=tmp_path, command=[sys.executable, "-c", PROBE, str(record_file), str(seen)])
    assert code == 0
    record = json.loads(seen.read_text())  # the server was healthy while the command ran
    assert record["url"].startswith("http://127.0.0.1:")
    assert not psutil.pid_exists(record["pid"]) or psutil.Process(record["pid"]).status() == psutil.STATUS_ZOMBIE
    assert not record_file.exists() and not (tmp_path / "run" / f"{SERVER_NAME}.pid").exists()


def test_repro_uses_a_configured_api_without_starting_one(tmp_path, monkeypatch):
    monkeypatch.delenv("IMER_NO_PREFECT", raising=False)
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")
    out = tmp_path / "url.txt"
    code = repro(root=tmp_path, command=[sys.executable, "-c",
                                         f"import os; open({str(out)!r}, 'w').write(os.environ['PREFECT_API_URL'])"])
    assert code == 0 and out.read_text() == "http://127.0.0.1:9/api"
    assert not (tmp_path / "run").exists()


def test_repro_exit_code_is_the_commands(tmp_path, monkeypatch):
    monkeypatch.setenv("IMER_NO_PREFECT", "1")
    assert repro(root=tmp_path, command=[sys.executable, "-c", "raise SystemExit(3)"]) == 3
