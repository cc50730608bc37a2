"""The `orchestration:` section of params.yaml, with defaults, plus run naming helpers.

Orchestration keys never change what a stage computes, so dvc.yaml lists none of
them: switching the train pool or the Dask address must not make stages stale.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pipeline.core.params import DEFAULT_DATA_DIR, config_hash, load_all_params

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
    """All params, merged like the stages see them (a comma-separated path is an overlay list)."""
    return load_all_params(path)


def under(project_dir: str | Path, params_path: str) -> str:
    """`params_path` (possibly comma-separated) resolved against `project_dir`."""
    return ",".join(str(Path(project_dir) / p) for p in str(params_path).split(","))


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


def dataset_label(params_path: str | Path = "params.yaml", stage: str | None = None) -> str:
    """A short name of the data a run used.

    orchestration.dataset if set; the imported benchmark (`import.dataset`) when the
    stage is `import` or training reads the imported manifest; the import's name when `data.dir` is not data/ (data/imported/<name>); else the
    folder of the ingest listing (`corpus` for the embedded corpus).
    """
    data = _read(params_path)
    label = (data.get(SECTION) or {}).get("dataset")
    if label:
        return str(label)
    imported = data.get("import") or {}
    train_manifest = (data.get("train") or {}).get("manifest")
    if imported.get("dataset") and (stage == "import" or train_manifest == imported.get("manifest_out")):
        return str(imported["dataset"])
    data_dir = (data.get("data") or {}).get("dir")
    if data_dir and Path(data_dir) != Path(DEFAULT_DATA_DIR):  # an import: data/imported/<name>
        return Path(data_dir).name
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
