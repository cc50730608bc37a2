"""DPFT: re-weight the 7 combinations' sampling probabilities q after every epoch.

Separability mode (the method): combinations whose representation spaces moved least since the
last epoch (smallest |sep_T - sep_{T-1}|) are sampled more. The statistic is computed on a fixed
monitoring batch of TRAINING data only, never on validation labels or test data.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.core.modalities import COMBINATIONS, MASKS, MODALITY_ORDER
from pipeline.methods.context import forward_extras

MODES = ("separability", "uniform", "val_accuracy")
DEFAULT_SCHEDULE = (1.0, 0.5, 0.25, 0.0, -0.25, -0.5, -1.0)
K = len(COMBINATIONS)


class DPFTController:
    """Holds q (7,); `update` once per epoch with that epoch's statistic (sep or val scores)."""

    def __init__(self, mode: str = "separability", eta: float = 0.1, q_min: float = 0.05, q_max: float = 0.40,
                 schedule: Sequence[float] = DEFAULT_SCHEDULE, active: Sequence[bool] | None = None):
        if mode not in MODES:
            raise ValueError(f"dpft.mode must be one of {MODES}, got {mode!r}")
        if len(schedule) != K:
            raise ValueError(f"dpft.schedule needs {K} weights, got {len(schedule)}")
        # (7,) combinations the dataset can form; the others keep q = 0 and are never ranked
        self.active = np.ones(K, dtype=bool) if active is None else np.asarray(active, dtype=bool)
        n = int(self.active.sum())
        if n == 0:
            raise ValueError("DPFT needs at least one formable combination")
        if n > 1 and not (0.0 <= q_min <= 1.0 / n <= q_max <= 1.0):
            raise ValueError(f"dpft bounds need 0 <= q_min <= 1/{n} <= q_max <= 1 for {n} formable combinations; "
                             f"got q_min={q_min}, q_max={q_max}")
        self.mode, self.eta, self.q_min, self.q_max = mode, float(eta), float(q_min), float(q_max)
        self.schedule = np.asarray(schedule, dtype=np.float64)
        # the rank schedule over the n formable combinations (the full schedule when all 7 are)
        self._schedule_n = np.interp(np.linspace(0, K - 1, n), np.arange(K), self.schedule)
        self.q = np.where(self.active, 1.0 / n, 0.0)
        self.prev: np.ndarray | None = None  # last epoch's statistic
        self.last_delta: np.ndarray | None = None
        self.last_weights: np.ndarray | None = None
        self.epochs = 0

    def update(self, sep: np.ndarray | None = None, val_scores: np.ndarray | None = None) -> np.ndarray:
        """Feed this epoch's statistic; returns the new q. The first call only records the statistic."""
        self.epochs += 1
        if self.mode == "uniform":
            return self.q.copy()
        name, stat = ("sep", sep) if self.mode == "separability" else ("val_scores", val_scores)
        if stat is None:
            raise ValueError(f"DPFT mode {self.mode!r} needs `{name}` at every update")
        stat = np.asarray(stat, dtype=np.float64)
        if stat.shape != (K,) or not np.all(np.isfinite(stat[self.active])):
            bad = ([COMBINATIONS[i] for i in np.flatnonzero(~np.isfinite(stat) & self.active)]
                   if stat.shape == (K,) else stat.shape)
            raise ValueError(f"DPFT: `{name}` must be {K} values (a, t, v, at, av, tv, atv), finite for every "
                             f"formable combination; bad: {bad}")
        act = self.active
        if self.prev is not None and act.sum() > 1:
            # Least movement (separability) / least improvement (val_accuracy) ranks first -> largest weight.
            delta = np.abs(stat - self.prev) if self.mode == "separability" else stat - self.prev
            w = np.zeros(K)
            w[act] = rank_weights(delta[act], self._schedule_n)
            q = np.zeros(K)
            q[act] = project_to_bounds(self.q[act] * np.exp(self.eta * w[act]), self.q_min, self.q_max)
            self.q = q
            self.last_delta, self.last_weights = delta, w
        self.prev = stat
        return self.q.copy()

    def sample(self, rng: np.random.Generator, size: int | None = None) -> int | np.ndarray:
        """Draw combination indices with probabilities q (seeded generator supplied by the caller)."""
        return rng.choice(K, size=size, p=self.q / self.q.sum())

    def state_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "eta": self.eta, "q_min": self.q_min, "q_max": self.q_max,
                "schedule": self.schedule.tolist(), "active": self.active.tolist(), "q": self.q.tolist(), "epochs": self.epochs,
                "prev": None if self.prev is None else self.prev.tolist()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.__init__(state["mode"], state["eta"], state["q_min"], state["q_max"], state["schedule"],
                      state.get("active"))
        self.q = np.asarray(state["q"], dtype=np.float64)
        self.epochs = int(state["epochs"])
        self.prev = None if state["prev"] is None else np.asarray(state["prev"], dtype=np.float64)


