"""One human-readable run report: reports/summary.md and a self-contained reports/summary.html.

Reads what the stages already wrote (reports/metrics.json, reports/features.json,
reports/registry.json, reports/plots/*.csv and *.png) and lays it out: the registry
decision, per-combination metrics, the missing-rate curve, the confusion matrix and
extraction failures by reason. A missing input leaves its section saying so; nothing is
recomputed. Tables are shaped with polars (pivot, crosstab); the HTML embeds the PNGs.
"""
from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Any

import polars as pl

from pipeline.core.atomic import atomic_path
from pipeline.core.metrics import METRICS
from pipeline.core.modalities import COMBINATIONS

PLOTS = {"per_combination": "per_combination.png", "mr_curve": "mr_curve.png",
         "confusion_natural": "confusion_natural.png", "confusion_atv": "confusion_atv.png"}


def _read_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.exists() else None


def _number(value: Any) -> str:
    if isinstance(value, float):
        return "-" if value != value else f"{value:.4f}"
    return "-" if value is None else str(value)


def metric_table(metrics: dict[str, Any]) -> pl.DataFrame:
    """Rows: the 7 combinations, their mean and the natural protocol; columns `<split> <metric>`."""
    long = [{"combination": comb, "column": f"{split} {name}", "value": float(value)}
            for split in ("val", "test") for comb, values in metrics.get(split, {}).get("fixed", {}).items()
            for name, value in values.items() if name not in ("n", "n_empty")]
    long += [{"combination": "natural", "column": f"{split} {name}", "value": float(value)}
             for split in ("val", "test") for name, value in metrics.get(split, {}).get("natural", {}).items()
             if name not in ("n", "n_empty")]
    if not long:
        return pl.DataFrame()
    order = {c: i for i, c in enumerate((*COMBINATIONS, "mean", "natural"))}
    wide = pl.DataFrame(long).pivot(on="column", index="combination", values="value", aggregate_function="first")
    known = [n for names in METRICS.values() for n in names]
    rank = lambda col: (col.split()[0] != "val", known.index(col.split()[1]) if col.split()[1] in known else 99, col)  # noqa: E731
    wide = wide.select("combination", *sorted(wide.columns[1:], key=rank))
    return wide.sort(pl.col("combination").replace_strict(order, default=len(order)))


def mr_table(metrics: dict[str, Any]) -> pl.DataFrame:
    """Test metrics per random missing rate, rates ascending."""
    random = metrics.get("test", {}).get("random", {})
    rows = [{"missing rate": float(mr), **{k: float(v) for k, v in values.items() if k not in ("n", "n_empty")}}
            for mr, values in random.items()]
    return pl.DataFrame(rows).sort("missing rate") if rows else pl.DataFrame()


def confusion_table(path: Path) -> pl.DataFrame:
    """Counts of (actual, predicted) from a confusion CSV, actual classes as rows."""
    if not path.exists():
        return pl.DataFrame()
    pairs = pl.read_csv(path, schema_overrides={"actual": pl.String, "predicted": pl.String})
    labels = sorted(set(pairs["actual"]) | set(pairs["predicted"]))
    counts = pairs.pivot(on="predicted", index="actual", values="predicted", aggregate_function="len")
    counts = counts.select("actual", *[pl.col(c) if c in counts.columns else pl.lit(0).alias(c) for c in labels])
    return counts.fill_null(0).sort("actual").rename({"actual": "actual \\ predicted"})


def failure_table(features: dict[str, Any]) -> pl.DataFrame:
    """Missing clips per modality and reason, from the feature report."""
    rows = [{"modality": name, "reason": reason, "clips": int(count)}
            for name, info in (features.get("modalities") or {}).items()
            for reason, count in (info.get("failure_reasons") or {}).items()]
    if not rows:
        return pl.DataFrame({"modality": [], "reason": [], "clips": []})
    return pl.DataFrame(rows).sort(["modality", "clips"], descending=[False, True])


def _markdown(df: pl.DataFrame) -> str:
    if df.is_empty():
        return "_none_"
    head = "| " + " | ".join(df.columns) + " |"
    rule = "|" + "|".join("---" for _ in df.columns) + "|"
    body = ["| " + " | ".join(_number(v) for v in row) + " |" for row in df.iter_rows()]
    return "\n".join([head, rule, *body])


