"""Stage `train`: fit MCULoRA with Lightning, select the checkpoint on validation, save model.pt.

The test split never reaches this module: `run_stage` aligns only train and val
rows, and `train_model` asserts that neither of its views holds a test row.
"""
from __future__ import annotations

import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from pipeline.atomic import atomic_path, write_json
from pipeline.combinations import COMBINATIONS
from pipeline.data import MultimodalData, feature_statistics, train_prior
from pipeline.dpft import DPFTController
from pipeline.lit_module import MCULoRAModule
from pipeline.model import MCULoRANet, ModelConfig, save_model
from pipeline.model.mcla import is_adapter_parameter
from pipeline.params import config_hash
from pipeline.sampler import BatchDataset, BatchKey, HomogeneousBatchSampler, ModalityDropoutSampler

SECTION = "train"
DEFAULT_SELECTION = {"classification": "wa", "regression": "acc2"}

warnings.filterwarnings("ignore", ".*does not have many workers.*")
warnings.filterwarnings("ignore", ".*LightningModule.*configure_optimizers.*")


def build_model_config(data: MultimodalData, params: dict[str, Any]) -> ModelConfig:
    """ModelConfig from the data's dims and the train params (model.*, lora.*, variant)."""
    model_p, lora_p = params.get("model", {}), params.get("lora", {})
    return ModelConfig(
        input_dims=data.input_dims, seq_lens=data.seq_lens, task=data.task, n_outputs=data.n_outputs,
        d_model=int(model_p.get("d_model", 64)), n_layers=int(model_p.get("n_layers", 1)),
        n_heads=int(model_p.get("n_heads", 4)), d_fusion=int(model_p.get("d_fusion", 128)),
        dropout=float(model_p.get("dropout", 0.1)), lora_rank=int(lora_p.get("rank", 4)),
        lora_alpha=float(lora_p.get("alpha", 8.0)), lora_dropout=float(lora_p.get("dropout", 0.0)),
        variant=params.get("variant", "mculora"),
        adapt_targets=tuple(model_p.get("adapt_targets", ("input", "encoder_mlp", "fusion", "head"))),
        mixed_mode=model_p.get("mixed_mode", "group"), lambda_ort=float(params.get("lambda_ort", 0.1)),
        extra={"feature_config_hashes": {m: data.feature_meta[m].get("config_hash") for m in data.feature_meta}},
    )


def _val_loader(val: MultimodalData, batch_size: int) -> DataLoader:
    keys = [BatchKey(index=np.arange(s, min(s + batch_size, len(val)))) for s in range(0, len(val), batch_size)]
    return DataLoader(BatchDataset(val), sampler=keys, batch_size=None)


def _trainer(max_epochs: int, callbacks: list, root: str) -> pl.Trainer:
    return pl.Trainer(
        accelerator="auto", devices=1, max_epochs=max_epochs, callbacks=callbacks, logger=False,
        deterministic=True if not torch.cuda.is_available() else "warn", enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=root, use_distributed_sampler=False,
        enable_checkpointing=any(isinstance(c, pl.callbacks.ModelCheckpoint) for c in callbacks),
    )


