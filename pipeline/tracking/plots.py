"""Evaluation plots: CSV data for `dvc plots` and PNGs (matplotlib, Agg) for MLflow artifacts."""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: stages run in DVC/Prefect workers without a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from pipeline.core.atomic import atomic_path  # noqa: E402
from pipeline.core.metrics import DEFAULT_SELECTION, METRICS  # noqa: E402
from pipeline.core.modalities import COMBINATIONS  # noqa: E402


def task_of(metrics: dict[str, Any]) -> str:
    """The task whose metric names the fixed-protocol entries carry (classification: wa..., regression: acc2...)."""
    for split in ("test", "val"):
        for values in metrics.get(split, {}).get("fixed", {}).values():
            for task, names in METRICS.items():
                if any(name in values for name in names):
                    return task
    raise ValueError("metrics hold no fixed-protocol scores: cannot tell classification from regression")


def primary_metric(metrics: dict[str, Any]) -> str:
    """The task's selection metric (core.metrics.DEFAULT_SELECTION): what the plots show."""
    return DEFAULT_SELECTION[task_of(metrics)]


def per_combination_rows(metrics: dict[str, Any], metric: str | None = None) -> list[dict[str, Any]]:
    """One row per (split, combination) of the fixed protocol: `combination, split, metric, score`.

    The columns are the same for every task (the metric's name is a value, not a column),
    so one DVC plot spec serves classification and regression corpora.
    """
    metric = metric or primary_metric(metrics)
    rows = []
    for split in ("val", "test"):
        fixed = metrics.get(split, {}).get("fixed", {})
        for comb in (*COMBINATIONS, "mean"):
            score = _numbers(fixed.get(comb, {})).get(metric)
            if score is not None:
                rows.append({"combination": comb, "split": split, "metric": metric, "score": score})
    return rows


def mr_curve_rows(metrics: dict[str, Any], metric: str | None = None) -> list[dict[str, Any]]:
    """One row per missing rate of the random-missing protocol (test split): `mr, metric, score`."""
    metric = metric or primary_metric(metrics)
    random = metrics.get("test", {}).get("random", {})
    rows = [{"mr": float(mr), "metric": metric, "score": _numbers(random[mr]).get(metric)}
            for mr in sorted(random, key=float)]
    return [r for r in rows if r["score"] is not None]


def confusion_rows(actual: list[str], predicted: list[str]) -> list[dict[str, str]]:
    return [{"actual": a, "predicted": p} for a, p in zip(actual, predicted)]


def write_csv(path: str | Path, rows: list[dict[str, Any]]) -> None:
    """Atomic CSV with the union of the rows' keys as header (first-seen order)."""
    header: list[str] = []
    for row in rows:
        header += [k for k in row if k not in header]
    with atomic_path(path) as tmp, tmp.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=header)
        writer.writeheader()
        writer.writerows(rows)


def plot_per_combination(rows: list[dict[str, Any]], metric: str, path: str | Path) -> None:
    """Grouped bars: validation and test side by side per combination (rows of `per_combination_rows`)."""
    rows = [r for r in rows if r.get("metric", metric) == metric]
    combs = [c for c in (*COMBINATIONS, "mean") if any(r["combination"] == c for r in rows)]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    width = 0.4
    for k, split in enumerate(("val", "test")):
        values = {r["combination"]: r.get("score", np.nan) for r in rows if r["split"] == split}
        ax.bar(np.arange(len(combs)) + (k - 0.5) * width, [values.get(c, np.nan) for c in combs], width, label=split)
    ax.set_xticks(np.arange(len(combs)), combs)
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} per modality combination (fixed protocol)")
    ax.legend()
    _save(fig, path)


def plot_mr_curve(rows: list[dict[str, Any]], metric: str, path: str | Path) -> None:
    """Test score against the random missing rate (rows of `mr_curve_rows`)."""
    rows = [r for r in rows if r.get("metric", metric) == metric]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot([r["mr"] for r in rows], [r.get("score", np.nan) for r in rows], marker="o")
    ax.set_xlabel("missing rate")
    ax.set_ylabel(metric)
    ax.set_title(f"test {metric} under random missingness")
    ax.grid(alpha=0.3)
    _save(fig, path)


def plot_confusion(actual: list[str], predicted: list[str], labels: list[str], title: str, path: str | Path) -> None:
    index = {c: i for i, c in enumerate(labels)}
    counts = np.zeros((len(labels), len(labels)), dtype=int)  # (actual, predicted)
    for a, p in zip(actual, predicted):
        counts[index[a], index[p]] += 1
    fig, ax = plt.subplots(figsize=(4.5, 4))
    ax.imshow(counts, cmap="Blues")
    for i in range(len(labels)):
        for j in range(len(labels)):
            dark = counts[i, j] > counts.max() / 2
            ax.text(j, i, str(counts[i, j]), ha="center", va="center", fontsize=8, color="white" if dark else "black")
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("actual")
    ax.set_title(title)
    _save(fig, path)


def _numbers(metrics: dict[str, Any]) -> dict[str, float | int]:
    """Numeric entries only; counts (n, n_empty) stay integers in the CSV."""
    return {k: (int(v) if isinstance(v, (int, np.integer)) else float(v))
            for k, v in metrics.items() if isinstance(v, (int, float, np.number)) and not isinstance(v, bool)}


def _save(fig: plt.Figure, path: str | Path) -> None:
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
