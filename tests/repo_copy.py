"""Copy the project into a temporary Git+DVC repo, so integration tests run the real `dvc repro`."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def project_files() -> list[str]:
    """Tracked plus untracked-but-not-ignored files: what a clone of the working tree holds."""
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=PROJECT_ROOT, check=True, capture_output=True, text=True)
    return [line for line in out.stdout.splitlines() if line and (PROJECT_ROOT / line).is_file()]


def deep_update(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            deep_update(base[key], value)
        else:
            base[key] = value
    return base


def make_repo_copy(dest: Path, param_overrides: dict[str, Any]) -> Path:
    """Create `dest` as a fresh Git repo with DVC initialised and params overridden."""
    for rel in project_files():
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(PROJECT_ROOT / rel, target)
    params = yaml.safe_load((dest / "params.yaml").read_text())
    (dest / "params.yaml").write_text(yaml.safe_dump(deep_update(params, param_overrides), sort_keys=False))
    env = pipeline_env(dest)
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "copy"]):
        subprocess.run(cmd, cwd=dest, check=True, env=env)
    return dest


def pipeline_env(repo: Path) -> dict[str, str]:
    """Environment for subprocesses: the venv's tools first, the copy's code importable first."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = str(repo)
    env["HF_HUB_OFFLINE"] = "1"
    env["TRANSFORMERS_OFFLINE"] = "1"
    env.setdefault("IMER_NO_PREFECT", "1")
    return env


def dvc(repo: Path, *args: str, env: dict[str, str] | None = None, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run([str(Path(sys.executable).parent / "dvc"), *args], cwd=repo, env=env or pipeline_env(repo), capture_output=True, text=True, timeout=timeout)
