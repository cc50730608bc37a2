"""The comparison report: reports/compare.json (DVC metrics), compare.md, compare.html, MLflow runs.

Reads each finished cell's own outputs (reports/metrics.json, models/train_summary.json,
reports/plots/test_predictions.csv) and never re-runs anything. Per profile and row: mean ± std
over seeds per combination, the fixed-combination mean, natural missingness and the
random missing-rate curve, trainable parameters and time; paired tests of every row against
each baseline over seeds x test utterances (pipeline/tracking/compare_stats.py); a ranking
per combination. Failed cells are listed with their log tail.
"""
from __future__ import annotations

import base64
import csv
import html
import json
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.atomic import atomic_path, write_json
from pipeline.core.modalities import COMBINATIONS
from pipeline.tracking.compare_stats import compare_pair, mean_std, rank

METRIC = "wa"  # per-utterance correctness averages to WA, so the paired tests use the same metric
TESTED = (*COMBINATIONS, "mean", "natural")  # combinations of the paired tests ("mean" = per-utterance mean)


def _cell_outputs(record: dict[str, Any]) -> dict[str, Any]:
    folder = Path(record["folder"])
    metrics = json.loads((folder / "reports" / "metrics.json").read_text())
    summary = json.loads((folder / "models" / "train_summary.json").read_text())
    counts = summary.get("parameter_counts") or {}
    final = counts.get("main") or (list(counts.values())[-1] if counts else {})
    correct: dict[str, dict[str, float]] = {}
    pred_file = folder / "reports" / "plots" / "test_predictions.csv"
    if pred_file.exists():
        with pred_file.open() as fh:
            for row in csv.DictReader(fh):
                correct.setdefault(row["combination"], {})[row["utterance_id"]] = float(
                    float(row["target"]) == float(row["prediction"]))
    return {"metrics": metrics, "trainable": final.get("trainable"), "correct": correct}


def _scores(metrics: dict[str, Any]) -> dict[str, float]:
    test = metrics["test"]
    out = {c: v[METRIC] for c, v in test["fixed"].items() if isinstance(v, dict) and METRIC in v}
    out["natural"] = test["natural"][METRIC]
    out.update({f"mr_{mr}": v[METRIC] for mr, v in test.get("random", {}).items()})
    return out


def _per_utterance_mean(correct: dict[str, dict[str, float]]) -> dict[str, float]:
    combos = [c for c in COMBINATIONS if c in correct]
    if not combos:
        return {}
    ids = set.intersection(*(set(correct[c]) for c in combos))
    return {u: float(np.mean([correct[c][u] for c in combos])) for u in ids}


def summarise(records: list[dict[str, Any]], baselines: list[str], n_boot: int = 2000) -> dict[str, Any]:
    """The content of compare.json."""
    ok = [r for r in records if r["status"] == "ok"]
    loaded = {r["cell"]: _cell_outputs(r) for r in ok}
    profiles: dict[str, Any] = {}
    for profile in dict.fromkeys(r["profile"] for r in records):
        rows = list(dict.fromkeys(r["row"] for r in records if r["profile"] == profile))
        table: dict[str, Any] = {}
        for row in rows:
            cells = [r for r in ok if r["profile"] == profile and r["row"] == row]
            scores = [_scores(loaded[r["cell"]]["metrics"]) for r in cells]
            keys = list(dict.fromkeys(k for s in scores for k in s))
            table[row] = {
                "seeds": [r["seed"] for r in cells],
                "scores": {k: mean_std([s[k] for s in scores if k in s]) for k in keys},
                "trainable_params": loaded[cells[0]["cell"]]["trainable"] if cells else None,
                "seconds": mean_std([r["seconds"] for r in cells]),
            }
        ranking = {c: rank({row: table[row]["scores"].get(c, {}).get("mean", float("nan")) for row in rows})
                   for c in (*COMBINATIONS, "mean", "natural")}
        paired = {b: {row: _paired(ok, loaded, profile, row, b, n_boot) for row in rows if row != b}
                  for b in baselines if b in rows}
        profiles[profile] = {"rows": table, "ranking": ranking, "paired": paired}
    failed = [{k: r.get(k) for k in ("cell", "exit_code", "folder")} | {"log_tail": (r.get("log_tail") or "")[-800:]}
              for r in records if r["status"] != "ok"]
    return {"metric": METRIC, "profiles": profiles, "failed": failed,
            "cells": [{k: r.get(k) for k in ("cell", "status", "seconds", "computed", "key")} for r in records]}


