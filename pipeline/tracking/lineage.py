"""The checkpoint and the train summary must come from the same training run.

`models/model.pt` records its MLflow run id in `extra["mlflow_run_id"]`, and
`models/train_summary.json` records it as `mlflow_run_id`. Evaluate and register
open the summary's run: if the two files come from different runs (a kill between
the two writes, or a checkout that restored one and not the other) they would log
one model's metrics into another model's run and register the wrong evidence.
`matching_train_summary` refuses that state, naming both files.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class LineageError(ValueError):
    """model.pt and train_summary.json were written by different training runs."""


def checkpoint_run_id(model_path: str | Path) -> str | None:
    """The MLflow run id stored in a checkpoint's `extra` (None when training ran without MLflow)."""
    import torch  # here, not at import: register and the flows import this module

    path = Path(model_path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: model checkpoint not found (run the train stage)")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt file or a pickle that is not weights-only safe
        raise ValueError(f"{path}: not a loadable weights-only checkpoint ({exc})") from exc
    extra = payload.get("extra") if isinstance(payload, dict) else None
    if not isinstance(extra, dict):
        raise ValueError(f"{path}: not an imer checkpoint (no 'extra' record)")
    run_id = extra.get("mlflow_run_id")
    return None if run_id is None else str(run_id)


def matching_train_summary(model_path: str | Path, summary_path: str | Path) -> dict[str, Any]:
    """The train summary, after checking that it and the checkpoint name the same MLflow run."""
    summary_path = Path(summary_path)
    if not summary_path.exists():
        raise FileNotFoundError(f"{summary_path}: train summary not found (run the train stage)")
    summary = json.loads(summary_path.read_text())
    in_summary = summary.get("mlflow_run_id")
    in_model = checkpoint_run_id(model_path)
    if in_summary != in_model:
        raise LineageError(
            f"{model_path} and {summary_path} come from different training runs (checkpoint run "
            f"{in_model or 'none'}, summary run {in_summary or 'none'}): refusing to log or register one model's "
            "evidence under the other's run. Re-run the train stage (imer train, or dvc repro train), or restore "
            "both files from the same revision (dvc checkout models)."
        )
    return summary