def train_model(data: MultimodalData, params: dict[str, Any], out_dir: str | Path, tracking: Any = None,
                extra_callbacks: list | None = None) -> dict:
    """Train on data's train split, select on its val split; write models/ and reports/ under out_dir.

    `extra_callbacks` (e.g. timers in benchmarks) join the main stage's Lightning callbacks.
    """
    out_dir = Path(out_dir)
    seed = int(params.get("seed", 0))
    if int(params.get("num_threads", 1)) > 0:
        # Small matmuls: intra-op threads only spin against each other (measured 30x slower on 2 busy cores).
        torch.set_num_threads(int(params.get("num_threads", 1)))
    pl.seed_everything(seed, workers=True)
    train, val = data.subset("train"), data.subset("val")
    assert not np.isin("test", train.view_split()) and not np.isin("test", val.view_split()), "test rows in training"
    if len(train) == 0 or len(val) == 0:
        raise ValueError(f"train needs non-empty train and val splits (got {len(train)} / {len(val)})")
    task = data.task
    metric = params.get("selection_metric") or DEFAULT_SELECTION[task]
    monitor = f"val/{metric}/mean"
    batch_size = int(params.get("batch_size", 32))
    variant = params.get("variant", "mculora")
    dpft_p = dict(params.get("dpft", {}))
    mode = dpft_p.get("mode", "separability")
    if variant != "mculora" and mode == "separability":
        mode = "uniform"  # separability needs combination-specific branches; recorded in the summary
    config = build_model_config(data, params)
    model = MCULoRANet(config)
    if params.get("standardise_inputs", True):
        model.set_input_statistics(feature_statistics(train))  # train split only: no val/test statistic
    val_loader = _val_loader(val, int(params.get("val_batch_size", 256)))
    prior = train_prior(data)  # scores val samples left with no modality, exactly as evaluate does
    sink = (lambda e: tracking.log_epoch(e, step=e["epoch"])) if tracking is not None else None
    common = dict(lr=float(params.get("lr", 1e-3)), weight_decay=float(params.get("weight_decay", 1e-2)),
                  lambda_ort=float(params.get("lambda_ort", 0.1)), regression_loss=params.get("regression_loss", "l1"),
                  selection_metric=metric, epoch_sink=sink, prior=prior)
    history: list[dict] = []
    counts: dict[str, dict[str, int]] = {}
    regime = params.get("regime", "from_scratch")
    if regime not in ("from_scratch", "two_stage"):
        raise ValueError(f"train.regime must be from_scratch|two_stage, got {regime!r}")

    with tempfile.TemporaryDirectory(prefix="imer-train-") as tmp:
        offset = 0
        if regime == "two_stage":
            # Stage 1: the base network alone, with random modality dropout; adapters stay at their no-op init.
            for name, p in model.named_parameters():
                p.requires_grad_(not is_adapter_parameter(name))
            counts["stage1"] = model.parameter_counts()
            s1_sampler = ModalityDropoutSampler(train.view_natural(), batch_size, seed)
            s1 = MCULoRAModule(model, sampler=s1_sampler, stage="stage1", **common)
            s1_epochs = int(params.get("stage1_epochs", 10))
            _trainer(s1_epochs, [], tmp).fit(s1, DataLoader(BatchDataset(train), sampler=s1_sampler, batch_size=None),
                                             val_loader)
            history += s1.history
            offset = s1_epochs
            model.unfreeze_all()
            model.freeze_base()
        if variant == "plain":
            sampler: Any = ModalityDropoutSampler(train.view_natural(), batch_size, seed + 1)
            dpft = None
        else:
            sampler = HomogeneousBatchSampler(train.view_natural(), batch_size, seed + 1)
            dpft = DPFTController(mode, eta=float(dpft_p.get("eta", 0.1)), q_min=float(dpft_p.get("q_min", 0.05)),
                                  q_max=float(dpft_p.get("q_max", 0.40)))
        counts["main"] = model.parameter_counts()
        monitor_batch = _monitor_batch(train, int(dpft_p.get("monitor_size", 256)), seed)
        module = MCULoRAModule(model, sampler=sampler, dpft=dpft, monitor_batch=monitor_batch, stage="main",
                               epoch_offset=offset, **common)
        ckpt = pl.callbacks.ModelCheckpoint(dirpath=tmp, filename="best", monitor=monitor, mode="max",
                                            save_weights_only=True, save_top_k=1)
        stop = pl.callbacks.EarlyStopping(monitor=monitor, mode="max", patience=int(params.get("patience", 8)))
        train_loader = DataLoader(BatchDataset(train), sampler=sampler, batch_size=None)
        _trainer(int(params.get("max_epochs", 30)), [ckpt, stop, *(extra_callbacks or [])], tmp).fit(module, train_loader, val_loader)
        history += module.history
        if ckpt.best_model_path:
            state = torch.load(ckpt.best_model_path, map_location="cpu", weights_only=True)["state_dict"]
            model.load_state_dict({k.removeprefix("model."): v for k, v in state.items()})
    main_hist = [h for h in history if h["stage"] == "main" and monitor in h]
    best = max(main_hist, key=lambda h: h[monitor]) if main_hist else None  # first max = ModelCheckpoint's choice

    extra = {
        "classes": list(data.classes), "task": task, "input_dims": data.input_dims, "seq_lens": data.seq_lens,
        "feature_config_hashes": {m: data.feature_meta[m].get("config_hash") for m in data.feature_meta},
        "prior": prior, "provenance": data.provenance, "seed": seed, "selection_metric": metric,
        "best_epoch": None if best is None else int(best["epoch"]), "params_hash": config_hash(params),
        "mlflow_run_id": None if tracking is None else tracking.run_id,
    }
    save_model(out_dir / "models" / "model.pt", model.eval(), extra)
    summary = {
        "seed": seed, "regime": regime, "variant": variant, "standardise_inputs": bool(params.get("standardise_inputs", True)), "dpft_mode": mode if variant != "plain" else "none",
        "selection_metric": metric, "monitor": monitor,
        "best_epoch": extra["best_epoch"], "best_val_mean": None if best is None else float(best[monitor]),
        "best_val": {} if best is None else {c: best.get(f"val/{metric}/{c}") for c in COMBINATIONS},
        "epochs_run": len(history), "parameter_counts": counts,
        "q_history": [[h.get(f"dpft/q/{c}") for c in COMBINATIONS] for h in history if h["stage"] == "main"],
        "sep_history": [[h.get(f"dpft/sep/{c}") for c in COMBINATIONS] for h in history if h["stage"] == "main"],
        "final_q": None if dpft is None else dpft.q.tolist(),
        "sampler_draws": getattr(sampler, "history", []),
        "n_train": len(train), "n_val": len(val), "provenance": data.provenance,
        "mlflow_run_id": extra["mlflow_run_id"],
        "mlflow_tracking_uri": None if tracking is None else tracking.tracking_uri,
    }
    write_json(out_dir / "models" / "train_summary.json", summary)
    write_json(out_dir / "reports" / "train_history.json", history)
    _write_plot_csvs(out_dir / "reports" / "plots", history, metric)
    if tracking is not None:
        if best is not None:
            tracking.log_epoch({f"best/val/{metric}/mean": best[monitor], "best/epoch": best["epoch"]}, step=0)
        tracking.set_tags({"imer.regime": regime, "imer.variant": variant, "imer.trainable_params": counts["main"]["trainable"]})
        tracking.log_artifact(out_dir / "models" / "train_summary.json", "train")
        tracking.log_artifact(out_dir / "reports" / "train_history.json", "train")
    return summary


