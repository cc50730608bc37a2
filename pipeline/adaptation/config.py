"""The `adapt` params section as typed configs (one home for every default), validated once."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pipeline.core.params import build_config

METHODS = ("none", "input_stats", "tent", "casp_contrastive", "casp")
PROTOCOLS = ("inductive", "transductive")  # adapt on shifted_adapt / on the shifted_test inputs
PARAM_GROUPS = ("layernorm", "shared_adapters")
KEEP = ("stable", "unstable")  # "unstable" = the released code's direction, ablation only
PSEUDO_TARGETS = ("hard", "soft")


@dataclass
class GateConfig:
    """Label-free acceptance gate; every check must pass (see gate.py)."""

    labeled_dev: bool = False  # a labelled shifted dev set would be target-label use: not supported
    max_majority_share: float = 0.8  # classification: majority predicted class on the pool
    min_std_ratio: float = 0.5  # regression: prediction std >= ratio x the source's
    anchor_share: float = 0.2  # share of the pool where the source is most confident
    min_anchor_agreement: float = 0.7  # adapted agrees with the source there (argmax / sign)
    max_source_drop: float = 2.0  # source val 7-combination mean may drop at most this many points


@dataclass
class AdaptConfig:
    method: str = "casp"
    protocol: str = "inductive"
    params: str = "layernorm"  # which parameters adapt; never per-combination adapters
    domain: str | None = None  # null = the single shifted domain of the data
    include_ln_f: bool = False  # layernorm: also each encoder's final ln_f
    anchor: float = 0.0  # weight of ||theta - theta_src||^2 (L2 anchor to the source)
    seed: int = 20261126
    batch_size: int = 24
    lr: float = 1.0e-3
    tau: float = 0.5  # NT-Xent temperature
    contrastive_epochs: int = 15  # also the number of tent epochs
    snapshot_every: int = 3
    pseudo_epochs: int = 5
    keep: str = "stable"
    keep_fraction: float = 0.25
    min_confidence: float = 0.0
    pseudo_target: str = "hard"
    bootstrap: int = 1000  # resamples for the 95% intervals of the deltas
    num_threads: int = 1
    gate: GateConfig = field(default_factory=GateConfig)
    # paths
    model: str = "models/model.pt"
    registry: str = "reports/registry.json"
    train_summary: str = "models/train_summary.json"
    manifest: str = "data/manifest.parquet"
    features_dir: str = "data/features"
    splits_dir: str = "data/splits"
    out_dir: str = "models/adapted"  # accepted model: <out_dir>/<domain>/model.pt
    metrics: str = "reports/adapt_metrics.json"
    reports_dir: str = "reports/adapt"
    log_mlflow: bool = True
    tracking_uri: str | None = None  # null = the training run's URI
    model_name: str | None = None  # null = "<registered source name>-<domain>"

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> "AdaptConfig":
        values = {k: v for k, v in params.items() if not (k == "gate" and v is None)}  # gate: null = defaults
        cfg = build_config(cls, values, "adapt")  # unknown keys (also under gate) raise with their name
        cfg.validate()
        return cfg

    def validate(self) -> None:
        for name, value, allowed in (("method", self.method, METHODS), ("protocol", self.protocol, PROTOCOLS),
                                     ("params", self.params, PARAM_GROUPS), ("keep", self.keep, KEEP),
                                     ("pseudo_target", self.pseudo_target, PSEUDO_TARGETS)):
            if value not in allowed:
                raise ValueError(f"adapt.{name} must be one of {allowed}, got {value!r}")
        if not 0.0 < self.keep_fraction <= 1.0:
            raise ValueError(f"adapt.keep_fraction must lie in (0, 1], got {self.keep_fraction}")
        if self.lr < 0 or self.tau <= 0 or self.batch_size < 2 or self.anchor < 0:
            raise ValueError("adapt: need lr >= 0, tau > 0, batch_size >= 2, anchor >= 0")
        if self.snapshot_every < 1 or self.contrastive_epochs < 0 or self.pseudo_epochs < 0:
            raise ValueError("adapt: need snapshot_every >= 1, contrastive_epochs >= 0, pseudo_epochs >= 0")
        if self.method == "casp" and self.contrastive_epochs < self.snapshot_every:
            raise ValueError("adapt.method casp needs contrastive_epochs >= snapshot_every (at least 2 snapshots)")
        if self.gate.labeled_dev:
            raise ValueError("adapt.gate.labeled_dev: a labelled shifted dev set is not supported "
                             "(it would let target labels decide); keep it false")

    def snapshot_epochs(self) -> list[int]:
        """Epochs after which the pool is predicted: 0, k, 2k, ..., E (E always included)."""
        marks = list(range(0, self.contrastive_epochs + 1, self.snapshot_every))
        return marks if marks[-1] == self.contrastive_epochs else marks + [self.contrastive_epochs]
