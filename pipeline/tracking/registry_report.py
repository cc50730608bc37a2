"""reports/registry_compare.md: the registry comparison (registry_compare.py) as Markdown tables."""
from __future__ import annotations

from typing import Any

from pipeline.core.modalities import COMBINATIONS

OPTIONS_WIDTH = 60  # characters of the options summary in the table; the JSON has them all


def registry_markdown(result: dict[str, Any]) -> str:
    """One section per data label: the recommendation, then the rows ranked by validation mean."""
    src = result["source"]
    lines = ["# Registered models compared (from the MLflow registry)", "",
             f"Store: `{src['tracking_uri']}`, models `{src['models']}`; read: {src['read']}.", "",
             "Columns `val ...` are **validation** scores: they chose each model's champion and the "
             "recommendation. Columns `test ...` are the test scores logged on the version's run, shown for "
             "reference and never used to choose anything.", ""]
    for label, section in result["data"].items():
        metric = section["metric"]
        better = "lower" if section["direction"] == "min" else "higher"
        lines += [f"## Data `{label}` ({section['task']}; ranked by validation {metric.upper()}, mean over the "
                  f"7 fixed combinations, {better} is better)", ""]
        rec = section["recommended"]
        if rec is None:
            why = "the versions carry no data label" if label == "unknown" else "no version has a validation mean"
            lines += [f"No recommendation: {why}.", ""]
        else:
            runner = rec["runner_up"]
            second = "no other model" if runner is None else \
                f"runner-up `{runner['model']}` v{runner['version']} ({runner['value']:.4f})"
            lines += [f"**Recommended: `{rec['model']}` v{rec['version']}** (alias `{rec['alias']}`): "
                      f"{rec['metric']} = {rec['value']:.4f}; {second}; {rec['candidates']} model(s) compared. "
                      f"Load it with `models:/{rec['model']}@{rec['alias']}`.", ""]
        head = ["rank", "model", "version", "champion", "options", "seed", "trainable params"]
        head += [f"val {c}" for c in COMBINATIONS] + ["**val mean**", "val natural"]
        head += [f"test {c}" for c in COMBINATIONS] + ["test mean", "test natural"]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for rank, row in enumerate(section["rows"], 1):
            test = row["test"] or {}
            cells = [str(rank), f"`{row['model']}`", f"v{row['version']}",
                     "yes" if row["champion"] else "no (champion on other data)", _options(row),
                     str(row["seed"] or "–"), _count(row["trainable_params"])]
            cells += [_num(row["val"].get(c)) for c in COMBINATIONS]
            cells += [f"**{_num(row['val'].get('mean'))}**", _num(row["val"].get("natural"))]
            cells += [_num(test.get(c)) for c in (*COMBINATIONS, "mean", "natural")]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    if result.get("without_champion"):
        lines += ["Models without a champion (not compared): "
                  + ", ".join(f"`{m}`" for m in result["without_champion"]) + ".", ""]
    lines += ["Find the recommended model for a profile: the alias `recommended-<profile>` (on one model only; "
              "`pipeline.tracking.registry_compare.recommended_model(client, profile)` returns its name and "
              "version), or the `recommended` entry of registry_compare.json.", ""]
    return "\n".join(lines)


def _options(row: dict[str, Any]) -> str:
    shown = {k: v for k, v in (row["options"] or {}).items() if k != "method"}
    text = " ".join(f"{k}={v}" for k, v in shown.items()) or "defaults"
    text = f"{row['method'] or '?'}: {text}".replace("|", "/")
    return text if len(text) <= OPTIONS_WIDTH else text[:OPTIONS_WIDTH - 1] + "…"


def _num(value: float | None) -> str:
    return "–" if value is None else f"{value:.4f}"


def _count(value: int | None) -> str:
    return "–" if value is None else f"{value:,}"
