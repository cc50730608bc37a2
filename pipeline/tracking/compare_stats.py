"""Statistics of a method comparison: mean ± std over seeds, and paired tests over seeds x utterances.

Two methods evaluated on the same test utterances with the same seeds give paired scores
`a[s, i]` and `b[s, i]` (seed s, utterance i; e.g. 1 if utterance i was classified correctly).
For accuracy (WA) the per-utterance score is correctness, so `a.mean()` is the mean WA.

- `paired_permutation`: sign-flip test of H0 "a and b are exchangeable within each pair";
  exact (all 2^n flips) when the number of unequal pairs is small, Monte Carlo otherwise.
- `paired_bootstrap`: a two-level bootstrap (resample seeds, then utterances, the same draw
  for both methods) of the mean difference; its 95 % interval and a two-sided p-value.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from itertools import product
from typing import Any, Sequence

import numpy as np

EXACT_LIMIT = 16  # unequal pairs up to which the permutation test enumerates every flip


@dataclass(frozen=True)
class PairedResult:
    """Mean difference a - b, its bootstrap interval (or None) and the p-value of the test used."""

    delta: float
    p_value: float
    ci_low: float | None = None
    ci_high: float | None = None
    n_pairs: int = 0
    method: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def mean_std(values: Sequence[float]) -> dict[str, float]:
    """Mean and sample standard deviation (ddof=1; 0 for a single value) over seeds."""
    x = np.asarray(values, dtype=float)
    if x.size == 0:
        return {"mean": float("nan"), "std": float("nan"), "n": 0}
    std = float(x.std(ddof=1)) if x.size > 1 else 0.0
    return {"mean": float(x.mean()), "std": std, "n": int(x.size)}


def _pairs(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.atleast_2d(np.asarray(a, dtype=float)), np.atleast_2d(np.asarray(b, dtype=float))
    if a.shape != b.shape:
        raise ValueError(f"paired scores need equal shapes (seeds, utterances), got {a.shape} and {b.shape}")
    if a.size == 0:
        raise ValueError("paired scores are empty")
    return a, b


def paired_permutation(a: np.ndarray, b: np.ndarray, n_perm: int = 10000, seed: int = 0) -> PairedResult:
    """Two-sided sign-flip test on d = a - b over all (seed, utterance) pairs.

    p = share of flips whose |mean d| is >= the observed |mean d| (the observed pattern counted).
    """
    a, b = _pairs(a, b)
    d = (a - b).ravel()  # (S * N,)
    observed = abs(d.mean())
    nonzero = d[d != 0]  # zero differences flip to themselves
    tol = 1e-12
    if nonzero.size == 0:
        return PairedResult(0.0, 1.0, n_pairs=int(d.size), method="permutation-exact")
    if nonzero.size <= EXACT_LIMIT:
        signs = np.array(list(product((1.0, -1.0), repeat=nonzero.size)))  # (2^m, m)
        stats = np.abs(signs @ nonzero) / d.size
        p = float(np.mean(stats >= observed - tol))
        return PairedResult(float(d.mean()), p, n_pairs=int(d.size), method="permutation-exact")
    rng = np.random.default_rng(seed)
    signs = rng.choice((-1.0, 1.0), size=(n_perm, nonzero.size))  # (P, m)
    stats = np.abs(signs @ nonzero) / d.size
    p = float((1 + np.sum(stats >= observed - tol)) / (n_perm + 1))
    return PairedResult(float(d.mean()), p, n_pairs=int(d.size), method="permutation-mc")


def paired_bootstrap(a: np.ndarray, b: np.ndarray, n_boot: int = 2000, seed: int = 0,
                     level: float = 0.95) -> PairedResult:
    """Mean difference a - b with a percentile interval from resampling seeds and utterances.

    Each replicate draws seeds with replacement and, independently, utterances with replacement,
    and uses the same draw for both methods (the pairing). p is two-sided: twice the smaller share
    of replicates on either side of zero, capped at 1.
    """
    a, b = _pairs(a, b)
    d = a - b  # (S, N)
    s, n = d.shape
    rng = np.random.default_rng(seed)
    seeds = rng.integers(0, s, size=(n_boot, s))  # (B, S)
    utts = rng.integers(0, n, size=(n_boot, n))  # (B, N)
    reps = np.array([d[np.ix_(seeds[k], utts[k])].mean() for k in range(n_boot)])  # (B,)
    alpha = (1 - level) / 2
    low, high = np.quantile(reps, [alpha, 1 - alpha])
    p = min(1.0, 2 * min(np.mean(reps <= 0), np.mean(reps >= 0)))
    return PairedResult(float(d.mean()), float(p), float(low), float(high), int(d.size), "bootstrap")


def compare_pair(a: np.ndarray, b: np.ndarray, n_boot: int = 2000, n_perm: int = 10000,
                 seed: int = 0) -> dict[str, Any]:
    """Both tests for one pair: delta, bootstrap interval and p, permutation p."""
    boot = paired_bootstrap(a, b, n_boot=n_boot, seed=seed)
    perm = paired_permutation(a, b, n_perm=n_perm, seed=seed)
    return {"delta": boot.delta, "ci_low": boot.ci_low, "ci_high": boot.ci_high,
            "p_bootstrap": boot.p_value, "p_permutation": perm.p_value, "n_pairs": boot.n_pairs}


def rank(scores: dict[str, float], higher_is_better: bool = True) -> list[str]:
    """Names ordered best first; NaN scores (failed or absent) go last."""
    def key(name: str) -> tuple[bool, float]:
        v = scores[name]
        bad = v is None or not np.isfinite(v)
        return (bad, 0.0 if bad else (-v if higher_is_better else v))

    return sorted(scores, key=key)
