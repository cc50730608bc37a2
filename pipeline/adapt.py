"""Stage `adapt`: adapt the registered source model to the shifted domain without target labels.

CASP (contrastive adaptation + stable pseudo-labels) or a baseline (`none`, `input_stats`,
`tent`, `casp_contrastive`), a label-free acceptance gate, a before/after report on
`shifted_test`. Without shifted rows it writes a `skipped` report and exits 0. The work
lives in `pipeline/adaptation/` (run.py is the pure function).
"""
from __future__ import annotations

import json
from typing import Any

import torch

from pipeline.adaptation.config import AdaptConfig
from pipeline.adaptation.run import run_adaptation

SECTION = "adapt"


def run_stage(params: dict[str, Any]) -> dict[str, Any]:
    """Typed config from the `adapt` section, then the one pure function."""
    cfg = AdaptConfig.from_params(params)
    if cfg.num_threads > 0:  # tiny matmuls on shared cores prefer one intra-op thread
        torch.set_num_threads(cfg.num_threads)
    report = run_adaptation(cfg)
    keys = ("status", "skipped", "domain", "method", "adapted_parameters", "wall_time_s", "registered")
    out = {k: report[k] for k in keys if k in report}
    if "gate" in report:
        out["gate_reasons"] = report["gate"]["reasons"]
    return out


def main() -> None:
    from pipeline.core.params import load_params

    print(json.dumps(run_stage(load_params(SECTION)), indent=2, default=str))


if __name__ == "__main__":
    main()
