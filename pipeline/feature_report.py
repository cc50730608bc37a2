"""Stage `feature_report`: how complete and how informative each modality's features are.

A linear probe per modality (and on all three concatenated) is the cheapest honest
measure of informativeness; folds hold out whole sessions, so a probe can never
score by recognising a speaker it trained on.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.model_selection import GroupKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from tqdm import tqdm

from pipeline.core.atomic import write_json
from pipeline.core.modalities import MANIFEST_OF_TABLE
from pipeline.formats.feature_table import FeatureTable, read_feature_table
from pipeline.formats.manifest import read_manifest
from pipeline.core.params import build_config, load_params

SECTION = "feature_report"
TABLES = MANIFEST_OF_TABLE  # table name -> manifest modality


def table_summary(table: FeatureTable) -> dict[str, Any]:
    """Counts, failure reasons and dimensions of one feature table."""
    reasons = Counter(r for r, ok in zip(table.failure_reason, table.present) if not ok)
    t, d = table.meta["sequence_shape"]
    return {
        "clips": len(table),
        "present": int(table.present.sum()),
        "missing": int((~table.present).sum()),
        "failure_reasons": dict(sorted(reasons.items())),
        "sequence_shape": [t, d],
        "summary_dim": int(table.meta["summary_dim"]),
        "config_hash": table.meta.get("config_hash"),
    }


def probe_score(x: np.ndarray, y: np.ndarray, groups: np.ndarray, task: str, folds: int, seed: int) -> dict[str, float]:
    """Mean/std over group-held-out folds of a standardised linear probe."""
    n_groups = len(np.unique(groups))
    if n_groups < 2 or len(y) < 10:
        return {"mean": float("nan"), "std": float("nan"), "folds": 0, "n": int(len(y))}
    scores = []
    for train, test in GroupKFold(n_splits=min(folds, n_groups)).split(x, y, groups):
        if task == "classification":
            model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, C=0.5, random_state=seed))
            model.fit(x[train], y[train])
            scores.append(float((model.predict(x[test]) == y[test]).mean()))
        else:
            model = make_pipeline(StandardScaler(), Ridge(alpha=10.0))
            model.fit(x[train], y[train])
            pred = model.predict(x[test])
            scores.append(float(np.corrcoef(pred, y[test])[0, 1]) if np.std(pred) > 0 else 0.0)
    return {"mean": float(np.mean(scores)), "std": float(np.std(scores)), "folds": len(scores), "n": int(len(y))}


def breakage_check(manifest_rows: dict[str, list], tables: dict[str, FeatureTable]) -> dict[str, Any] | None:
    """Compare injected breakage (generator ground truth) with what extraction marked missing."""
    if "gt_broken_modality" not in manifest_rows:
        return None
    result: dict[str, Any] = {"injected": 0, "detected": 0, "undetected": [], "missing_without_injection": 0}
    present = {TABLES[name]: dict(zip(t.utterance_id, t.present)) for name, t in tables.items()}
    for uid, modality in zip(manifest_rows["utterance_id"], manifest_rows["gt_broken_modality"]):
        if modality:
            result["injected"] += 1
            if modality in present and not present[modality].get(uid, False):
                result["detected"] += 1
            elif modality in present:
                result["undetected"].append(f"{uid}:{modality}")
    broken = {(u, m) for u, m in zip(manifest_rows["utterance_id"], manifest_rows["gt_broken_modality"]) if m}
    for modality, flags in present.items():
        result["missing_without_injection"] += sum(1 for uid, ok in flags.items() if not ok and (uid, modality) not in broken)
    return result


def feature_report(manifest_path: Path, features_dir: Path, folds: int = 5, seed: int = 0) -> dict[str, Any]:
    """Build the report dict; reads only the manifest and the three tables."""
    manifest, meta = read_manifest(manifest_path)
    rows = manifest.to_pydict()
    task = meta["task"]
    tables = {name: read_feature_table(features_dir / f"{name}.arrow") for name in TABLES}
    uids = rows["utterance_id"]
    for name, table in tables.items():
        if list(table.utterance_id) != uids:
            raise ValueError(f"{features_dir / name}.arrow: rows do not match the manifest {manifest_path} (re-run extraction)")
    if task == "classification":
        classes = meta["classes"]
        y = np.array([classes.index(label) for label in rows["label"]])
    else:
        y = np.array(rows["score"], dtype=float)
    groups = np.array(rows["session"])
    report: dict[str, Any] = {"clips": len(uids), "task": task, "modalities": {}, "probe": {}}
    bar = tqdm(total=len(tables) + 1, desc="feature probes", unit="probe", disable=None)  # bar on a terminal
    for name, table in tables.items():
        report["modalities"][name] = table_summary(table)
        keep = table.present
        report["probe"][name] = probe_score(np.asarray(table.summary)[keep], y[keep], groups[keep], task, folds, seed)
        bar.update()
    all_present = np.logical_and.reduce([t.present for t in tables.values()])
    stacked = np.concatenate([np.asarray(t.summary)[all_present] for t in tables.values()], axis=1)
    report["probe"]["all"] = probe_score(stacked, y[all_present], groups[all_present], task, folds, seed)
    bar.update()
    bar.close()
    report["probe"]["metric"] = "accuracy" if task == "classification" else "pearson_r"
    report["probe"]["chance"] = float(np.max(np.bincount(y)) / len(y)) if task == "classification" else 0.0
    check = breakage_check(rows, tables)
    if check is not None:
        report["breakage_detection"] = check
    return report


@dataclass
class FeatureReportConfig:
    manifest: str = "data/manifest.parquet"
    features_dir: str = "data/features"
    out: str = "reports/features.json"
    probe_seed: int = 0
    probe_folds: int = 5  # session-held-out folds (speaker-independent)


def run_stage(params: dict[str, Any]) -> dict[str, Any]:
    cfg: FeatureReportConfig = build_config(FeatureReportConfig, dict(params), SECTION)
    report = feature_report(Path(cfg.manifest), Path(cfg.features_dir), folds=cfg.probe_folds, seed=cfg.probe_seed)
    write_json(cfg.out, report)
    return {name: round(p["mean"], 3) for name, p in report["probe"].items() if isinstance(p, dict)}


def main() -> None:
    print(run_stage(load_params(SECTION)))


if __name__ == "__main__":
    main()
