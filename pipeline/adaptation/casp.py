"""CASP and its baselines: adapt a copy of the source network on an unlabelled pool.

Steps (method `casp`): (1) contrastive adaptation of a few shared parameters: view 1 is
each sample with its natural modalities, view 2 the same sample with one usable modality
dropped (>= 2 usable), both routed through the model's own missing-modality path in one
mixed-combination forward; NT-Xent on the fused hidden representation; (2) pool snapshots
in eval mode at epochs 0, k, ..., E; (3) stable pseudo-labels (pseudo.py); (4) pseudo-label
training from the state the last snapshot saw. Every step ends at its last epoch: nothing
is selected on labels. Baselines: `none`, `input_stats` (standardisation re-estimated on
the pool), `tent` (softmax entropy, classification only), `casp_contrastive` (step 1 only).
"""
from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from pipeline.adaptation.config import AdaptConfig
from pipeline.adaptation.ntxent import nt_xent
from pipeline.adaptation.pool import drop_one, input_batch, masked_inputs, usable_mask, usable_rows
from pipeline.adaptation.pseudo import PseudoLabels, select_classification, select_regression
from pipeline.core.modalities import MODALITY_ORDER
from pipeline.methods.routing import model_modalities, route
from pipeline.training.data import MultimodalData, feature_statistics

LAYERNORM_NAMES = ("ln1", "ln2")


@dataclass
class AdaptResult:
    model: nn.Module  # the adapted copy, eval mode
    parameter_names: list[str]  # what adapted (parameters, or buffers for input_stats)
    n_parameters: int
    pool_rows: np.ndarray  # (n,) local pool indices used (at least one usable modality)
    history: list[dict] = field(default_factory=list)  # per epoch: phase, epoch, loss
    snapshots: np.ndarray | None = None  # (K, n, n_out) pool predictions (probabilities / scores)
    snapshot_epochs: list[int] = field(default_factory=list)
    pseudo: PseudoLabels | None = None
    drift: float = 0.0  # ||theta_ad - theta_src|| / ||theta_src|| over what adapted


def adaptable_parameters(model: nn.Module, group: str, include_ln_f: bool = False) -> dict[str, nn.Parameter]:
    """The parameters `group` adapts, shared by all 7 combinations (never per-combination adapters)."""
    found: dict[str, nn.Parameter] = {}
    if group == "layernorm":
        wanted = LAYERNORM_NAMES + (("ln_f",) if include_ln_f else ())
        for name, module in model.named_modules():
            if isinstance(module, nn.LayerNorm) and name.rsplit(".", 1)[-1] in wanted:
                found.update({f"{name}.{k}": p for k, p in module.named_parameters(recurse=False)})
    elif group == "shared_adapters":
        found = {n: p for n, p in model.named_parameters() if ".lora_A.shared." in f".{n}" or ".lora_B.shared." in f".{n}"}
    else:
        raise ValueError(f"unknown adapt.params {group!r}")
    if not found:
        raise ValueError(f"adapt.params {group!r}: method {getattr(model.config, 'method', '?')!r} has no such "
                         "parameters (shared_adapters needs an MCULoRA variant with adapters)")
    return found


@contextlib.contextmanager
def fused_capture(model: nn.Module) -> Iterator[dict[str, torch.Tensor]]:
    """Collect the fused hidden representation r (B, D_f) of the next forward: `fused_hidden` if the
    output carries it, else GELU(fusion(...)) captured by a hook on the network's `fusion` layer."""
    store: dict[str, torch.Tensor] = {}
    fusion = getattr(model, "fusion", None)
    if not isinstance(fusion, nn.Module):
        raise ValueError(f"{type(model).__name__}: no `fusion` layer to take the fused representation from")
    handle = fusion.register_forward_hook(lambda _m, _i, out: store.__setitem__("r", F.gelu(out)))
    try:
        yield store
    finally:
        handle.remove()


