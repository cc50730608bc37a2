"""The label-free acceptance gate: an adapted model replaces nothing unless every check passes.

1. No collapse: classification, the majority predicted class on the pool <= max_majority_share;
   regression, prediction std >= min_std_ratio x the source's.
2. Anchors: on the `anchor_share` of the pool where the source is most confident (max class
   probability; regression |yhat|) the adapted model agrees with it (argmax; sign) >=
   min_anchor_agreement.
3. Bounded forgetting: the source-validation mean over the fixed combinations drops by at most
   max_source_drop points (metrics in [0, 1], so 2 points = 0.02).
No target label enters any check.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from pipeline.adaptation.config import GateConfig


@dataclass
class GateDecision:
    accepted: bool
    checks: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> value, threshold, passed
    reasons: list[str] = field(default_factory=list)  # one line per failed check

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def acceptance_gate(task: str, source_pool: np.ndarray, adapted_pool: np.ndarray, val_before: float,
                    val_after: float, cfg: GateConfig) -> GateDecision:
    """source_pool / adapted_pool: (n, K) probabilities or (n, 1) scores on the pool (natural routing)."""
    checks: dict[str, dict[str, Any]] = {}
    if task == "classification":
        pred = adapted_pool.argmax(axis=1)
        share = float(np.bincount(pred).max() / len(pred))
        checks["majority_share"] = {"value": share, "threshold": cfg.max_majority_share, "rule": "<=",
                                    "passed": share <= cfg.max_majority_share}
        confidence = source_pool.max(axis=1)
        agree = source_pool.argmax(axis=1) == pred
    else:
        src_std, ad_std = float(np.std(source_pool[:, 0])), float(np.std(adapted_pool[:, 0]))
        ratio = ad_std / src_std if src_std > 0 else float("inf")
        checks["std_ratio"] = {"value": ratio, "threshold": cfg.min_std_ratio, "rule": ">=",
                               "passed": ratio >= cfg.min_std_ratio}
        confidence = np.abs(source_pool[:, 0])
        agree = np.sign(source_pool[:, 0]) == np.sign(adapted_pool[:, 0])
    k = max(1, int(round(cfg.anchor_share * len(confidence))))
    anchors = np.argsort(-confidence, kind="stable")[:k]
    agreement = float(agree[anchors].mean())
    checks["anchor_agreement"] = {"value": agreement, "threshold": cfg.min_anchor_agreement, "rule": ">=",
                                  "n_anchors": int(k), "passed": agreement >= cfg.min_anchor_agreement}
    drop = 100.0 * (val_before - val_after)  # points
    checks["source_val_drop"] = {"value": drop, "threshold": cfg.max_source_drop, "rule": "<=",
                                 "before": val_before, "after": val_after,
                                 "passed": drop <= cfg.max_source_drop + 1e-9}
    reasons = [f"{name} {c['value']:.4g} fails {c['rule']} {c['threshold']}" for name, c in checks.items()
               if not c["passed"]]
    for c in checks.values():
        c["passed"] = bool(c["passed"])
    return GateDecision(not reasons, checks, reasons)
