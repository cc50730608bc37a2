"""Stage `evaluate`: score the selected checkpoint under every missing-modality protocol.

The test split is read exactly once: each test batch is loaded one time and then
run through the model under all protocols (7 fixed combinations, every stored
random-missing rate, natural missingness), each ANDed with natural presence. Every
sample is routed to the adapter set of its *effective* combination; a sample left
with no modality gets the training prior (class frequencies / mean score of the
train split) and is counted in `n_empty`. Random masks come from
`data/splits/random_masks.parquet`; nothing is re-drawn here.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.core.atomic import write_json
from pipeline.core.metrics import DEFAULT_SELECTION, METRICS, score_outputs
from pipeline.core.modalities import COMBINATIONS, MASKS, formable_combinations
from pipeline.formats.split_store import read_random_masks
from pipeline.methods.context import reads_dialogue
from pipeline.methods.routing import model_modalities, route
from pipeline.tracking.pyfunc import frame_from_arrays
from pipeline.training.data import MultimodalData, train_prior

SECTION = "evaluate"
NOT_APPLICABLE = {"applicable": False}  # a combination the training data cannot form: reported, never scored


def evaluate_model(
    model_path: str | Path, data: MultimodalData, splits_dir: str | Path, *, batch_size: int = 256
) -> dict[str, Any]:
    """Metrics of one checkpoint on val (fixed + natural) and test (fixed, random MR, natural).

    Returns {"metrics": <reports/metrics.json content>, "predictions": {split: {protocol:
    (n, K) outputs}}, "target": {split: (n,)}, "serving": {task, classes, prior},
    "input_example": a 2-row serving frame built from val rows}.
    """
    from pipeline.methods.checkpoint import load_model

    model, extra = load_model(model_path)
    serving = {"task": data.task, "classes": list(data.classes), "prior": _prior(data, extra)}
    test = data.subset("test")
    val = data.subset("val")
    if len(test) == 0:
        raise ValueError(f"{splits_dir}: the test split is empty")
    formable = formable_combinations(model_modalities(model))
    fixed = {c: MASKS[i] for i, c in enumerate(COMBINATIONS) if c in formable}  # (3,) each
    test_protocols = {**{("fixed", c): m for c, m in fixed.items()},
                      **{("random", mr): m for mr, m in _random_masks(test, splits_dir).items()},
                      ("natural", "natural"): np.ones(3, dtype=bool)}
    val_protocols = {**{("fixed", c): m for c, m in fixed.items()}, ("natural", "natural"): np.ones(3, dtype=bool)}

    results, predictions, targets, ids = {}, {}, {}, {}
    for split, view, protocols in (("val", val, val_protocols), ("test", test, test_protocols)):
        if len(view) == 0:
            continue
        outputs, empties, target = _one_pass(model, view, protocols, serving, batch_size)
        results[split] = _summarise(outputs, empties, target, data, formable)
        predictions[split], targets[split] = outputs, target
        ids[split] = view.utterance_id[view.positions]  # (n,) row order of outputs and target
    example = _input_example(val if len(val) else data.subset("train"))
    results["combinations"] = list(formable)  # the combinations scored; the others are not applicable
    return {"metrics": results, "predictions": predictions, "target": targets, "ids": ids, "serving": serving,
            "input_example": example}


def _one_pass(model, view: MultimodalData, protocols: dict, serving: dict, batch_size: int):
    """Read each row of `view` once; run every protocol on the batch already in memory."""
    n = len(view)
    k = len(serving["prior"])
    outputs = {key: np.zeros((n, k)) for key in protocols}  # (n, K) per protocol
    empties = {key: 0 for key in protocols}
    target = np.zeros(n, dtype=view.target.dtype)
    for local in view.read_batches(batch_size, by_dialogue=reads_dialogue(model)):
        batch = view.batch(local)  # the single read of these rows
        target[local] = batch["target"].numpy()
        presence = batch["natural"].numpy()  # (B, 3)
        for key, mask in protocols.items():
            routed = route(model, batch["features"], batch["lengths_natural"], presence,
                           mask[local] if mask.ndim == 2 else mask, serving["prior"], dialogue=batch["dialogue"])
            outputs[key][local] = routed.output
            empties[key] += int((routed.combination < 0).sum())
    return outputs, empties, target


def _summarise(outputs: dict, empties: dict, target: np.ndarray, data: MultimodalData,
               formable: tuple[str, ...]) -> dict[str, Any]:
    """Nested metrics; the fixed-protocol mean counts each formable combination exactly once.

    Combinations the training data cannot form are listed as not applicable, never as a number."""
    out: dict[str, Any] = {}
    for (protocol, name), y_out in outputs.items():
        scores = score_outputs(data.task, target, y_out, len(data.classes))
        scores.update(n=int(len(target)), n_empty=int(empties[(protocol, name)]))
        if protocol == "natural":
            out["natural"] = scores
        else:
            out.setdefault(protocol, {})[name] = scores
    for c in COMBINATIONS:
        if c not in formable:
            out["fixed"][c] = dict(NOT_APPLICABLE)
    out["fixed"]["mean"] = {k: float(np.mean([out["fixed"][c][k] for c in formable]))
                            for k in METRICS[data.task]}
    return out


def _prior(data: MultimodalData, extra: dict[str, Any]) -> list[float]:
    """Train-split prior for samples with no modality: stored in the checkpoint, else from train labels."""
    if extra.get("prior") is not None:
        return [float(x) for x in extra["prior"]]
    return train_prior(data)


def _random_masks(view: MultimodalData, splits_dir: str | Path) -> dict[str, np.ndarray]:
    """Stored test masks aligned to the view's rows, keyed "0.0".."0.7"."""
    ids = view.utterance_id[view.positions]
    out = {}
    for mr, (mask_ids, mask) in read_random_masks(splits_dir, "test").items():
        where = {u: i for i, u in enumerate(mask_ids.tolist())}
        rows = np.array([where.get(u, -1) for u in ids.tolist()], dtype=np.int64)
        if (rows < 0).any():
            raise ValueError(f"{splits_dir}/random_masks.parquet: MR {mr} lacks test utterance "
                             f"{ids[rows < 0][0]!r}; re-run the splits stage")
        out[f"{mr:.1f}"] = mask[rows]  # (n, 3)
    return out


