"""Thin LightningModule around MCULoRANet: one `model_step`, 7-combination validation, DPFT updates.

Validation scores every combination every epoch: each val batch is read once and
run through the model 7 times with masks (combination AND natural presence), each
sample routed to the adapters of that effective combination; samples left with no
modality get the train prior (as in `evaluate` and serving, so the selection score
is the registry's score) and are counted. At each epoch end DPFT moves the
sampler's combination probabilities q, from separability on a fixed TRAINING
monitoring batch (or validation scores for mode val_accuracy); test data is never
seen here.
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np
import pytorch_lightning as pl
import torch

from pipeline.combinations import COMBINATIONS, MASKS
from pipeline.data import select_rows, with_mask
from pipeline.model import MCULoRANet, orthogonality_loss, task_loss

CLASSIFICATION_METRICS = ("wa", "ua", "wf1")
REGRESSION_METRICS = ("acc2", "f1", "acc7", "mae", "corr")


def score_predictions(task: str, y_true: np.ndarray, y_out: np.ndarray, n_classes: int) -> dict[str, float]:
    """Metrics of one combination; classification expects logits (n, C), regression scores (n, 1)."""
    from pipeline import metrics

    if task == "classification":
        return metrics.classification_metrics(y_true, y_out.argmax(axis=1), n_classes)
    return metrics.regression_metrics(y_true, y_out.reshape(-1))


class MCULoRAModule(pl.LightningModule):
    def __init__(
        self,
        model: MCULoRANet,
        *,
        lr: float = 1e-3,
        weight_decay: float = 1e-2,
        lambda_ort: float = 0.1,
        regression_loss: str = "l1",
        selection_metric: str = "wa",
        sampler: Any = None,
        dpft: Any = None,
        monitor_batch: dict | None = None,
        stage: str = "main",
        epoch_offset: int = 0,
        epoch_sink: Callable[[dict], None] | None = None,
        prior: list[float] | None = None,
    ):
        super().__init__()
        self.model = model
        self.task = model.config.task
        self.n_classes = model.config.n_outputs
        self.lr, self.weight_decay = lr, weight_decay
        self.lambda_ort = lambda_ort if model.config.variant == "mculora" else 0.0
        self.regression_loss = regression_loss
        self.selection_metric = selection_metric
        self.sampler, self.dpft, self.monitor_batch = sampler, dpft, monitor_batch
        self.stage, self.epoch_offset, self.epoch_sink = stage, epoch_offset, epoch_sink
        self.history: list[dict[str, Any]] = []
        # (n_outputs,) prediction for samples with no modality; None leaves them out of the score
        self.prior = None if prior is None else np.asarray(prior, dtype=np.float32)
        self.metric_names = CLASSIFICATION_METRICS if self.task == "classification" else REGRESSION_METRICS
        self._val: dict[str, dict[str, list]] = {}
        self._last_val_scores: np.ndarray | None = None
        self._last_val_metrics: dict[str, float] = {}

    # ------------------------------------------------------------------ shared step
    def model_step(self, batch: dict) -> tuple[Any, torch.Tensor, torch.Tensor]:
        """Forward one batch; returns (output, task loss, orthogonality loss)."""
        out = self.model(batch["features"], batch["lengths"], batch["mask"], batch["combination"])
        l_task = task_loss(out.prediction, batch["target"], self.task, self.regression_loss)
        if self.lambda_ort > 0:
            l_ort = orthogonality_loss(out.r_spec, out.r_com, out.modality_mask)
        else:
            l_ort = out.prediction.new_zeros(())
        return out, l_task, l_ort

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        _, l_task, l_ort = self.model_step(batch)
        loss = l_task + self.lambda_ort * l_ort
        b = int(batch["target"].shape[0])
        self.log("train/loss", loss, on_step=False, on_epoch=True, batch_size=b)
        self.log("train/l_task", l_task, on_step=False, on_epoch=True, batch_size=b)
        self.log("train/l_ort", l_ort, on_step=False, on_epoch=True, batch_size=b)
        return loss

    # ------------------------------------------------------------------ validation
    def on_validation_epoch_start(self) -> None:
        self._val = {c: {"out": [], "true": [], "empty": [0]} for c in COMBINATIONS}

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        masks = torch.as_tensor(MASKS, device=batch["natural"].device)  # (7, 3)
        for ci, c in enumerate(COMBINATIONS):
            keep = (batch["natural"] & masks[ci]).any(dim=1)  # (B,) samples with something left
            empty = ~keep
            self._val[c]["empty"][0] += int(empty.sum())
            if self.prior is not None and bool(empty.any()):
                self._val[c]["out"].append(np.tile(self.prior, (int(empty.sum()), 1)))
                self._val[c]["true"].append(batch["target"][empty].cpu().numpy())
            if not bool(keep.any()):
                continue
            # each sample under its effective combination (c AND natural presence), as evaluate routes it
            sub = select_rows(with_mask(batch, masks[ci], None), keep)
            out, _, _ = self.model_step(sub)
            self._val[c]["out"].append(out.prediction.detach().float().cpu().numpy())
            self._val[c]["true"].append(sub["target"].cpu().numpy())

    def on_validation_epoch_end(self) -> None:
        per_comb: dict[str, dict[str, float]] = {}
        self._last_val_metrics = {}
        for c in COMBINATIONS:
            entry = self._val.get(c, {"out": [], "empty": [0]})
            self.log(f"val/empty/{c}", float(entry["empty"][0]))
            if not entry["out"]:
                continue
            per_comb[c] = score_predictions(self.task, np.concatenate(entry["true"]), np.concatenate(entry["out"]),
                                            self.n_classes)
            for name in self.metric_names:
                self._last_val_metrics[f"val/{name}/{c}"] = float(per_comb[c][name])
        for name in self.metric_names:
            vals = [per_comb[c][name] for c in per_comb]
            self._last_val_metrics[f"val/{name}/mean"] = float(np.mean(vals)) if vals else float("nan")
        for key, value in self._last_val_metrics.items():
            self.log(key, value)
        self._last_val_scores = np.array([per_comb[c][self.selection_metric] if c in per_comb else np.nan
                                          for c in COMBINATIONS])

    # ------------------------------------------------------------------ DPFT + history
    def on_train_epoch_end(self) -> None:
        epoch = self.epoch_offset + int(self.current_epoch)
        entry: dict[str, Any] = {"epoch": epoch, "stage": self.stage}
        q_used = getattr(self.sampler, "q", None)
        sep = self._separability()
        if self.dpft is not None and self.sampler is not None and hasattr(self.sampler, "set_q"):
            # A combination absent from the monitoring batch (or from val) has NaN: treat as "no change".
            val = self._last_val_scores if self.dpft.mode == "val_accuracy" else None
            stat_sep = None if sep is None or self.dpft.mode != "separability" else np.nan_to_num(sep, nan=0.0)
            stat_val = None if val is None else np.nan_to_num(val, nan=0.0)
            self.sampler.set_q(self.dpft.update(stat_sep, stat_val))
        for key, value in self.trainer.callback_metrics.items():
            entry[key] = float(value)
        entry.update(self._last_val_metrics)  # full precision (callback_metrics are float32)
        for i, c in enumerate(COMBINATIONS):
            if q_used is not None:
                entry[f"dpft/q/{c}"] = float(q_used[i])
                self.log(f"dpft/q/{c}", float(q_used[i]))
            if sep is not None:
                entry[f"dpft/sep/{c}"] = float(sep[i])
                self.log(f"dpft/sep/{c}", float(sep[i]))
        counts = getattr(self.sampler, "last_counts", {}) or {}
        for c, k in counts.items():
            entry[f"train/draws/{c}"] = int(k)
        self.history.append(entry)
        if self.epoch_sink is not None:
            self.epoch_sink(entry)

    def _separability(self) -> np.ndarray | None:
        """sep_c on the fixed training monitoring batch (eval mode, no grad); None without adapters."""
        if self.monitor_batch is None or self.model.config.variant != "mculora":
            return None
        from pipeline.dpft import separability

        was_training = self.model.training
        self.model.eval()
        with torch.no_grad():
            sep = np.asarray(separability(self.model, self.monitor_batch), dtype=float)
        self.model.train(was_training)
        return sep

    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = [p for p in self.model.parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)
