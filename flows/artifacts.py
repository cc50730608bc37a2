"""Prefect artifacts built from the pipeline's report files (read when they exist).

The files are the source of truth (DVC tracks them); artifacts only make the last
run's outcome visible on the flow run page: per-combination metrics, the DPFT
sampling ratios at the last epoch, the registry decision and the MLflow run link.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from prefect.artifacts import create_markdown_artifact, create_table_artifact

from pipeline.core.modalities import COMBINATIONS

METRICS = Path("reports/metrics.json")
TRAIN_SUMMARY = Path("models/train_summary.json")
REGISTRY = Path("reports/registry.json")


def _load(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def metrics_rows(metrics: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (split, combination) of the fixed-missing protocol: {"split", "combination", metric...}."""
    rows = []
    for split in ("val", "test"):
        block = metrics.get(split) or {}
        fixed = block.get("fixed", block)  # val may be flat {comb: {...}}
        for comb in (*COMBINATIONS, "mean"):
            values = fixed.get(comb) if isinstance(fixed, dict) else None
            if isinstance(values, dict):
                row = {"split": split, "combination": comb}
                row.update({k: round(float(v), 4) for k, v in values.items() if isinstance(v, (int, float))})
                rows.append(row)
    return rows


def last_epoch_ratios(summary: dict[str, Any]) -> dict[str, float] | None:
    """DPFT sampling ratios q_c at the last epoch, keyed by combination, from train_summary."""
    history = None
    for key in ("q_history", "dpft_q_history", "q"):
        if key in summary:
            history = summary[key]
            break
    if history is None and isinstance(summary.get("dpft"), dict):
        history = summary["dpft"].get("q_history") or summary["dpft"].get("q")
    if not history:
        return None
    last = history[-1] if isinstance(history[0], (list, dict)) else history
    if isinstance(last, dict):
        last = last.get("q", last)
        if isinstance(last, dict):
            return {str(k): float(v) for k, v in last.items()}
    return {comb: float(v) for comb, v in zip(COMBINATIONS, last)}


def mlflow_link(summary: dict[str, Any]) -> str | None:
    """URL of the run in the MLflow UI when the tracking URI is an HTTP server, else the run URI."""
    run_id = summary.get("mlflow_run_id")
    if not run_id:
        return None
    uri = summary.get("mlflow_tracking_uri") or os.environ.get("MLFLOW_TRACKING_URI", "")
    if not uri.startswith("http"):
        return f"runs:/{run_id}"
    exp = summary.get("mlflow_experiment_id")
    if exp is None:
        try:  # one cheap call to the tracking server; the link is a convenience
            from mlflow.tracking import MlflowClient

            exp = MlflowClient(tracking_uri=uri).get_run(run_id).info.experiment_id
        except Exception:  # noqa: BLE001
            return f"{uri.rstrip('/')}/#/runs/{run_id}"
    return f"{uri.rstrip('/')}/#/experiments/{exp}/runs/{run_id}"


def outcome_markdown(root: Path = Path(".")) -> str | None:
    """Markdown summary of metrics, DPFT ratios, registry decision and MLflow link; None if no report exists."""
    metrics = _load(root / METRICS)
    summary = _load(root / TRAIN_SUMMARY)
    registry = _load(root / REGISTRY)
    if not any((metrics, summary, registry)):
        return None
    lines = ["# imer run outcome", ""]
    if metrics:
        rows = metrics_rows(metrics)
        if rows:
            cols = sorted({k for r in rows for k in r} - {"split", "combination"})
            lines += ["## Metrics (fixed missing protocol)", "",
                      "| split | combination | " + " | ".join(cols) + " |",
                      "|---|---|" + "---|" * len(cols)]
            lines += [f"| {r['split']} | {r['combination']} | " + " | ".join(str(r.get(c, "")) for c in cols) + " |"
                      for r in rows]
            lines.append("")
    if summary:
        ratios = last_epoch_ratios(summary)
        if ratios:
            lines += ["## DPFT sampling ratios at the last epoch", "",
                      "| " + " | ".join(ratios) + " |", "|" + "---|" * len(ratios),
                      "| " + " | ".join(f"{v:.3f}" for v in ratios.values()) + " |", ""]
        link = mlflow_link(summary)
        if link:
            lines += [f"MLflow run: [{summary['mlflow_run_id']}]({link})", ""]
    if registry:
        lines += ["## Registry", "",
                  f"- decision: **{registry.get('decision', '?')}** ({registry.get('reason', '')})",
                  f"- model: {registry.get('model_name', '?')} v{registry.get('version', '?')}; "
                  f"champion: v{registry.get('champion_version', '?')}", ""]
    return "\n".join(lines)


def publish_outcome(key: str = "imer-outcome", root: Path = Path(".")) -> bool:
    """Create the markdown and metrics-table artifacts of the current flow run; False if nothing to show."""
    markdown = outcome_markdown(root)
    if markdown is None:
        return False
    create_markdown_artifact(markdown=markdown, key=key, description="imer: metrics, DPFT ratios, registry")
    metrics = _load(root / METRICS)
    if metrics and (rows := metrics_rows(metrics)):
        create_table_artifact(table=rows, key=f"{key}-metrics", description="per-combination metrics")
    return True


def publish_stage_summary(stage: str, summary: dict[str, Any]) -> None:
    """Every stage run shows its returned summary (a JSON-able dict) as a markdown artifact."""
    body = json.dumps(summary, indent=2, sort_keys=True, default=str)
    key = f"stage-{stage}".replace("_", "-")
    create_markdown_artifact(markdown=f"# stage `{stage}`\n\n```json\n{body}\n```\n", key=key,
                             description=f"summary returned by imer {stage}")
