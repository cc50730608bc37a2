"""Stage `extract_acoustic`: manifest -> data/features/acoustic.arrow (see features/runner.py)."""
from __future__ import annotations

import json
import logging
from typing import Any

from features.runner import stage_from_params
from pipeline.core.params import load_params

SECTION = "extract_acoustic"


def run_stage(params: dict[str, Any]) -> dict[str, Any]:
    """Extract acoustic features for every manifest row; returns the run summary."""
    return stage_from_params("acoustic", params)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    print(json.dumps(run_stage(load_params(SECTION)), indent=2, sort_keys=True))


if __name__ == "__main__":
    main()
