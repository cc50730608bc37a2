"""One line per training epoch on stderr: validation mean, per-combination scores, DPFT ratios, time.

    epoch   3 main  loss 1.0842  val wa 0.612 | a .551 t .604 v .412 at .661 av .583 tv .620 atv .701 | q a .14 t .15 v .13 at .14 av .15 tv .14 atv .15 | 4.2s

stdout stays machine-readable (the CLI prints the stage summary there). The callback reads
only what the LightningModule already logged (`val/<metric>/<combination>`, `train/loss`)
and the sampler's ratios `q` used in the epoch, so it changes nothing in training.
"""
from __future__ import annotations

import sys
import time
from typing import Any, Mapping, Sequence, TextIO

import pytorch_lightning as pl

from pipeline.core.modalities import COMBINATIONS


def _short(value: float) -> str:
    """0.6123 -> '.612', 1.5 -> '1.50', nan -> '-': compact, fixed width for scores in [0, 1]."""
    if value != value:  # NaN
        return "-"
    text = f"{value:.3f}" if abs(value) < 1 else f"{value:.2f}"
    return text.replace("0.", ".", 1) if text.startswith("0.") else text


def epoch_line(epoch: int, stage: str, metric: str, metrics: Mapping[str, float],
               q: Sequence[float] | None, seconds: float, combinations: Sequence[str] = COMBINATIONS) -> str:
    """The progress line of one epoch from logged metrics (`val/<metric>/<c>`, `val/<metric>/mean`, `train/loss`)."""
    parts = [f"epoch {epoch:3d} {stage}"]
    if "train/loss" in metrics:
        parts[0] += f"  loss {float(metrics['train/loss']):.4f}"
    mean = metrics.get(f"val/{metric}/mean")
    if mean is not None:
        parts[0] += f"  val {metric} {float(mean):.3f}"
        scores = [f"{c} {_short(float(metrics[f'val/{metric}/{c}']))}" for c in combinations
                  if f"val/{metric}/{c}" in metrics]
        parts.append(" ".join(scores))
    if q is not None:
        ratios = [f"{c} {float(q[COMBINATIONS.index(c)]):.2f}".replace(" 0.", " .") for c in combinations]
        parts.append("q " + " ".join(ratios))
    parts.append(f"{seconds:.1f}s")
    return " | ".join(parts)


class EpochProgress(pl.Callback):
    """Print `epoch_line` at the end of each training epoch (after its validation) to `stream`."""

    def __init__(self, metric: str, stream: TextIO | None = None) -> None:
        self.metric, self.stream = metric, stream
        self._start = time.monotonic()

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start = time.monotonic()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Runs before the module's own hook, so the sampler still holds the q this epoch drew with.
        metrics: dict[str, Any] = {k: float(v) for k, v in trainer.callback_metrics.items()}
        metrics.update(getattr(pl_module, "_last_val_metrics", {}) or {})  # full precision where available
        sampler = getattr(pl_module, "sampler", None)
        q = getattr(sampler, "q", None) if getattr(pl_module, "dpft", None) is not None else None
        combinations = tuple(getattr(pl_module, "combinations", COMBINATIONS))
        epoch = int(getattr(pl_module, "epoch_offset", 0)) + int(trainer.current_epoch)
        line = epoch_line(epoch, str(getattr(pl_module, "stage", "main")), self.metric, metrics, q,
                          time.monotonic() - self._start, combinations)
        print(line, file=self.stream or sys.stderr, flush=True)
