"""`imer` console script.

- `imer <stage> [--params params.yaml] [--no-prefect]` runs one stage (the DVC command);
  by default inside its Prefect flow (flows/stage.py), against PREFECT_API_URL or
  Prefect's temporary local server. `--no-prefect` or IMER_NO_PREFECT=1 runs the bare
  stage function (unit tests, debugging).
- `imer servers start|stop|status` manages the local Prefect and MLflow servers.
"""
from __future__ import annotations

import argparse
import json
import sys

from pipeline.core.params import load_params
from flows.stages import STAGE_MODULES, stage_module


def run_named_stage(name: str, params_path: str = "params.yaml") -> dict:
    """Run stage `name` with its own params section, without Prefect."""
    module = stage_module(name)
    params = load_params(module.SECTION, params_path)
    return module.run_stage(params)


def run_stage_command(name: str, params_path: str = "params.yaml", prefect: bool | None = None) -> dict:
    """What `imer <stage>` does: the stage in its Prefect flow unless Prefect is switched off."""
    from flows.settings import prefect_enabled

    if prefect is None:
        prefect = prefect_enabled(params_path)
    if not prefect:
        return run_named_stage(name, params_path)
    from flows.stage import run_stage_in_prefect

    return run_stage_in_prefect(name, params_path)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["servers"]:
        from flows.servers import main as servers_main

        return servers_main(argv[1:])
    if argv[:1] == ["repro"]:
        from flows.repro import main as repro_main

        return repro_main(argv[1:])
    parser = argparse.ArgumentParser(prog="imer", description=__doc__.splitlines()[0])
    parser.add_argument("stages", nargs="+", choices=sorted(STAGE_MODULES), metavar="stage",
                        help=f"stage(s) to run in order, from: {', '.join(STAGE_MODULES)} (or: servers start|stop|status; repro [dvc repro options])")
    parser.add_argument("--params", action="append", help="params file; repeat to overlay (default: params.yaml)")
    parser.add_argument("--no-prefect", action="store_true", help="run the bare stage function (also IMER_NO_PREFECT=1)")
    args = parser.parse_args(argv)
    params_path = ",".join(args.params or ["params.yaml"])
    for stage in args.stages:
        try:
            summary = run_stage_command(stage, params_path, prefect=False if args.no_prefect else None)
        except (FileNotFoundError, ValueError, KeyError) as exc:
            print(f"imer {stage}: error: {exc}", file=sys.stderr)
            return 2
        print(json.dumps(summary, indent=2, sort_keys=True, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())