def _paired(ok: list[dict], loaded: dict, profile: str, row: str, base: str, n_boot: int) -> dict[str, Any]:
    """Paired tests of `row` against `base` per combination over the seeds both have."""
    by_seed = {(r["row"], r["seed"]): loaded[r["cell"]]["correct"] for r in ok if r["profile"] == profile}
    seeds = sorted({s for (w, s) in by_seed if w == row} & {s for (w, s) in by_seed if w == base})
    out: dict[str, Any] = {}
    if not seeds:
        return out
    for combo in TESTED:
        get = (lambda c: _per_utterance_mean(c)) if combo == "mean" else (lambda c, k=combo: c.get(k, {}))
        a_maps = [get(by_seed[(row, s)]) for s in seeds]
        b_maps = [get(by_seed[(base, s)]) for s in seeds]
        ids = sorted(set.intersection(*(set(m) for m in a_maps + b_maps)))
        if not ids:
            continue
        a = np.array([[m[u] for u in ids] for m in a_maps])  # (S, N)
        b = np.array([[m[u] for u in ids] for m in b_maps])  # (S, N)
        out[combo] = compare_pair(a, b, n_boot=n_boot)
    return out


def _fmt(cell: dict[str, Any] | None) -> str:
    if not cell or cell.get("n", 0) == 0:
        return "–"
    return f"{cell['mean']:.3f} ± {cell['std']:.3f}"


def tables(summary: dict[str, Any]) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, header, rows) of every table of the report."""
    out = []
    cols = (*COMBINATIONS, "mean", "natural")
    for profile, data in summary["profiles"].items():
        header = ["row", *cols, "params", "cell s"]
        rows = [[row, *(_fmt(v["scores"].get(c)) for c in cols), str(v["trainable_params"]),
                 f"{v['seconds']['mean']:.0f}" if v["seconds"]["n"] else "–"] for row, v in data["rows"].items()]
        out.append((f"{profile}: test {summary['metric'].upper()} (mean ± std over seeds)", header, rows))
        mrs = sorted({k for v in data["rows"].values() for k in v["scores"] if k.startswith("mr_")})
        if mrs:
            out.append((f"{profile}: random missing rate", ["row", *mrs],
                        [[row, *(_fmt(v["scores"].get(m)) for m in mrs)] for row, v in data["rows"].items()]))
        for base, per_row in data["paired"].items():
            body = [[row, c, f"{t['delta']:+.3f}", f"[{t['ci_low']:+.3f}, {t['ci_high']:+.3f}]",
                     f"{t['p_bootstrap']:.3g}", f"{t['p_permutation']:.3g}"]
                    for row, tests in per_row.items() for c, t in tests.items() if c in ("mean", "atv", "natural")]
            out.append((f"{profile}: paired tests against {base} (seeds x test utterances)",
                        ["row", "combination", "delta", "95% CI", "p bootstrap", "p permutation"], body))
        out.append((f"{profile}: ranking per combination (best first)", ["combination", "ranking"],
                    [[c, " > ".join(r)] for c, r in data["ranking"].items()]))
    if summary["failed"]:
        out.append(("failed cells", ["cell", "exit", "last output"],
                    [[f["cell"], str(f["exit_code"]), f["log_tail"].strip().splitlines()[-1] if f["log_tail"].strip() else ""]
                     for f in summary["failed"]]))
    return out


def plot_mr(summary: dict[str, Any], profile: str) -> bytes:
    """Test score under random missing rate, one line per row (mean over seeds, std as band); PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.4))
    for row, v in summary["profiles"][profile]["rows"].items():
        mrs = sorted((float(k[3:]), v["scores"][k]) for k in v["scores"] if k.startswith("mr_"))
        if mrs:
            x = np.array([m for m, _ in mrs])
            mean, std = np.array([c["mean"] for _, c in mrs]), np.array([c["std"] for _, c in mrs])
            ax.plot(x, mean, marker="o", label=row)
            ax.fill_between(x, mean - std, mean + std, alpha=0.15)
    ax.set_xlabel("random missing rate")
    ax.set_ylabel(f"test {summary['metric'].upper()}")
    ax.set_title(f"{profile}: missing-rate curve")
    if ax.lines:
        ax.legend(fontsize=7)
    buf = BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