def rank_weights(delta: np.ndarray, schedule: np.ndarray) -> np.ndarray:
    """Weight of each entry by its ascending rank of `delta`; exact ties share their mean weight.

    Sharing on ties keeps the update order-independent: all-equal deltas leave q unchanged.
    """
    order = np.argsort(delta, kind="stable")
    w_sorted = np.asarray(schedule, dtype=np.float64).copy()
    sorted_delta = delta[order]
    start = 0
    for end in range(1, len(delta) + 1):
        if end == len(delta) or sorted_delta[end] != sorted_delta[start]:
            w_sorted[start:end] = w_sorted[start:end].mean()
            start = end
    w = np.empty_like(w_sorted)
    w[order] = w_sorted
    return w


def project_to_bounds(q: np.ndarray, q_min: float, q_max: float) -> np.ndarray:
    """clip(t * q, q_min, q_max) with the scale t > 0 chosen so the result sums to 1.

    A single clip-then-renormalise can push entries back outside [q_min, q_max]; here the
    renormalisation scale is solved jointly with the clip. f(t) = sum clip(t q) is piecewise
    linear and non-decreasing in t, so t is found exactly between its breakpoints.
    """
    q = np.asarray(q, dtype=np.float64)
    if np.any(q <= 0) or not np.all(np.isfinite(q)):
        raise ValueError(f"q must be positive and finite, got {q}")
    f = lambda t: np.clip(t * q, q_min, q_max).sum()  # noqa: E731
    breaks = np.unique(np.concatenate([q_min / q, q_max / q]))  # where an entry enters/leaves a bound
    values = np.array([f(t) for t in breaks])
    k = int(np.searchsorted(values, 1.0))  # first breakpoint with f >= 1
    if k == 0:
        t = breaks[0]
    elif k == len(breaks):
        t = breaks[-1]  # only if K * q_max < 1, excluded by the constructor
    else:
        t0, t1, f0, f1 = breaks[k - 1], breaks[k], values[k - 1], values[k]
        t = t0 + (1.0 - f0) * (t1 - t0) / (f1 - f0)
    return np.clip(t * q, q_min, q_max)


@torch.no_grad()
def separability(model: torch.nn.Module, batch: Mapping[str, Any]) -> np.ndarray:
    """sep_c (7,): mean over m in c of JSD(softmax(R_c^m), softmax(R_com^m)), averaged over samples.

    `batch` = {"features": {m: (B, T, d)}, "lengths": {m: (B,)}, "mask": (B, 3) natural presence},
    a fixed monitoring batch of TRAINING data. Each combination c is evaluated with mask
    natural ∧ c, in eval mode (no dropout). A combination none of whose modalities is present
    in any sample gets NaN (DPFTController.update rejects it with the combination's name).
    """
    cfg = getattr(model, "config", None)
    if cfg is None or cfg.variant != "mculora" or "input" not in cfg.adapt_targets:
        raise ValueError("separability needs variant 'mculora' with 'input' in adapt_targets "
                         "(R_c comes from the input projection's combination branch)")
    was_training = model.training
    model.eval()
    natural = torch.as_tensor(batch["mask"]).bool()  # (B, 3)
    sep = np.full(K, np.nan)
    try:
        for c, name in enumerate(COMBINATIONS):
            mask_c = natural & torch.as_tensor(MASKS[c], device=natural.device)  # (B, 3)
            out = model(batch["features"], batch["lengths"], mask_c, combination=c,
                        **forward_extras(model, dialogue=batch.get("dialogue")))
            per_m = []
            for i, m in enumerate(MODALITY_ORDER):
                present = out.modality_mask[:, i]
                if m in name and bool(present.any()):
                    per_m.append(float(jsd_softmax(out.r_spec[m][present], out.r_com[m][present]).mean()))
            if per_m:
                sep[c] = float(np.mean(per_m))
    finally:
        model.train(was_training)
    return sep


def jsd_softmax(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Jensen-Shannon divergence (nats, in [0, ln 2]) between softmax(x) and softmax(y) over the last axis."""
    lp, lq = F.log_softmax(x.double(), -1), F.log_softmax(y.double(), -1)  # (N, D)
    lm = torch.logaddexp(lp, lq) - math.log(2.0)  # log of the mixture (p + q) / 2
    kl_pm = (lp.exp() * (lp - lm)).sum(-1)
    kl_qm = (lq.exp() * (lq - lm)).sum(-1)
    return (0.5 * (kl_pm + kl_qm)).clamp_min(0.0)  # (N,)