def _input_example(view: MultimodalData, rows: int = 2):
    batch = view.batch(np.arange(min(rows, len(view))))
    natural = batch["natural"].numpy()
    return frame_from_arrays({m: x.numpy() for m, x in batch["features"].items()},
                             {m: x.numpy() for m, x in batch["lengths_natural"].items()}, natural)


def confusion_labels(result: dict[str, Any], protocol: tuple[str, str]) -> tuple[list[str], list[str], list[str]]:
    """(actual, predicted, label order) of a test protocol; regression uses Acc-7's rounded classes."""
    y, out = result["target"]["test"], result["predictions"]["test"][protocol]
    if result["serving"]["task"] == "classification":
        names = result["serving"]["classes"]
        return [names[i] for i in y], [names[i] for i in out.argmax(axis=1)], names
    to_class = lambda s: [str(int(v)) for v in np.round(np.clip(s, -3, 3))]  # noqa: E731
    return to_class(y), to_class(out[:, 0]), [str(v) for v in range(-3, 4)]


def prediction_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per test utterance and fixed/natural protocol: id, target, prediction (class index or score)."""
    rows = []
    classify = result["serving"]["task"] == "classification"
    target = result["target"]["test"]
    for (protocol, name), out in result["predictions"]["test"].items():
        if protocol == "random":
            continue
        pred = out.argmax(axis=1) if classify else out[:, 0]
        for uid, y, p in zip(result["ids"]["test"].tolist(), target.tolist(), pred.tolist()):
            rows.append({"utterance_id": uid, "combination": name, "target": y, "prediction": p})
    return rows


def write_reports(result: dict[str, Any], metrics_path: str | Path, plots_dir: str | Path) -> list[Path]:
    """metrics.json, the DVC plot CSVs and the PNGs; returns the PNG paths."""
    from pipeline.tracking import plots

    plots_dir = Path(plots_dir)
    metrics = result["metrics"]
    write_json(metrics_path, metrics)
    primary = DEFAULT_SELECTION[result["serving"]["task"]]
    per_comb, curve = plots.per_combination_rows(metrics), plots.mr_curve_rows(metrics)
    plots.write_csv(plots_dir / "per_combination.csv", per_comb)
    plots.write_csv(plots_dir / "mr_curve.csv", curve)
    if "ids" in result:  # per-utterance test predictions: paired tests across runs (imer compare)
        plots.write_csv(plots_dir / "test_predictions.csv", prediction_rows(result))
    pngs = [plots_dir / "per_combination.png", plots_dir / "mr_curve.png"]
    plots.plot_per_combination(per_comb, primary, pngs[0])
    plots.plot_mr_curve(curve, primary, pngs[1])
    for name, key in (("natural", ("natural", "natural")), ("atv", ("fixed", "atv"))):
        actual, predicted, labels = confusion_labels(result, key)
        plots.write_csv(plots_dir / ("confusion.csv" if name == "natural" else f"confusion_{name}.csv"),
                        plots.confusion_rows(actual, predicted))
        pngs.append(plots_dir / f"confusion_{name}.png")
        plots.plot_confusion(actual, predicted, labels, f"test confusion ({name})", pngs[-1])
    return pngs


def flat_test_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """MLflow names `test/<metric>/<combination>`, `test/<metric>/natural`, `test/<metric>/mr_0.3`."""
    test = metrics["test"]
    flat = {}
    entries = [(c, v) for c, v in test["fixed"].items()] + [("natural", test["natural"])]
    entries += [(f"mr_{mr}", v) for mr, v in test.get("random", {}).items()]
    for where, values in entries:
        for k, v in values.items():
            if k != "n" and not isinstance(v, bool) and np.isfinite(v):
                flat[f"test/{k}/{where}"] = float(v)
    return flat


def log_to_mlflow(result: dict[str, Any], run_id: str, tracking_uri: str, model_path: str | Path,
                  files: list[Path]) -> str:
    """Reopen the training run and add test metrics, plots and the pyfunc model; returns the model URI."""
    import mlflow

    from pipeline.tracking.pyfunc import log_pyfunc_model
    from pipeline.tracking.runs import fluent_uri

    with fluent_uri(tracking_uri), mlflow.start_run(run_id=run_id), tempfile.TemporaryDirectory() as tmp:
        mlflow.log_metrics(flat_test_metrics(result["metrics"]))
        for path in files:
            mlflow.log_artifact(str(path), "evaluation")
        info = log_pyfunc_model(model_path, result["serving"], result["input_example"], tmp)
    return info.model_uri


@dataclass
class EvaluateConfig:
    model: str = "models/model.pt"
    train_summary: str = "models/train_summary.json"  # MLflow run id (+ tracking URI) of the training run
    manifest: str = "data/manifest.parquet"
    features_dir: str = "data/features"
    splits_dir: str = "data/splits"  # random_masks.parquet: stored test masks, never re-drawn
    batch_size: int = 256
    num_threads: int = 1  # torch intra-op threads; 0 = torch default (tiny matmuls on shared cores prefer 1)
    metrics: str = "reports/metrics.json"
    plots_dir: str = "reports/plots"
    log_mlflow: bool = True  # test metrics, plots and the pyfunc model go into the training run
    tracking_uri: str | None = None  # None = the training run's URI from train_summary.json


def run_stage(params: dict[str, Any]) -> dict[str, Any]:
    """Load data (all splits aligned), evaluate once, write reports, log into the training run."""
    from pipeline.core.params import build_config
    from pipeline.tracking.lineage import matching_train_summary

    cfg: EvaluateConfig = build_config(EvaluateConfig, dict(params), SECTION)
    if cfg.num_threads > 0:
        torch.set_num_threads(cfg.num_threads)
    # before any work: model.pt and train_summary.json must name the same MLflow run (issue 13)
    train = matching_train_summary(cfg.model, Path(cfg.train_summary)) if cfg.log_mlflow else None
    data = MultimodalData.load(cfg.manifest, cfg.features_dir, cfg.splits_dir)
    result = evaluate_model(cfg.model, data, cfg.splits_dir, batch_size=cfg.batch_size)
    metrics_path = Path(cfg.metrics)
    pngs = write_reports(result, metrics_path, cfg.plots_dir)
    summary: dict[str, Any] = {"metrics": str(metrics_path),
                               "test_fixed_mean": result["metrics"]["test"]["fixed"]["mean"],
                               "test_natural": result["metrics"]["test"]["natural"]}
    if train is not None:
        uri = cfg.tracking_uri or train.get("mlflow_tracking_uri") or "sqlite:///mlflow.db"
        summary["model_uri"] = log_to_mlflow(result, train["mlflow_run_id"], uri, cfg.model, [*pngs, metrics_path])
    return summary


def main() -> None:
    import sys

    from pipeline.core.params import load_params
    from pipeline.tracking.lineage import LineageError

    try:
        out = run_stage(load_params(SECTION))
    except LineageError as exc:
        print(f"evaluate: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    print(json.dumps(out, indent=2, default=str))


if __name__ == "__main__":
    main()
