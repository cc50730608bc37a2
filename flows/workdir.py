"""Deployment pull step: run flows from the checkout this package was installed from.

A process worker starts each flow run in a fresh process; `prefect.yaml` names this
step so the run's working directory is the worker machine's own checkout (editable
install), whatever path it has there. `IMER_ROOT` overrides it.
"""
from __future__ import annotations

import os
from pathlib import Path


def project_root() -> Path:
    """IMER_ROOT, else the directory holding the `flows` package (the repo root)."""
    env = os.environ.get("IMER_ROOT")
    return Path(env).resolve() if env else Path(__file__).resolve().parents[1]


def enter_checkout() -> dict[str, str]:
    """chdir to the project root; the returned dict is the step's output for later steps."""
    root = project_root()
    if not (root / "params.yaml").exists():
        raise FileNotFoundError(f"{root}: no params.yaml; set IMER_ROOT to the project checkout")
    os.chdir(root)
    return {"directory": str(root)}
