"""Thin LightningModule around any registered method: one `model_step`, routed validation, DPFT.

Validation scores every formable combination every epoch: each val batch is read
once and routed under each combination's mask by `pipeline.methods.routing.route`
(the function evaluation and serving call), so samples go to their effective
combination and samples left with no modality get the train prior; the selection
score is therefore the registry's score. At each epoch end DPFT moves the sampler's
combination probabilities q, from separability on a fixed TRAINING monitoring batch
(or validation scores for mode val_accuracy); test data is never seen here.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np
import pytorch_lightning as pl
import torch

from pipeline.core.metrics import METRICS, score_outputs
from pipeline.core.metrics import selection_metric as resolve_selection_metric
from pipeline.core.modalities import COMBINATIONS, MASKS
from pipeline.methods.context import forward_extras
from pipeline.methods.losses import task_loss
from pipeline.methods.routing import route


class MethodModule(pl.LightningModule):
    def __init__(
        self,
        model: torch.nn.Module,
        *,
        lr: float = 1e-3,
        weight_decay: float = 1e-2,
        regression_loss: str = "l1",
        selection_metric: str | None = None,
        sampler: Any = None,
        dpft: Any = None,
        monitor_batch: dict | None = None,
        stage: str = "main",
        epoch_offset: int = 0,
        epoch_sink: Callable[[dict], None] | None = None,
        prior: list[float] | None = None,
        combinations: Sequence[str] = COMBINATIONS,
        components: Sequence[Any] = (),
    ):
        super().__init__()
        self.model = model
        self.task = model.config.task
        self.n_classes = model.config.n_outputs
        self.lr, self.weight_decay = lr, weight_decay
        self.regression_loss = regression_loss
        self.selection_metric = resolve_selection_metric(self.task, selection_metric)
        self.sampler, self.dpft, self.monitor_batch = sampler, dpft, monitor_batch
        self.stage, self.epoch_offset, self.epoch_sink = stage, epoch_offset, epoch_sink
        self.combinations = tuple(c for c in COMBINATIONS if c in set(combinations))  # formable, project order
        # extra training components (e.g. CGGM): optional hooks param_groups / loss_terms / epoch_metrics
        self.components = list(components)
        self.history: list[dict[str, Any]] = []
        # (n_outputs,) prediction for samples with no modality; None = uniform / zero score
        self.prior = (np.full(self.n_classes, 1.0 / self.n_classes) if self.task == "classification" else
                      np.zeros(1)) if prior is None else np.asarray(prior, dtype=np.float64)
        self.metric_names = METRICS[self.task]
        self._val: dict[str, dict[str, list]] = {}
        self._last_val_scores: np.ndarray | None = None
        self._last_val_metrics: dict[str, float] = {}

    # ------------------------------------------------------------------ shared step
    def model_step(self, batch: dict) -> tuple[Any, torch.Tensor, dict[str, tuple[float, torch.Tensor]]]:
        """Forward one batch; returns (output, task loss, the method's weighted auxiliary losses)."""
        extras = forward_extras(self.model, batch["index"], batch.get("dialogue"))  # cached states, dialogues
        out = self.model(batch["features"], batch["lengths"], batch["mask"], batch["combination"], **extras)
        l_task = task_loss(out.prediction, batch["target"], self.task, self.regression_loss)
        aux = self.model.auxiliary_losses(out, batch) if hasattr(self.model, "auxiliary_losses") else {}
        for component in self.components:
            if hasattr(component, "loss_terms"):
                aux.update(component.loss_terms(self, out, batch))
        return out, l_task, aux

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        _, l_task, aux = self.model_step(batch)
        loss = l_task
        for weight, value in aux.values():
            loss = loss + weight * value
        b = int(batch["target"].shape[0])
        self.log("train/loss", loss, on_step=False, on_epoch=True, batch_size=b)
        self.log("train/l_task", l_task, on_step=False, on_epoch=True, batch_size=b)
        for name, (_, value) in aux.items():
            self.log(f"train/{name}", value, on_step=False, on_epoch=True, batch_size=b)
        return loss

    # ------------------------------------------------------------------ validation
    def on_validation_epoch_start(self) -> None:
        self._val = {c: {"out": [], "true": [], "empty": [0]} for c in self.combinations}

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        presence = batch["natural"].cpu().numpy()  # (B, 3)
        target = batch["target"].cpu().numpy()
        for c in self.combinations:
            routed = route(self.model, batch["features"], batch["lengths_natural"], presence,
                           MASKS[COMBINATIONS.index(c)], self.prior, index=batch["index"],
                           dialogue=batch.get("dialogue"))
            self._val[c]["empty"][0] += int((routed.combination < 0).sum())
            self._val[c]["out"].append(routed.output)
            self._val[c]["true"].append(target)

    def on_validation_epoch_end(self) -> None:
        per_comb: dict[str, dict[str, float]] = {}
        self._last_val_metrics = {}
        for c in self.combinations:
            entry = self._val.get(c, {"out": [], "empty": [0]})
            self.log(f"val/empty/{c}", float(entry["empty"][0]))
            if not entry["out"]:
                continue
            per_comb[c] = score_outputs(self.task, np.concatenate(entry["true"]), np.concatenate(entry["out"]),
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
            if c not in self.combinations:
                continue
            if q_used is not None:
                entry[f"dpft/q/{c}"] = float(q_used[i])
                self.log(f"dpft/q/{c}", float(q_used[i]))
            if sep is not None:
                entry[f"dpft/sep/{c}"] = float(sep[i])
                self.log(f"dpft/sep/{c}", float(sep[i]))
        counts = getattr(self.sampler, "last_counts", {}) or {}
        for c, k in counts.items():
            entry[f"train/draws/{c}"] = int(k)
        self._call_components("on_train_epoch_end")  # CGGM: epoch-end monitoring, before its metrics
        for component in self.components:
            if hasattr(component, "epoch_metrics"):
                entry.update(component.epoch_metrics())
        self.history.append(entry)
        if self.epoch_sink is not None:
            self.epoch_sink(entry)

    # ------------------------------------------------------------------ component hooks (CGGM)
    def _call_components(self, hook: str, *args: Any) -> None:
        """Call `hook(self, *args)` on every component that defines it."""
        for component in self.components:
            if hasattr(component, hook):
                getattr(component, hook)(self, *args)

    def on_train_epoch_start(self) -> None:
        self._call_components("on_train_epoch_start")

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        self._call_components("on_before_optimizer_step", optimizer)  # after backward, before the update

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._call_components("on_train_batch_end")  # after the update

    def _separability(self) -> np.ndarray | None:
        """sep_c on the fixed training monitoring batch (eval mode, no grad); None without adapters."""
        if self.monitor_batch is None or not getattr(self.model, "has_separability", False):
            return None
        from pipeline.training.dpft import separability

        was_training = self.model.training
        self.model.eval()
        with torch.no_grad():
            sep = np.asarray(separability(self.model, self.monitor_batch), dtype=float)
        self.model.train(was_training)
        return sep

    def configure_optimizers(self) -> torch.optim.Optimizer:
        for component in self.components:
            if hasattr(component, "param_groups"):  # a component may split the model's parameters itself
                groups = component.param_groups(self)
                return torch.optim.AdamW(groups, lr=self.lr, weight_decay=self.weight_decay)
        params = [p for p in self.model.parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)


MCULoRAModule = MethodModule  # the name benchmarks and older notebooks use
