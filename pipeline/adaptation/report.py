"""Scoring for the adapt report: source vs adapted on one labelled view, read once, with bootstrap CIs.

Protocols as `evaluate` defines them: the fixed combinations the model can form (and their
mean), natural missingness, and the stored random-missing masks of the view's split. Every
protocol goes through `route` (the one routing rule). Deltas are adapted - source; the 95%
interval of each delta comes from a paired bootstrap over samples (same resample for both).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch.nn as nn

from pipeline.core.metrics import METRICS, score_outputs
from pipeline.core.modalities import COMBINATIONS, MASKS
from pipeline.formats.split_store import read_random_masks
from pipeline.methods.routing import route
from pipeline.training.data import MultimodalData

Key = tuple[str, str]  # (protocol kind, name): ("fixed", "at"), ("random", "0.3"), ("natural", "natural")


def protocols(view: MultimodalData, formable: tuple[str, ...], splits_dir: str | Path | None,
              split: str | None) -> dict[Key, np.ndarray]:
    """Protocol masks: (3,) for fixed/natural, (n, 3) aligned to the view for stored random masks."""
    out: dict[Key, np.ndarray] = {("fixed", c): MASKS[i] for i, c in enumerate(COMBINATIONS) if c in formable}
    if splits_dir is not None and split is not None:
        ids = view.utterance_id[view._pos()]
        for mr, (mask_ids, mask) in read_random_masks(splits_dir, split).items():
            where = {u: i for i, u in enumerate(mask_ids.tolist())}
            rows = np.array([where.get(u, -1) for u in ids.tolist()], dtype=np.int64)
            if (rows < 0).any():
                raise ValueError(f"{splits_dir}/random_masks.parquet: no {split} mask at MR {mr} for "
                                 f"{ids[rows < 0][0]!r}; re-run the splits stage")
            out[("random", f"{mr:.1f}")] = mask[rows]  # (n, 3)
    out[("natural", "natural")] = np.ones(3, dtype=bool)
    return out


def one_pass(models: dict[str, nn.Module], view: MultimodalData, protos: dict[Key, np.ndarray],
             prior: list[float], batch_size: int = 256) -> tuple[dict[str, dict[Key, np.ndarray]], np.ndarray]:
    """Outputs {model name: {protocol: (n, K)}} and targets (n,): each row of `view` is read once."""
    n = len(view)
    outputs = {name: {key: np.zeros((n, len(prior))) for key in protos} for name in models}
    target = np.zeros(n, dtype=np.asarray(view.target).dtype)
    for start in range(0, n, batch_size):
        local = np.arange(start, min(n, start + batch_size))
        batch = view.batch(local)  # the single read of these rows (and of their labels)
        target[local] = batch["target"].numpy()
        presence = batch["natural"].numpy()
        for name, model in models.items():
            for key, mask in protos.items():
                routed = route(model, batch["features"], batch["lengths_natural"], presence,
                               mask[local] if mask.ndim == 2 else mask, prior)
                outputs[name][key][local] = routed.output
    return outputs, target


def scores_by_protocol(task: str, y: np.ndarray, outs: dict[Key, np.ndarray], n_classes: int,
            idx: np.ndarray | None = None) -> dict[Key, dict[str, float]]:
    sel = slice(None) if idx is None else idx
    scores = {key: score_outputs(task, y[sel], out[sel], n_classes) for key, out in outs.items()}
    fixed = [k for k in outs if k[0] == "fixed"]
    scores[("fixed", "mean")] = {m: float(np.mean([scores[k][m] for k in fixed])) for m in METRICS[task]}
    return scores


def compare(task: str, n_classes: int, target: np.ndarray, source: dict[Key, np.ndarray],
            adapted: dict[Key, np.ndarray], n_boot: int, seed: int) -> dict[str, Any]:
    """Nested {kind: {name: {source, adapted, delta, delta_ci95}}} (natural: one level less)."""
    base, new = scores_by_protocol(task, target, source, n_classes), scores_by_protocol(task, target, adapted, n_classes)
    metrics = METRICS[task]
    deltas = {k: {m: [] for m in metrics} for k in base}
    rng = np.random.default_rng([seed, 95])
    for _ in range(n_boot):
        idx = rng.integers(0, len(target), size=len(target))
        b, a = scores_by_protocol(task, target, source, n_classes, idx), scores_by_protocol(task, target, adapted, n_classes, idx)
        for k in base:
            for m in metrics:
                deltas[k][m].append(a[k][m] - b[k][m])
    out: dict[str, Any] = {}
    for (kind, name), s in base.items():
        entry = {"source": s, "adapted": new[(kind, name)],
                 "delta": {m: new[(kind, name)][m] - s[m] for m in metrics}}
        if n_boot:
            entry["delta_ci95"] = {m: [float(np.nanpercentile(deltas[(kind, name)][m], 2.5)),
                                       float(np.nanpercentile(deltas[(kind, name)][m], 97.5))] for m in metrics}
        if kind == "natural":
            out["natural"] = entry
        else:
            out.setdefault(kind, {})[name] = entry
    out["n"] = int(len(target))
    return out


def plot_rows(section: dict[str, Any], metric: str) -> list[dict[str, Any]]:
    """One CSV row per protocol: source, adapted, delta and its interval for `metric`."""
    rows = []
    entries = [("fixed", k, v) for k, v in section.get("fixed", {}).items()]
    entries += [("random", k, v) for k, v in section.get("random", {}).items()]
    entries += [("natural", "natural", section["natural"])] if "natural" in section else []
    for kind, name, e in entries:
        ci = e.get("delta_ci95", {}).get(metric, [float("nan")] * 2)
        rows.append({"protocol": kind, "name": name, "source": e["source"][metric], "adapted": e["adapted"][metric],
                     "delta": e["delta"][metric], "ci_low": ci[0], "ci_high": ci[1]})
    return rows


def write_csv(path: str | Path, rows: list[dict[str, Any]]) -> None:
    from pipeline.core.atomic import atomic_path

    cols = list(rows[0]) if rows else ["protocol", "name", "source", "adapted", "delta", "ci_low", "ci_high"]
    lines = [",".join(cols)] + [",".join(f"{r[c]:.6g}" if isinstance(r[c], float) else str(r[c]) for c in cols)
                                for r in rows]
    with atomic_path(Path(path)) as tmp:
        tmp.write_text("\n".join(lines) + "\n")


def feature_shift(source_model: nn.Module, pool_stats: dict[str, tuple[np.ndarray, np.ndarray]]) -> dict[str, float]:
    """Label-free shift per modality: mean |pool mean - source mean| in source standard deviations."""
    out = {}
    for m, (mean, _std) in pool_stats.items():
        encoders = getattr(source_model, "encoders", None)
        enc = encoders[m] if isinstance(encoders, nn.ModuleDict) and m in encoders else None
        if enc is None or not hasattr(enc, "in_mean"):
            continue
        diff = (np.asarray(mean) - enc.in_mean.numpy()) * enc.in_scale.numpy()
        out[m] = float(np.mean(np.abs(diff)))
    return out
