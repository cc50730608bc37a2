"""Stage `train`: fit the configured method with Lightning, select the checkpoint on validation.

The work is `pipeline.training.loop.train_model`; this module resolves paths and
params, loads only the train and val rows (test rows are never even indexed) and
wraps the run in its MLflow run.
"""
from __future__ import annotations

import contextlib
from dataclasses import asdict
from typing import Any

from pipeline.training.config import TrainConfig
from pipeline.training.data import MultimodalData
from pipeline.training.loop import _trainer, _val_loader, build_model_config, train_model  # noqa: F401

SECTION = "train"


def run_stage(params: dict[str, Any]) -> dict:
    """Load train+val only, open the MLflow run, train, close the run."""
    from pipeline.tracking.runs import log_dataset_inputs, start_run, system_metrics

    cfg = TrainConfig.from_params(params)
    data = MultimodalData.load(cfg.manifest, cfg.features_dir, cfg.splits_dir, include=("train", "val"))
    tracking = start_run(asdict(cfg.mlflow), cfg.to_dict(), data.provenance) if cfg.mlflow.enabled else None
    if tracking is not None:
        log_dataset_inputs(tracking, data.provenance, cfg.manifest)  # MLflow dataset lineage
    try:
        with system_metrics(tracking) if tracking is not None else contextlib.nullcontext():
            summary = train_model(data, cfg, cfg.out_dir, tracking)
    except BaseException:
        if tracking is not None:
            tracking.end("FAILED")
        raise
    if tracking is not None:
        tracking.end("FINISHED")
    return {k: summary[k] for k in ("best_epoch", "best_val_mean", "monitor", "epochs_run", "mlflow_run_id")}


def main() -> None:
    from pipeline.core.params import load_params

    print(run_stage(load_params(SECTION)))


if __name__ == "__main__":
    main()
