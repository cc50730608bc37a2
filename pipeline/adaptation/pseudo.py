"""Stable pseudo-labels from K prediction snapshots (CASP step 3), for classification and regression.

Classification: pbar = mean_k p^(k), label = argmax pbar, u = mean_k 0.5 ||p^(k+1) - p^(k)||_1.
A sample is eligible only if its argmax never flips across snapshots (and max pbar >=
min_confidence); within each pseudo-class the lowest-u `keep_fraction` of the eligible
samples is kept (at least one), so no class swamps the rest. Regression: label = mean,
u = mean_k |yhat^(k+1) - yhat^(k)|, the lowest-u `keep_fraction` is kept. `keep="unstable"`
inverts the order (the released code's direction; ablation only, no eligibility filter).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class PseudoLabels:
    rows: np.ndarray  # (k,) kept pool indices, ascending
    target: np.ndarray  # (k,) hard class ids / scores, or (k, C) soft pbar rows
    label: np.ndarray  # (n,) pseudo-label of every pool sample
    instability: np.ndarray  # (n,) u
    eligible: np.ndarray  # (n,) bool


def _n_keep(count: int, fraction: float) -> int:
    return 0 if count == 0 else max(1, int(round(fraction * count)))


def _lowest(candidates: np.ndarray, u: np.ndarray, k: int, stable: bool) -> np.ndarray:
    """The k candidates with the lowest (stable) or highest (unstable) u; ties broken by index."""
    key = u[candidates] if stable else -u[candidates]
    return candidates[np.argsort(key, kind="stable")[:k]]


def select_classification(probs: np.ndarray, keep_fraction: float, keep: str = "stable",
                          min_confidence: float = 0.0, soft: bool = False) -> PseudoLabels:
    """probs: (K, n, C) class probabilities of K snapshots (K >= 2)."""
    if probs.ndim != 3 or probs.shape[0] < 2:
        raise ValueError(f"need (K >= 2, n, C) snapshot probabilities, got {probs.shape}")
    pbar = probs.mean(axis=0)  # (n, C)
    label = pbar.argmax(axis=1)  # (n,)
    u = 0.5 * np.abs(np.diff(probs, axis=0)).sum(axis=2).mean(axis=0)  # (n,)
    never_flips = (probs.argmax(axis=2) == label[None, :]).all(axis=0)  # (n,)
    eligible = never_flips & (pbar.max(axis=1) >= min_confidence)
    stable = keep == "stable"
    kept = []
    for c in range(probs.shape[2]):
        pool = np.flatnonzero((eligible if stable else np.ones_like(eligible)) & (label == c))
        kept.append(_lowest(pool, u, _n_keep(len(pool), keep_fraction), stable))
    rows = np.sort(np.concatenate(kept)) if kept else np.zeros(0, dtype=np.int64)
    target = pbar[rows] if soft else label[rows]
    return PseudoLabels(rows, target, label, u, eligible)


def select_regression(preds: np.ndarray, keep_fraction: float, keep: str = "stable") -> PseudoLabels:
    """preds: (K, n) scores of K snapshots (K >= 2)."""
    if preds.ndim != 2 or preds.shape[0] < 2:
        raise ValueError(f"need (K >= 2, n) snapshot scores, got {preds.shape}")
    label = preds.mean(axis=0)  # (n,)
    u = np.abs(np.diff(preds, axis=0)).mean(axis=0)  # (n,)
    everyone = np.arange(preds.shape[1])
    rows = np.sort(_lowest(everyone, u, _n_keep(len(everyone), keep_fraction), keep == "stable"))
    return PseudoLabels(rows, label[rows], label, u, np.ones(preds.shape[1], dtype=bool))
