"""Stage `report`: the human-readable run report, reports/summary.md and reports/summary.html.

It reads the files earlier stages wrote (metrics, feature report, registry decision, plots)
and lays them out; see pipeline/tracking/report.py.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pipeline.core.params import build_config, load_params
from pipeline.tracking.report import write_run_report

SECTION = "report"


@dataclass
class ReportConfig:
    reports_dir: str = "reports"   # holds metrics.json, features.json, registry.json, plots/
    title: str = "imer run report"


def run_stage(params: dict[str, Any]) -> dict[str, Any]:
    """Write the report; the summary (its two paths) is what `imer report` prints."""
    cfg: ReportConfig = build_config(ReportConfig, dict(params), SECTION)
    return write_run_report(cfg.reports_dir, cfg.title)


def main() -> None:
    import json

    print(json.dumps(run_stage(load_params(SECTION)), indent=2, sort_keys=True))


if __name__ == "__main__":
    main()
