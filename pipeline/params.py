"""Read one stage's section of params.yaml: each stage sees only its own keys."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import yaml

DEFAULT_PARAMS = Path("params.yaml")


def load_params(section: str, path: str | Path = DEFAULT_PARAMS) -> dict[str, Any]:
    """Return `section` of the params file, failing with the file name if it is absent."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: params file not found (run from the project root)")
    data = yaml.safe_load(path.read_text()) or {}
    if section not in data:
        raise KeyError(f"{path}: no section '{section}'")
    return data[section]


def config_hash(config: Any) -> str:
    """A short stable hash of a JSON-able config: used for caches and run tags."""
    blob = json.dumps(config, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