def _html_table(df: pl.DataFrame) -> str:
    if df.is_empty():
        return "<p><em>none</em></p>"
    head = "".join(f"<th>{html.escape(c)}</th>" for c in df.columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_number(v))}</td>" for v in row) + "</tr>"
                   for row in df.iter_rows())
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def decision_lines(registry: dict[str, Any] | None) -> list[str]:
    if registry is None:
        return ["No registry decision (reports/registry.json absent: the register stage has not run)."]
    lines = [f"Decision: **{registry.get('decision')}** for `{registry.get('model_name')}` version "
             f"{registry.get('version')} ({registry.get('reason')})."]
    previous = registry.get("previous_champion_version")
    before = (f"previous champion version {previous} scored {_number(registry.get('previous_champion_score'))}"
              if previous else "no previous champion")
    lines.append(f"Candidate score {_number(registry.get('candidate_score'))}; {before}; "
                 f"champion now: version {registry.get('champion_version')}.")
    return lines


def build_sections(reports_dir: Path) -> list[tuple[str, list[str], pl.DataFrame | None, list[str]]]:
    """(title, text lines, table, plot file names) per section, from the files under `reports_dir`."""
    plots_dir = reports_dir / "plots"
    metrics = _read_json(reports_dir / "metrics.json")
    features = _read_json(reports_dir / "features.json")
    absent = lambda name: [f"Not available: reports/{name} is absent."]  # noqa: E731
    sections = [("Registry decision", decision_lines(_read_json(reports_dir / "registry.json")), None, [])]
    if metrics is None:
        sections.append(("Per-combination metrics", absent("metrics.json"), None, []))
    else:
        sections.append(("Per-combination metrics",
                         ["Fixed protocol: each combination's modalities kept for every test clip; "
                          "`natural`: each clip with the modalities it has."], metric_table(metrics),
                         [PLOTS["per_combination"]]))
        sections.append(("Missing-rate curve", ["Test metrics with modalities dropped at random at each rate."],
                         mr_table(metrics), [PLOTS["mr_curve"]]))
    sections.append(("Confusion matrix (test, natural protocol)", [],
                     confusion_table(plots_dir / "confusion.csv"),
                     [PLOTS["confusion_natural"], PLOTS["confusion_atv"]]))
    if features is None:
        sections.append(("Extraction failures by reason", absent("features.json"), None, []))
    else:
        sections.append(("Extraction failures by reason",
                         [f"{features.get('clips')} clips; a failed clip is missing that modality."],
                         failure_table(features), []))
    return sections


def render_markdown(sections: list, plots_dir: Path, title: str) -> str:
    out = [f"# {title}", ""]
    for name, lines, table, images in sections:
        out += [f"## {name}", "", *lines, ""]
        if table is not None:
            out += [_markdown(table), ""]
        out += [f"![{image}](plots/{image})" for image in images if (plots_dir / image).exists()]
        out += [""] if images else []
    return "\n".join(out).rstrip() + "\n"


def render_html(sections: list, plots_dir: Path, title: str) -> str:
    style = ("body{font-family:sans-serif;max-width:60rem;margin:2rem auto}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:.2rem .5rem;text-align:right}img{max-width:100%}")
    out = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
           f"<style>{style}</style></head><body><h1>{html.escape(title)}</h1>"]
    for name, lines, table, images in sections:
        out.append(f"<h2>{html.escape(name)}</h2>")
        for line in lines:  # **bold** is the only markup the lines use
            text = html.escape(line).replace("`", "")
            parts = text.split("**")
            out.append("<p>" + "".join(f"<b>{p}</b>" if i % 2 else p for i, p in enumerate(parts)) + "</p>")
        if table is not None:
            out.append(_html_table(table))
        for image in images:
            if (plots_dir / image).exists():
                data = base64.b64encode((plots_dir / image).read_bytes()).decode()
                out.append(f"<p><img alt='{image}' src='data:image/png;base64,{data}'></p>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def write_run_report(reports_dir: str | Path = "reports", title: str = "imer run report") -> dict[str, str]:
    """Write `summary.md` and `summary.html` into `reports_dir`; returns their paths."""
    reports_dir = Path(reports_dir)
    sections = build_sections(reports_dir)
    paths = {"markdown": reports_dir / "summary.md", "html": reports_dir / "summary.html"}
    for kind, render in (("markdown", render_markdown), ("html", render_html)):
        with atomic_path(paths[kind]) as tmp:
            tmp.write_text(render(sections, reports_dir / "plots", title))
    return {k: str(v) for k, v in paths.items()}