def _monitor_batch(train: MultimodalData, size: int, seed: int) -> dict:
    """A fixed, seeded subset of TRAINING samples with at least one modality (chosen once per run)."""
    usable = np.flatnonzero(train.view_natural().any(axis=1))
    rng = np.random.default_rng([seed, 7])
    local = np.sort(rng.choice(usable, size=min(size, len(usable)), replace=False))
    return train.batch(local)


def _write_plot_csvs(plots: Path, history: list[dict], metric: str) -> None:
    """DVC plot data: one CSV per figure, one row per epoch."""
    tables = {
        "dpft_q.csv": ("dpft/q/", COMBINATIONS),
        "dpft_sep.csv": ("dpft/sep/", COMBINATIONS),
        "val_score.csv": (f"val/{metric}/", COMBINATIONS + ("mean",)),  # fixed name: a DVC out
    }
    for name, (prefix, cols) in tables.items():
        lines = ["epoch,stage," + ",".join(cols)]
        for h in history:
            vals = [h.get(prefix + c) for c in cols]
            if all(v is None for v in vals):
                continue
            lines.append(f"{h['epoch']},{h['stage']}," + ",".join("" if v is None else f"{v:.6g}" for v in vals))
        with atomic_path(plots / name) as tmp:
            tmp.write_text("\n".join(lines) + "\n")
    lines = ["epoch,stage,loss,l_ort"]
    lines += [f"{h['epoch']},{h['stage']},{h.get('train/loss', float('nan')):.6g},{h.get('train/l_ort', float('nan')):.6g}"
              for h in history]
    with atomic_path(plots / "train_loss.csv") as tmp:
        tmp.write_text("\n".join(lines) + "\n")


def run_stage(params: dict[str, Any]) -> dict:
    """Load train+val only, open the MLflow run, train, close the run."""
    from pipeline.tracking import start_run

    data = MultimodalData.load(params.get("manifest", "data/manifest.parquet"),
                               params.get("features_dir", "data/features"),
                               params.get("splits_dir", "data/splits"), include=("train", "val"))
    mlflow_p = params.get("mlflow", {})
    tracking = start_run(mlflow_p, params, data.provenance) if mlflow_p.get("enabled", True) else None
    try:
        summary = train_model(data, params, params.get("out_dir", "."), tracking)
    except BaseException:
        if tracking is not None:
            tracking.end("FAILED")
        raise
    if tracking is not None:
        tracking.end("FINISHED")
    return {k: summary[k] for k in ("best_epoch", "best_val_mean", "monitor", "epochs_run", "mlflow_run_id")}


def main() -> None:
    from pipeline.params import load_params

    print(run_stage(load_params(SECTION)))


if __name__ == "__main__":
    main()
