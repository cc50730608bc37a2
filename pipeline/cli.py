"""`imer` console script: `imer <stage> [--params params.yaml]` runs one stage."""
from __future__ import annotations

import argparse
import json
import sys

from pipeline.params import load_params
from pipeline.stages import STAGE_MODULES, stage_module


def run_named_stage(name: str, params_path: str = "params.yaml") -> dict:
    """Run stage `name` with its own params section; the single entry used by DVC."""
    module = stage_module(name)
    params = load_params(module.SECTION, params_path)
    return module.run_stage(params)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="imer", description=__doc__)
    parser.add_argument("stage", choices=sorted(STAGE_MODULES), help="stage to run")
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    args = parser.parse_args(argv)
    try:
        summary = run_named_stage(args.stage, args.params)
    except (FileNotFoundError, ValueError, KeyError) as exc:
        print(f"imer {args.stage}: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2, sort_keys=True, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
