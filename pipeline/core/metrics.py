"""Evaluation metrics in numpy, and the one home of their vocabulary.

Holds the metric functions (classification: WA, UA, weighted F1; sentiment
regression: Acc-2, F1, Acc-7, MAE, Pearson r), the metric names per task, the
default selection metric per task and which metrics are lower-is-better. Train
(checkpoint selection, early stopping), evaluate and register all read this module.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

TASKS: tuple[str, ...] = ("classification", "regression")
METRICS: dict[str, tuple[str, ...]] = {
    "classification": ("wa", "ua", "wf1"),
    "regression": ("acc2", "f1", "acc7", "mae", "corr"),
}
DEFAULT_SELECTION: dict[str, str] = {"classification": "wa", "regression": "acc2"}
LOWER_IS_BETTER: frozenset[str] = frozenset({"mae"})


def selection_metric(task: str, key: str | None = None) -> str:
    """The selection metric for `task`: `key` if given (validated), else the task's default."""
    if task not in METRICS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    key = key or DEFAULT_SELECTION[task]
    if key not in METRICS[task]:
        raise ValueError(f"selection metric {key!r} is not a {task} metric; choose one of {METRICS[task]}")
    return key


def direction(key: str) -> str:
    """"min" for lower-is-better metrics (MAE), else "max": what Lightning's monitors call `mode`."""
    return "min" if key in LOWER_IS_BETTER else "max"


def best_index(values: Sequence[float], key: str) -> int:
    """Index of the best value under `key`'s direction; the first on ties (as ModelCheckpoint keeps it)."""
    arr = np.asarray(values, dtype=np.float64)
    if arr.size == 0:
        raise ValueError("best_index: no values")
    arr = np.where(np.isnan(arr), np.inf if key in LOWER_IS_BETTER else -np.inf, arr)
    return int(np.argmin(arr) if key in LOWER_IS_BETTER else np.argmax(arr))


def is_better(candidate: float, reference: float, key: str) -> bool:
    """Strictly better under `key`'s direction."""
    return candidate < reference if key in LOWER_IS_BETTER else candidate > reference


def score_outputs(task: str, y_true: np.ndarray, y_out: np.ndarray, n_classes: int) -> dict[str, float]:
    """Metrics from (n, K) probabilities or logits (classification) or (n, 1) scores (regression)."""
    if task == "classification":
        return classification_metrics(y_true, np.asarray(y_out).argmax(axis=1), n_classes)
    return regression_metrics(y_true, np.asarray(y_out).reshape(len(y_true), -1)[:, 0])


def _check(y_true: np.ndarray, y_pred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    if y_true.shape[0] == 0:
        raise ValueError("metrics: empty input")
    if y_true.shape[0] != y_pred.shape[0]:
        raise ValueError(f"metrics: {y_true.shape[0]} targets but {y_pred.shape[0]} predictions")
    return y_true, y_pred


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """(n_classes, n_classes) counts; rows = true class, columns = predicted class."""
    y_true, y_pred = _check(y_true, y_pred)
    t, p = y_true.astype(np.int64).ravel(), y_pred.astype(np.int64).ravel()
    if t.min() < 0 or p.min() < 0 or t.max() >= n_classes or p.max() >= n_classes:
        raise ValueError(f"metrics: class ids must lie in 0..{n_classes - 1}")
    return np.bincount(t * n_classes + p, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def _weighted_f1(cm: np.ndarray) -> float:
    """Support-weighted F1 (sklearn 'weighted'); a class with 2TP+FP+FN = 0 scores 0."""
    tp = np.diag(cm).astype(np.float64)
    support = cm.sum(1).astype(np.float64)  # true counts
    denom = support + cm.sum(0)  # 2TP + FP + FN
    f1 = np.divide(2 * tp, denom, out=np.zeros_like(tp), where=denom > 0)
    return float((f1 * support).sum() / support.sum())


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> dict[str, float]:
    """WA (accuracy), UA (mean recall over classes present in y_true), weighted F1.

    y_pred: class ids (N,) or scores/logits (N, C) (argmax taken).
    """
    y_true, y_pred = _check(y_true, y_pred)
    if y_pred.ndim == 2:
        y_pred = y_pred.argmax(axis=1)
    cm = confusion_matrix(y_true, y_pred, n_classes)
    support = cm.sum(1)
    present = support > 0
    recall = np.diag(cm)[present] / support[present]
    return {"wa": float(np.trace(cm) / cm.sum()), "ua": float(recall.mean()), "wf1": _weighted_f1(cm)}


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson r; 0.0 (silently) when either side is constant."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if np.ptp(x) == 0 or np.ptp(y) == 0:  # exact constant: the mean's rounding would fake a tiny r
        return 0.0
    dx, dy = x - x.mean(), y - y.mean()
    denom = np.sqrt((dx * dx).sum() * (dy * dy).sum())
    if not np.isfinite(denom) or denom == 0.0:
        return 0.0
    return float(np.clip((dx * dy).sum() / denom, -1.0, 1.0))


def regression_metrics(y_true: np.ndarray, y_score: np.ndarray) -> dict[str, float]:
    """Sentiment in [-3, 3]: Acc-2 and weighted F1 on non-zero labels (positive = score > 0),
    Acc-7 (round half-to-even after clipping to [-3, 3]), MAE and Pearson r over all samples.

    Acc-2/F1 are NaN when every label is 0 (nothing to score).
    """
    y_true, y_score = _check(y_true, y_score)
    t, s = y_true.astype(np.float64).ravel(), y_score.astype(np.float64).ravel()
    nz = t != 0
    if nz.any():
        bt, bs = (t[nz] > 0).astype(np.int64), (s[nz] > 0).astype(np.int64)
        acc2, f1 = float((bt == bs).mean()), _weighted_f1(confusion_matrix(bt, bs, 2))
    else:
        acc2 = f1 = float("nan")
    acc7 = float((np.round(np.clip(s, -3, 3)) == np.round(np.clip(t, -3, 3))).mean())
    return {"acc2": acc2, "f1": f1, "acc7": acc7, "mae": float(np.abs(s - t).mean()), "corr": pearson(s, t)}


def selection_score(metrics: Mapping[str, float], task: str, key: str | None = None) -> float:
    """The number model selection maximises: WA (classification) or Acc-2 (regression) by default.

    Pass `key` to choose another metric; lower-is-better metrics are negated so higher is always better.
    """
    key = key or selection_metric(task)
    if key not in metrics:
        raise KeyError(f"selection metric {key!r} not in {sorted(metrics)}")
    value = float(metrics[key])
    return -value if key in LOWER_IS_BETTER else value