def plot_bars(summary: dict[str, Any], profile: str) -> bytes:
    """Grouped bars: per combination, each row's mean with its std as error bar; PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summary["profiles"][profile]["rows"]
    cols = (*COMBINATIONS, "mean")
    fig, ax = plt.subplots(figsize=(9, 3.6))
    width = 0.8 / max(1, len(rows))
    for i, (row, v) in enumerate(rows.items()):
        means = [v["scores"].get(c, {}).get("mean", np.nan) for c in cols]
        stds = [v["scores"].get(c, {}).get("std", 0.0) for c in cols]
        ax.bar(np.arange(len(cols)) + i * width, means, width, yerr=stds, label=row, capsize=2)
    ax.set_xticks(np.arange(len(cols)) + 0.4 - width / 2, cols)
    ax.set_ylabel(f"test {summary['metric'].upper()}")
    ax.set_title(f"{profile}: per combination, mean ± std over seeds")
    ax.legend(fontsize=7, ncol=3)
    buf = BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


def render(summary: dict[str, Any], pngs: dict[str, bytes], run_info: dict[str, Any]) -> tuple[str, str]:
    """(Markdown, HTML): the same tables; the HTML embeds the plots, the Markdown links the PNG files."""
    intro = (f"Cells: {len(summary['cells'])}, failed: {len(summary['failed'])}; " +
             ", ".join(f"{k} {v}" for k, v in run_info.items()))
    md = ["# imer comparison", "", intro, ""]
    doc = ["<html><head><meta charset='utf-8'><title>imer comparison</title></head><body>",
           "<h1>imer comparison</h1>", f"<p>{html.escape(intro)}</p>"]
    for name in pngs:
        md += [f"![{name}](compare_{name}.png)", ""]
        doc.append(f"<img alt='{html.escape(name)}' src='data:image/png;base64,{base64.b64encode(pngs[name]).decode()}'>")
    for title, header, rows in tables(summary):
        md += [f"## {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        md += ["| " + " | ".join(r) + " |" for r in rows] + [""]
        doc.append(f"<h2>{html.escape(title)}</h2><table border='1' cellspacing='0' cellpadding='3'><tr>" +
                   "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>" +
                   "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows) +
                   "</table>")
    return "\n".join(md), "\n".join(doc + ["</body></html>"])


def log_mlflow(summary: dict[str, Any], records: list[dict[str, Any]], settings: dict[str, Any],
               files: list[Path]) -> str | None:
    """A parent run with the report and one child run per finished cell; the parent's run id."""
    if not settings.get("tracking_uri"):
        return None
    from mlflow.tracking import MlflowClient

    client = MlflowClient(settings["tracking_uri"])
    name = settings.get("experiment", "imer-compare")
    exp = client.get_experiment_by_name(name)
    exp_id = exp.experiment_id if exp else client.create_experiment(name)
    parent = client.create_run(exp_id, run_name="compare", tags={"imer.kind": "compare"}).info.run_id
    for f in files:
        client.log_artifact(parent, str(f))
    for r in records:
        child = client.create_run(exp_id, run_name=r["cell"], tags={
            "mlflow.parentRunId": parent, "imer.row": r["row"], "imer.profile": r["profile"],
            "imer.seed": str(r["seed"]), "imer.status": r["status"], "imer.cell_key": r.get("key", "")}).info.run_id
        if r["status"] == "ok":
            for k, v in _scores(_cell_outputs(r)["metrics"]).items():
                client.log_metric(child, f"test/{METRIC}/{k}", float(v))
            client.log_metric(child, "cell_seconds", float(r["seconds"]))
        client.set_terminated(child, "FINISHED" if r["status"] == "ok" else "FAILED")
    client.set_terminated(parent, "FINISHED")
    return parent


def write_compare_report(records: list[dict[str, Any]], baselines: list[str], report_dir: str | Path,
                         mlflow_settings: dict[str, Any] | None = None, run_info: dict[str, Any] | None = None,
                         n_boot: int = 2000) -> dict[str, Path | str]:
    """Write compare.json, compare.md, compare.html and the PNGs under `report_dir`; log to MLflow."""
    out = Path(report_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary = summarise(records, baselines, n_boot=n_boot)
    summary["run"] = dict(run_info or {})
    pngs = {f"{p}{kind}": plot(summary, p) for p, d in summary["profiles"].items() if d["rows"]
            for kind, plot in (("", plot_bars), ("_mr", plot_mr))}
    paths: dict[str, Path | str] = {"json": out / "compare.json", "md": out / "compare.md", "html": out / "compare.html"}
    for name, data in pngs.items():
        with atomic_path(out / f"compare_{name}.png") as tmp:
            tmp.write_bytes(data)
    md, page = render(summary, pngs, summary["run"])
    for key, text in (("md", md), ("html", page)):
        with atomic_path(paths[key]) as tmp:
            tmp.write_text(text, encoding="utf-8")
    write_json(paths["json"], summary)
    parent = log_mlflow(summary, records, mlflow_settings or {}, [paths["md"], paths["html"]])
    if parent:
        paths["mlflow_parent_run"] = parent
    return paths
