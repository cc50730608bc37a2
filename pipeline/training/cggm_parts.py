"""CGGM's parts: settings, the unimodal classifier, closed-form logit gradients, the progress
signal, the guarded coefficient and the per-epoch statistics.

Pure Python state (no tensors kept across steps except running sums), so it is cheap,
deterministic and testable without a network. `pipeline/training/cggm.py` holds the
component that uses it (classifiers, loss terms, optimizer hooks).

Notation (spec `cggm.md`): for the batch's key k (a combination name, or "mixed") and
each modality m balanced in it, eps_{k,m} is the unimodal classifier's score on the
batch, Delta_{k,m} its progress, S = sum_m Delta_{k,m}, and B_{k,m} the coefficient.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from pipeline.core.modalities import COMBINATIONS

SIGNALS = ("ema", "epoch_monitor", "batch")
COEFFS = ("guarded", "paper")
DIRECTIONS = ("logit", "weight_grad", "off")
APPLY = ("lr", "grad")


@dataclass(frozen=True)
class CGGMConfig:
    """`train.cggm` of params.yaml (defaults = the spec's; see params.yaml for one comment per key)."""

    enabled: bool = False
    rho: float = 1.3  # global scale of every modulated modality's update: rho * B
    lambda_gm: float = 0.2  # weight of the direction term L_gm
    cls_lr: float = 5.0e-4  # learning rate of the unimodal classifiers (never modulated)
    cls_hidden: int | None = None  # classifier width; None = the network's d_fusion
    signal: str = "ema"  # ema | epoch_monitor | batch (faithful: this batch vs the previous one)
    ema: float = 0.9  # smoothing of the per-combination running score (signal ema)
    coeff: str = "guarded"  # guarded | paper (unguarded (S - Delta) / (S + 1e-8), ablation only)
    b_clip: tuple[float, float] = (0.0, 2.0)  # bounds of a guarded B
    min_sum: float = 1.0e-3  # |S| below this: B = 1 (a "guarded" step)
    b_mean_one: bool = False  # rescale B to mean 1 over the balanced modalities
    direction: str = "logit"  # logit | weight_grad | off
    apply: str = "lr"  # lr (per-modality learning rates) | grad (faithful gradient scaling)
    warmup_epochs: int = 0  # epochs with B = 1 and no L_gm (classifiers and signal still run)

    def __post_init__(self) -> None:
        object.__setattr__(self, "b_clip", tuple(float(x) for x in self.b_clip))
        for name, value, allowed in (("signal", self.signal, SIGNALS), ("coeff", self.coeff, COEFFS),
                                     ("direction", self.direction, DIRECTIONS), ("apply", self.apply, APPLY)):
            if value not in allowed:
                raise ValueError(f"train.cggm.{name} must be one of {allowed}, got {value!r}")
        if len(self.b_clip) != 2 or not 0.0 <= self.b_clip[0] <= self.b_clip[1]:
            raise ValueError(f"train.cggm.b_clip must be [low, high] with 0 <= low <= high, got {list(self.b_clip)}")
        if not 0.0 <= self.ema < 1.0:
            raise ValueError(f"train.cggm.ema must lie in [0, 1), got {self.ema}")
        if self.rho <= 0 or self.cls_lr <= 0 or self.lambda_gm < 0 or self.min_sum < 0 or self.warmup_epochs < 0:
            raise ValueError("train.cggm: rho and cls_lr must be > 0; lambda_gm, min_sum, warmup_epochs >= 0 "
                             f"(got rho={self.rho}, cls_lr={self.cls_lr}, lambda_gm={self.lambda_gm}, "
                             f"min_sum={self.min_sum}, warmup_epochs={self.warmup_epochs})")
        if self.cls_hidden is not None and int(self.cls_hidden) < 1:
            raise ValueError(f"train.cggm.cls_hidden must be null or >= 1, got {self.cls_hidden}")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> "CGGMConfig":
        """From the params section; an unknown key is an error (a typo would silently use a default)."""
        d = dict(d or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"train.cggm: unknown keys {unknown}; known {sorted(known)}")
        return cls(**d)


class UnimodalClassifier(nn.Module):
    """f_m: LayerNorm, Linear(D -> H), GELU, Linear(H -> n_outputs); returns (logits, last hidden)."""

    def __init__(self, d_in: int, hidden: int, n_outputs: int):
        super().__init__()
        self.norm, self.fc, self.out = nn.LayerNorm(d_in), nn.Linear(d_in, hidden), nn.Linear(hidden, n_outputs)

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = F.gelu(self.fc(self.norm(h)))  # (N, H)
        return self.out(z), z  # (N, n_outputs), (N, H)


def modality_parameters(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    """Modality m's parameter group: a method's `modality_parameter_groups()`, else `model.encoders[m]`."""
    hook = getattr(model, "modality_parameter_groups", None)
    if callable(hook):
        return {m: list(ps) for m, ps in hook().items()}
    return {m: list(enc.parameters()) for m, enc in model.encoders.items()}


def logit_gradient(z: torch.Tensor, y: torch.Tensor, task: str) -> torch.Tensor:
    """d(task loss)/d(logits) per row, up to a constant: softmax(z) - onehot(y), or z - y: (B, C)."""
    if task == "classification":
        return torch.softmax(z, dim=-1) - F.one_hot(y.long(), z.shape[-1]).to(z.dtype)
    return z.reshape(-1, 1) - y.reshape(-1, 1).to(z.dtype)  # the L1 sign has no useful derivative


def masked_cosine(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Cosine of two flattened tensors (rows outside the mask already zeroed)."""
    return (a * b).sum() / (torch.linalg.vector_norm(a) * torch.linalg.vector_norm(b)).clamp_min(eps)


def coefficients(deltas: Mapping[str, float], cfg: CGGMConfig) -> tuple[dict[str, float], bool]:
    """B_m for the balanced modalities `deltas` (m -> Delta_m); returns (B, guarded).

    Fewer than two modalities: B = 1 (nothing to balance). `guarded`: B = 1 when |S| < min_sum
    (batch scores move in steps of 1/N, so S is often 0), else clip((S - Delta_m) / S, b_clip):
    the modality that gained most gets the smallest B, never negative, never huge.
    `paper`: (S - Delta_m) / (S + 1e-8), unguarded (ablation only).
    """
    ms = list(deltas)
    if len(ms) < 2:
        return {m: 1.0 for m in ms}, False
    s = float(sum(deltas.values()))
    if cfg.coeff == "paper":
        b = {m: (s - deltas[m]) / (s + 1e-8) for m in ms}
        guarded = False
    elif not math.isfinite(s) or s == 0.0 or abs(s) < cfg.min_sum:
        return {m: 1.0 for m in ms}, True
    else:
        lo, hi = cfg.b_clip
        b = {m: min(max((s - deltas[m]) / s, lo), hi) for m in ms}
        guarded = False
    if cfg.b_mean_one:
        mean = sum(b.values()) / len(b)
        if mean > 0:
            b = {m: v / mean for m, v in b.items()}
    return b, guarded


class ProgressSignal:
    """Delta_{k,m} from the classifiers' scores, for one of the three `signal` modes.

    - ema: E_{k,m} <- ema E + (1 - ema) eps, updated only when k is drawn; Delta = the change of E
      since k's previous visit (first visit: E = eps, Delta = 0).
    - batch: Delta_m = eps_m - eps_m of the previous batch that had m, whatever its combination.
    - epoch_monitor: `step` returns the Deltas held since the last `monitor` call (0 before the
      first two); `monitor(k, scores)` at epoch end compares with the previous epoch's scores.
    """

    def __init__(self, cfg: CGGMConfig):
        self.cfg = cfg
        self.level: dict[str, dict[str, float]] = {}  # k -> m -> E (ema) / last monitor score
        self.last: dict[str, float] = {}  # m -> previous batch's eps (signal batch)
        self.held: dict[str, dict[str, float]] = {}  # k -> m -> Delta held for the epoch (epoch_monitor)

    def step(self, key: str, scores: Mapping[str, float]) -> dict[str, float]:
        """This step's Delta_m for each m in `scores` (m -> eps_m of this batch)."""
        if self.cfg.signal == "epoch_monitor":
            held = self.held.get(key, {})
            return {m: held.get(m, 0.0) for m in scores}
        if self.cfg.signal == "batch":
            deltas = {m: eps - self.last[m] if m in self.last else 0.0 for m, eps in scores.items()}
            self.last.update(scores)
            return deltas
        level, a = self.level.setdefault(key, {}), self.cfg.ema
        deltas = {}
        for m, eps in scores.items():
            old = level.get(m, eps)
            level[m] = a * old + (1.0 - a) * eps
            deltas[m] = level[m] - old
        return deltas

    def monitor(self, key: str, scores: Mapping[str, float]) -> None:
        """Epoch-end scores of combination `key` on the fixed monitoring batch (signal epoch_monitor)."""
        prev = self.level.setdefault(key, {})
        self.held[key] = {m: eps - prev[m] if m in prev else 0.0 for m, eps in scores.items()}
        prev.update(scores)

    def value(self, key: str, m: str) -> float:
        """The progress level logged per epoch: E (ema), last monitor score, or last batch score."""
        if self.cfg.signal == "batch":
            return self.last.get(m, float("nan"))
        return self.level.get(key, {}).get(m, float("nan"))


class EpochStats:
    """Running sums per key (combination or "mixed") for one epoch; `flush` -> `cggm/<name>/<key>` floats.

    Loss, cosine and gradient-norm sums stay on the device as tensors (no host sync per step).
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.steps: dict[str, int] = {}
        self.modulated: dict[str, int] = {}
        self.guarded: dict[str, int] = {}
        self.b: dict[tuple[str, str], list[float]] = {}
        self.sums: dict[tuple[str, str], torch.Tensor] = {}  # (key, name) -> running sum
        self.counts: dict[tuple[str, str], int] = {}
        self.progress: dict[str, dict[str, float]] = {}  # key -> m -> last progress level

    def record_step(self, key: str, b: Mapping[str, float], modulated: bool, guarded: bool,
                    progress: Mapping[str, float]) -> None:
        """One step of `key`: its coefficients, flags and the progress level each m had after it."""
        self.progress.setdefault(key, {}).update(progress)
        self.steps[key] = self.steps.get(key, 0) + 1
        self.modulated[key] = self.modulated.get(key, 0) + int(modulated)
        self.guarded[key] = self.guarded.get(key, 0) + int(guarded)
        for m, v in b.items():
            self.b.setdefault((key, m), []).append(float(v))

    def add(self, key: str, name: str, value: torch.Tensor | float) -> None:
        value = value.detach().float() if isinstance(value, torch.Tensor) else torch.tensor(float(value))
        k = (key, name)
        self.sums[k] = self.sums[k] + value if k in self.sums else value.clone()
        self.counts[k] = self.counts.get(k, 0) + 1

    def flush(self) -> dict[str, float]:
        """Means over the epoch's steps, then reset. Shares are over the key's steps."""
        out: dict[str, float] = {}
        total = sum(self.steps.values())
        for key, n in self.steps.items():
            out[f"cggm/steps/{key}"] = float(n)
            out[f"cggm/modulated/{key}"] = self.modulated[key] / n
            out[f"cggm/guarded/{key}"] = self.guarded[key] / n
        if total:
            out["cggm/modulated/all"] = sum(self.modulated.values()) / total
            out["cggm/guarded/all"] = sum(self.guarded.values()) / total
        for (key, m), vals in self.b.items():
            out[f"cggm/b_mean_{m}/{key}"] = sum(vals) / len(vals)
            out[f"cggm/b_min_{m}/{key}"] = min(vals)
            out[f"cggm/b_max_{m}/{key}"] = max(vals)
            out[f"cggm/progress_{m}/{key}"] = float(self.progress.get(key, {}).get(m, float("nan")))
        if self.sums:
            keys = list(self.sums)
            means = (torch.stack([self.sums[k].to("cpu") for k in keys]) /
                     torch.tensor([float(self.counts[k]) for k in keys])).tolist()
            out.update({f"cggm/{name}/{key}": float(v) for (key, name), v in zip(keys, means)})
        self.reset()
        return out


def row_score(logits: torch.Tensor, y: torch.Tensor, task: str) -> torch.Tensor:
    """eps per row (B,): accuracy (classification) or -|error| (regression, finer than sign accuracy)."""
    if task == "classification":
        return (logits.argmax(-1) == y.long()).to(logits.dtype)
    return -(logits.reshape(-1) - y.to(logits.dtype)).abs()


def coefficient_csv(history: list[Mapping[str, Any]]) -> str:
    """DVC plot data `reports/plots/cggm_coeff.csv`: per epoch, mean B_{c,m} for every multi-modality
    combination (and "mixed") that has a value in some epoch; columns named `<c>_<m>`."""
    keys = [(c, m) for c in (*COMBINATIONS, "mixed") for m in "atv" if len(c) > 1 and (c == "mixed" or m in c)]
    keys = [k for k in keys if any(f"cggm/b_mean_{k[1]}/{k[0]}" in h for h in history)]
    lines = [",".join(["epoch", "stage", *(f"{c}_{m}" for c, m in keys)])]
    for h in history:
        vals = [h.get(f"cggm/b_mean_{m}/{c}") for c, m in keys]
        if all(v is None for v in vals):
            continue
        lines.append(f"{h['epoch']},{h['stage']}," + ",".join("" if v is None else f"{v:.6g}" for v in vals))
    return "\n".join(lines) + "\n"
