"""The `orchestration:` section of params.yaml, with defaults, plus run naming helpers.

Orchestration keys never change what a stage computes, so dvc.yaml lists none of
them: switching the train pool or the Dask address must not make stages stale.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from pipeline.params import config_hash

SECTION = "orchestration"
DEFAULTS: dict[str, Any] = {
    "prefect": True,            # `imer <stage>` runs inside its Prefect flow
    "train_pool": None,         # work pool name (e.g. gpu): train runs on that pool's deployment
    "stage_deployment": "imer-stage/stage-on-{pool}",  # deployment serving a pool (prefect.yaml)
    "dispatch_timeout_s": 7200,
    "extraction_runner": "default",  # default | dask
    "dask_address": None,       # tcp://scheduler:8786; None with runner=dask -> LocalCluster
    "dask_workers": 2,          # LocalCluster size
    "chunk_retries": 2,         # retries of an extraction chunk on transient I/O errors (OSError)
    "chunk_retry_delay_s": [1, 5],
    "dataset": None,            # run-name label; None -> derived from ingest.listing
}
NO_PREFECT_ENV = "IMER_NO_PREFECT"


def _read(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: params file not found (run from the project root)")
    return yaml.safe_load(path.read_text()) or {}


def load_orchestration(params_path: str | Path = "params.yaml") -> dict[str, Any]:
    """The orchestration section merged over DEFAULTS (the section is optional)."""
    section = _read(params_path).get(SECTION) or {}
    unknown = set(section) - set(DEFAULTS)
    if unknown:
        raise KeyError(f"{params_path}: unknown orchestration keys {sorted(unknown)}")
    return {**DEFAULTS, **section}


def prefect_enabled(params_path: str | Path = "params.yaml") -> bool:
    """False when IMER_NO_PREFECT=1 or orchestration.prefect is false (escape hatch for unit tests)."""
    if os.environ.get(NO_PREFECT_ENV, "").strip().lower() in {"1", "true", "yes"}:
        return False
    try:
        return bool(load_orchestration(params_path)["prefect"])
    except FileNotFoundError:
        return True


def dataset_label(params_path: str | Path = "params.yaml") -> str:
    """A short name of the data a run used: orchestration.dataset or the listing's folder."""
    data = _read(params_path)
    label = (data.get(SECTION) or {}).get("dataset")
    if label:
        return str(label)
    listing = (data.get("ingest") or {}).get("listing")
    if listing:
        name = Path(listing).parent.name or Path(listing).stem
        shifted = (data.get("corpus") or {}).get("shifted_domain")
        return f"{name}-shifted" if shifted and name == "corpus" else name
    return "unknown"


def section_hash(stage_section: str, params_path: str | Path = "params.yaml") -> str:
    """Hash of one params section: what a stage run depended on (8 hex chars in run names)."""
    return config_hash(_read(params_path).get(stage_section))[:8]


def params_file_hash(params_path: str | Path = "params.yaml") -> str:
    """Hash of the whole params file (for flows that span all stages)."""
    return config_hash(_read(params_path))[:8]