def predict_pool(model: nn.Module, pool: MultimodalData, rows: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """(n, n_out) eval-mode predictions under natural routing: probabilities or scores."""
    was_training = model.training
    model.eval()
    n_out = model.config.n_outputs
    out = np.zeros((len(rows), n_out))
    for start in range(0, len(rows), batch_size):
        b = input_batch(pool, rows[start:start + batch_size])
        routed = route(model, b["features"], b["lengths_natural"], b["natural"].numpy(), np.ones(3, dtype=bool),
                       [0.0] * n_out)
        out[start:start + len(routed.output)] = routed.output
    model.train(was_training)
    return out


def adapt_model(source: nn.Module, pool: MultimodalData, cfg: AdaptConfig) -> AdaptResult:
    """Adapt a deep copy of `source` on `pool` (its targets are never read); `source` is left untouched."""
    torch.manual_seed(cfg.seed)
    model = copy.deepcopy(source).eval()
    rows = usable_rows(pool, model_modalities(model))
    if len(rows) == 0:
        raise ValueError("the adaptation pool has no sample with a usable modality")
    if cfg.method == "none":
        return AdaptResult(model, [], 0, rows)
    if cfg.method == "input_stats":
        return _input_stats(model, pool, rows)
    if cfg.method == "tent" and model.config.task != "classification":
        raise ValueError("adapt.method tent minimises softmax entropy: classification only")
    params = adaptable_parameters(model, cfg.params, cfg.include_ln_f)
    for name, p in model.named_parameters():
        p.requires_grad_(name in params)
    theta_src = {n: p.detach().clone() for n, p in params.items()}
    opt = torch.optim.Adam(list(params.values()), lr=cfg.lr, weight_decay=0.0)
    rng = np.random.default_rng([cfg.seed, 1])
    result = AdaptResult(model, sorted(params), int(sum(p.numel() for p in params.values())), rows)

    def step(loss: torch.Tensor) -> float:
        if cfg.anchor > 0:
            loss = loss + cfg.anchor * sum(((p - theta_src[n]) ** 2).sum() for n, p in params.items())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return float(loss.detach())

    if cfg.method == "tent":
        for epoch in range(1, cfg.contrastive_epochs + 1):
            model.eval()  # no dropout: entropy of the served prediction
            losses = [step(_entropy(model, pool, idx)) for idx in _batches(rows, cfg.batch_size, rng)]
            result.history.append({"phase": "tent", "epoch": epoch, "loss": float(np.mean(losses))})
    else:
        snaps, marks = [], cfg.snapshot_epochs() if cfg.method == "casp" else []
        if 0 in marks:
            snaps.append(predict_pool(model, pool, rows))
        for epoch in range(1, cfg.contrastive_epochs + 1):
            model.train()  # dropout on: a single-modality sample's two views differ by dropout only
            losses = [step(_contrastive(model, pool, idx, cfg.tau, rng)) for idx in _batches(rows, cfg.batch_size, rng)]
            result.history.append({"phase": "contrastive", "epoch": epoch, "loss": float(np.mean(losses))})
            if epoch in marks:
                snaps.append(predict_pool(model, pool, rows))
        if cfg.method == "casp":
            result.snapshots, result.snapshot_epochs = np.stack(snaps), marks  # (K, n, n_out)
            result.pseudo = _select(result.snapshots, model.config.task, cfg)
            kept = rows[result.pseudo.rows]
            target = torch.as_tensor(result.pseudo.target)
            for epoch in range(1, cfg.pseudo_epochs + 1 if len(kept) else 1):  # nothing kept: no pseudo step
                model.train()
                order = rng.permutation(len(kept))
                losses = [step(_pseudo_loss(model, pool, kept[idx], target[idx], cfg.pseudo_target))
                          for idx in _batches(order, cfg.batch_size, None)]
                result.history.append({"phase": "pseudo", "epoch": epoch, "loss": float(np.mean(losses))})
    for p in model.parameters():
        p.requires_grad_(False)
    result.model = model.eval()
    result.drift = _drift({n: p.detach() for n, p in params.items()}, theta_src)
    return result


def _batches(rows: np.ndarray, size: int, rng: np.random.Generator | None) -> list[np.ndarray]:
    order = rows if rng is None else rng.permutation(rows)  # seeded shuffle every epoch
    return [order[s:s + size] for s in range(0, len(order), size)]


def _contrastive(model: nn.Module, pool: MultimodalData, idx: np.ndarray, tau: float,
                 rng: np.random.Generator) -> torch.Tensor:
    """NT-Xent between natural and modality-dropped views, both in one mixed-combination forward."""
    b = input_batch(pool, idx)
    usable = usable_mask(b, model_modalities(model))  # (B, 3)
    both = np.concatenate([usable, drop_one(usable, rng)])  # (2B, 3)
    doubled = {**b, "features": {m: torch.cat([x, x]) for m, x in b["features"].items()},
               "lengths_natural": {m: torch.cat([x, x]) for m, x in b["lengths_natural"].items()}}
    with fused_capture(model) as store:
        model(*masked_inputs(doubled, both))
    r = store["r"]  # (2B, D_f)
    n = len(idx)
    return nt_xent(r[:n], r[n:], tau)


def _natural_prediction(model: nn.Module, pool: MultimodalData, idx: np.ndarray) -> torch.Tensor:
    b = input_batch(pool, idx)
    return model(*masked_inputs(b, usable_mask(b, model_modalities(model)))).prediction  # (B, n_out)


def _entropy(model: nn.Module, pool: MultimodalData, idx: np.ndarray) -> torch.Tensor:
    logp = torch.log_softmax(_natural_prediction(model, pool, idx), dim=-1)  # (B, C)
    return -(logp.exp() * logp).sum(dim=-1).mean()


def _pseudo_loss(model: nn.Module, pool: MultimodalData, idx: np.ndarray, target: torch.Tensor,
                 kind: str) -> torch.Tensor:
    pred = _natural_prediction(model, pool, idx)
    if model.config.task == "regression":
        return F.l1_loss(pred[:, 0], target.float())
    if kind == "soft":
        return F.cross_entropy(pred, target.float())  # probabilities as targets
    return F.cross_entropy(pred, target.long())


def _select(snapshots: np.ndarray, task: str, cfg: AdaptConfig) -> PseudoLabels:
    if task == "classification":
        return select_classification(snapshots, cfg.keep_fraction, cfg.keep, cfg.min_confidence,
                                     soft=cfg.pseudo_target == "soft")
    return select_regression(snapshots[:, :, 0], cfg.keep_fraction, cfg.keep)


def _input_stats(model: nn.Module, pool: MultimodalData, rows: np.ndarray) -> AdaptResult:
    """Re-estimate each encoder's in_mean / in_scale on the pool (modalities the pool has at all)."""
    stats = feature_statistics(pool.take(rows))
    have = {m: bool(usable_rows(pool.take(rows), (m,)).size) for m in MODALITY_ORDER}
    before = {n: b.detach().clone() for n, b in model.named_buffers() if n.endswith(("in_mean", "in_scale"))}
    model.set_input_statistics({m: s for m, s in stats.items() if have[m]})
    after = {n: b.detach() for n, b in model.named_buffers() if n in before}
    changed = sorted(n for n in before if any(n.startswith(f"encoders.{m}.") for m in MODALITY_ORDER if have[m]))
    return AdaptResult(model.eval(), changed, int(sum(after[n].numel() for n in changed)), rows,
                       drift=_drift(after, before))


def _drift(now: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> float:
    num = sum(float(((now[n] - ref[n]) ** 2).sum()) for n in ref)
    den = sum(float((ref[n] ** 2).sum()) for n in ref)
    return float(np.sqrt(num / den)) if den > 0 else 0.0
