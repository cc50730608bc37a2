"""The adapt stage's one pure function: load, adapt, gate, report, save/register; see casp.py.

Safety rails: the source checkpoint's sha256 is taken before and after (it must not change);
only an accepted model is saved (`<out_dir>/<domain>/model.pt`) and registered, under
`<source name>-<domain>` with its parent version; the source's aliases are never touched.
Target labels: the pool is unlabelled (sentinel targets); `shifted_test` labels are read
once, for the report; nothing is selected on them.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.adaptation.casp import AdaptResult, adapt_model, predict_pool
from pipeline.adaptation.config import AdaptConfig
from pipeline.adaptation.gate import acceptance_gate
from pipeline.adaptation.pool import unlabelled
from pipeline.adaptation.report import scores_by_protocol, compare, feature_shift, one_pass, plot_rows, protocols, write_csv
from pipeline.core.atomic import atomic_path, write_json
from pipeline.core.hashing import file_digest
from pipeline.core.metrics import DEFAULT_SELECTION
from pipeline.core.modalities import formable_combinations
from pipeline.formats.manifest import read_manifest
from pipeline.formats.split_store import read_assignment
from pipeline.methods.checkpoint import load_model, save_model
from pipeline.methods.routing import model_modalities, serving_info
from pipeline.formats.split_store import SHIFTED_SPLITS, SOURCE_DOMAIN, row_domains
from pipeline.training.data import MultimodalData, feature_statistics


def run_adaptation(cfg: AdaptConfig) -> dict[str, Any]:
    """Run the stage; returns the content of reports/adapt_metrics.json."""
    start = time.perf_counter()
    manifest, _ = read_manifest(cfg.manifest)
    _, split_all = read_assignment(cfg.splits_dir)
    if not np.isin(split_all, SHIFTED_SPLITS).any():
        return _skip(cfg, "no shifted-domain rows in the split assignment (corpus.shifted_domain: false)")
    ids = np.asarray(manifest.column("utterance_id").to_pylist(), dtype=object)
    domain_of = dict(zip(ids.tolist(), row_domains(manifest).tolist()))
    domain = _pick_domain(cfg.domain, {d for d in domain_of.values() if d != SOURCE_DOMAIN})
    src_sha = file_digest(cfg.model)
    source, extra = load_model(cfg.model)
    if getattr(source.config, "context", "utterance") == "dialogue":
        raise ValueError(f"{cfg.model}: adapt supports utterance-context models only (this one was trained with "
                         "train.context: dialogue); adapt an utterance model or skip the stage")
    data = MultimodalData.load(cfg.manifest, cfg.features_dir, cfg.splits_dir,
                               include=("val", *SHIFTED_SPLITS))
    _check_compatible(source, extra, data, cfg.model)
    in_domain = np.array([domain_of[u] == domain for u in data.utterance_id.tolist()])
    test = _domain_view(data, "shifted_test", in_domain)
    pool = unlabelled(_domain_view(data, "shifted_adapt" if cfg.protocol == "inductive" else "shifted_test",
                                   in_domain))
    if len(pool) == 0 or len(test) == 0:
        raise ValueError(f"domain {domain!r}: empty pool ({len(pool)}) or shifted_test ({len(test)})")
    adapt_start = time.perf_counter()
    result = adapt_model(source, pool, cfg)
    adapt_time = time.perf_counter() - adapt_start

    task, primary = data.task, DEFAULT_SELECTION[data.task]
    prior = [float(x) for x in extra.get("prior") or _uniform(source)]
    formable = formable_combinations(model_modalities(source))
    models = {"source": source, "adapted": result.model}
    val = data.subset("val")
    val_out, val_y = one_pass(models, val, protocols(val, formable, None, None), prior)
    val_scores = {k: scores_by_protocol(task, val_y, o, len(data.classes)) for k, o in val_out.items()}
    before, after = (val_scores[k][("fixed", "mean")][primary] for k in ("source", "adapted"))
    source_pool = predict_pool(source, pool, result.pool_rows)
    adapted_pool = predict_pool(result.model, pool, result.pool_rows)
    gate = acceptance_gate(task, source_pool, adapted_pool, before, after, cfg.gate)
    test_out, test_y = one_pass(models, test, protocols(test, formable, cfg.splits_dir, "shifted_test"), prior)
    shifted = compare(task, len(data.classes), test_y, test_out["source"], test_out["adapted"], cfg.bootstrap, cfg.seed)

    if file_digest(cfg.model) != src_sha:
        raise RuntimeError(f"{cfg.model}: the source checkpoint changed during adaptation")
    status = "not_adapted" if cfg.method == "none" else ("accepted" if gate.accepted else "rejected")
    report: dict[str, Any] = {
        "status": status, "domain": domain, "method": cfg.method, "protocol": cfg.protocol, "params": cfg.params,
        "selection": "none: every step ends at its last epoch; no target label is read before the report",
        "shifted_test": shifted,
        "source_val": {"metric": primary, "before": _flat(val_scores["source"]), "after": _flat(val_scores["adapted"]),
                       "drop_points": 100.0 * (before - after)},
        "gate": gate.to_dict(), "adapted_parameters": result.n_parameters, "drift": result.drift,
        "n_pool": int(len(result.pool_rows)), "n_pool_unusable": int(len(pool) - len(result.pool_rows)),
        "pseudo": _pseudo_summary(result, data.classes),
        "feature_shift": feature_shift(source, feature_statistics(pool.take(result.pool_rows))),
        "source_checkpoint": {"path": str(cfg.model), "sha256": src_sha, "unchanged": True},
        "adapted_model": None, "registered": None, "mlflow_run_id": None,
    }
    model_path = Path(cfg.out_dir) / domain / "model.pt"
    if status == "accepted":
        save_model(model_path, result.model, {**extra, "adapt": {"method": cfg.method, "domain": domain,
                                                                  "parent_sha256": src_sha,
                                                                  "parameters": result.parameter_names}})
        report["adapted_model"] = str(model_path)
    artifacts = _write_details(cfg, result, pool, shifted, primary)
    report["wall_time_s"] = time.perf_counter() - start
    report["adapt_time_s"] = adapt_time
    if cfg.log_mlflow:
        report.update(_track(cfg, report, artifacts, model_path if status == "accepted" else None,
                             serving_info(task, data.classes, prior), pool, result, domain))
    write_json(Path(cfg.out_dir) / "decision.json", {k: report[k] for k in ("status", "domain", "method", "gate",
                                                                           "adapted_model", "registered")})
    write_json(cfg.metrics, report)
    return report


def _pick_domain(wanted: str | None, found: set[str]) -> str:
    if wanted is not None:
        if wanted not in found:
            raise ValueError(f"adapt.domain {wanted!r} not among the shifted domains {sorted(found)}")
        return wanted
    if len(found) != 1:
        raise ValueError(f"several shifted domains {sorted(found)}: set adapt.domain")
    return next(iter(found))


def _check_compatible(model: Any, extra: dict, data: MultimodalData, path: str) -> None:
    """The shift must be in the data: same task, classes, feature dims and extractor configs."""
    cfg = model.config
    problems = []
    if cfg.task != data.task:
        problems.append(f"task {cfg.task} vs {data.task}")
    if extra.get("classes") is not None and list(extra["classes"]) != list(data.classes):
        problems.append(f"classes {extra['classes']} vs {data.classes}")
    if dict(cfg.input_dims) != data.input_dims:
        problems.append(f"feature dims {cfg.input_dims} vs {data.input_dims}")
    hashes = extra.get("feature_config_hashes") or {}
    for m, h in hashes.items():
        now = data.feature_meta.get(m, {}).get("config_hash")
        if h is not None and now is not None and h != now:
            problems.append(f"{m} feature config {h} vs {now}")
    if problems:
        raise ValueError(f"{path} does not fit these features: {'; '.join(problems)}")


def _domain_view(data: MultimodalData, split: str, in_domain: np.ndarray) -> MultimodalData:
    view = data.subset(split)
    return view.take(np.flatnonzero(in_domain[view._pos()]))


def _uniform(model: Any) -> list[float]:
    k = model.config.n_outputs
    return [1.0 / k] * k if model.config.task == "classification" else [0.0]


def _flat(scores: dict) -> dict[str, dict[str, float]]:
    return {("natural" if kind == "natural" else name): s for (kind, name), s in scores.items()}


def _pseudo_summary(result: AdaptResult, classes: list[str]) -> dict[str, Any] | None:
    p = result.pseudo
    if p is None:
        return None
    out = {"kept": int(len(p.rows)), "eligible": int(p.eligible.sum()), "snapshot_epochs": result.snapshot_epochs}
    if classes:
        hard = p.label[p.rows]
        out["kept_per_class"] = {c: int((hard == i).sum()) for i, c in enumerate(classes)}
        out["pool_per_class"] = {c: int((p.label == i).sum()) for i, c in enumerate(classes)}
    return out


def _write_details(cfg: AdaptConfig, result: AdaptResult, pool: MultimodalData, shifted: dict,
                   primary: str) -> list[Path]:
    """reports/adapt/: per_combination.csv, history.json, and (casp) snapshots + pseudo-label tables."""
    out = Path(cfg.reports_dir)
    paths = [out / "per_combination.csv", out / "history.json"]
    write_csv(paths[0], plot_rows(shifted, primary))
    write_json(paths[1], result.history)
    ids = pool.utterance_id[pool._pos()][result.pool_rows]
    if result.snapshots is not None:
        k = len(result.snapshot_epochs)
        table = pa.table({"utterance_id": np.tile(ids, k).tolist(),
                          "epoch": np.repeat(result.snapshot_epochs, len(ids)).astype(np.int32),
                          "prediction": [row.tolist() for row in result.snapshots.reshape(-1, result.snapshots.shape[2])]})
        paths.append(out / "snapshots.parquet")
        with atomic_path(paths[-1]) as tmp:
            pq.write_table(table, tmp)
    if result.pseudo is not None:
        kept = np.zeros(len(ids), dtype=bool)
        kept[result.pseudo.rows] = True
        table = pa.table({"utterance_id": ids.tolist(), "pseudo_label": result.pseudo.label.astype(np.float64),
                          "instability": result.pseudo.instability, "eligible": result.pseudo.eligible, "kept": kept})
        paths.append(out / "pseudo_labels.parquet")
        with atomic_path(paths[-1]) as tmp:
            pq.write_table(table, tmp)
    return paths


def _track(cfg: AdaptConfig, report: dict, artifacts: list[Path], model_path: Path | None, serving: dict,
           pool: MultimodalData, result: AdaptResult, domain: str) -> dict[str, Any]:
    from pipeline.adaptation.pool import input_batch
    from pipeline.adaptation.tracking import flat_metrics, log_adapt_run, register_adapted
    from pipeline.tracking.lineage import matching_train_summary
    from pipeline.tracking.pyfunc import frame_from_arrays

    train = matching_train_summary(cfg.model, cfg.train_summary)
    uri = cfg.tracking_uri or train.get("mlflow_tracking_uri") or "sqlite:///mlflow.db"
    parent = json.loads(Path(cfg.registry).read_text()) if Path(cfg.registry).exists() else {}
    parent["run_id"] = train["mlflow_run_id"]
    b = input_batch(pool, result.pool_rows[:2])
    example = frame_from_arrays({m: x.numpy() for m, x in b["features"].items()},
                                {m: x.numpy() for m, x in b["lengths_natural"].items()}, b["natural"].numpy())
    params = {k: v for k, v in vars(cfg).items() if k != "gate"} | {"gate": vars(cfg.gate)}
    run_id, _ = log_adapt_run(uri, train["mlflow_run_id"], params, flat_metrics(report), artifacts, model_path,
                              serving, example)
    out: dict[str, Any] = {"mlflow_run_id": run_id, "training_run_id": train["mlflow_run_id"]}
    if model_path is not None:
        base = cfg.model_name or parent.get("model_name") or "imer"
        out["registered"] = register_adapted(uri, f"{base}-{domain}", run_id, parent,
                                             {"adapt_method": cfg.method, "domain": domain,
                                              "gate": report["gate"]["checks"]})
    return out


def _skip(cfg: AdaptConfig, reason: str) -> dict[str, Any]:
    report = {"status": "skipped", "skipped": reason, "method": cfg.method}
    write_json(Path(cfg.out_dir) / "decision.json", report)
    write_csv(Path(cfg.reports_dir) / "per_combination.csv", [])
    write_json(cfg.metrics, report)
    return report
