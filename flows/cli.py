"""`imer` console script: one subcommand per stage plus the tools around them.

- `imer <stage> [<stage> ...] [--params FILE]... [--no-prefect]` runs stages in order (the
  DVC commands); by default each inside its Prefect flow (flows/stage.py), against
  PREFECT_API_URL or Prefect's temporary local server. `--no-prefect` or IMER_NO_PREFECT=1
  runs the bare stage function (unit tests, debugging).
- `imer servers start|stop|status`: the local Prefect and MLflow servers.
- `imer repro [dvc repro options]`: `dvc repro` with one local Prefect API for the whole run.
- `imer predict ...`: emotion of new clips with a registered model or a checkpoint.
- `imer demo ...`: a local web page (127.0.0.1) to try a model on your own clips.
- `imer compare ...`: a matrix of methods x options x seeds x corpus profiles, compared.
- `imer folds run|aggregate ...`: IEMOCAP leave-one-session-out folds.

Exit codes: 0 success, 1 runtime error (bad data, failed stage), 2 usage error (unknown
command or option). `IMER_DEBUG=1` shows the traceback of a runtime error.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from typing import Callable

from flows.stages import STAGE_MODULES, run_named_stage, stage_module  # noqa: F401

# Subcommands that own their argument parsing: name -> (module with main(argv) -> int, help line).
DELEGATES: dict[str, tuple[str, str]] = {
    "servers": ("flows.servers", "start, stop or show the local Prefect and MLflow servers"),
    "repro": ("flows.repro", "dvc repro with one local Prefect API for all stages"),
    "predict": ("flows.predict", "predict the emotion of new clips (audio, video, transcript)"),
    "demo": ("flows.demo", "a local web page (127.0.0.1) to try a model on your own clips"),
    "compare": ("flows.compare", "run a matrix of methods x options x seeds x corpus profiles and compare them"),
    "folds": ("flows.folds", "IEMOCAP leave-one-session-out: run the folds or aggregate their metrics"),
}


def version() -> str:
    """The installed distribution's version (the checkout's pyproject when installed -e)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("imer")
    except PackageNotFoundError:
        return "unknown (not installed)"


def run_stage_command(name: str, params_path: str = "params.yaml", prefect: bool | None = None) -> dict:
    """What `imer <stage>` does: the stage in its Prefect flow unless Prefect is switched off."""
    from flows.settings import prefect_enabled

    if prefect is None:
        prefect = prefect_enabled(params_path)
    if not prefect:
        return run_named_stage(name, params_path)
    from flows.stage import run_stage_in_prefect

    return run_stage_in_prefect(name, params_path)


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser: `--version` and one subparser per stage and tool."""
    parser = argparse.ArgumentParser(prog="imer", description=__doc__.splitlines()[0],
                                     epilog="`imer <command> --help` describes each command.")
    parser.add_argument("--version", action="version", version=f"imer {version()}")
    sub = parser.add_subparsers(dest="command", metavar="command", required=True)
    for name, module in STAGE_MODULES.items():
        stage = sub.add_parser(name, help=f"run the {name} stage ({module})",
                               description=f"Run the `{name}` stage ({module}) with its params section, "
                                           "then any further stages named after it, in order.")
        stage.add_argument("more", nargs="*", metavar="stage",
                           help="further stages to run after it, in order")
        stage.add_argument("--params", action="append",
                           help="params file; repeat to overlay later files on earlier ones (default: params.yaml)")
        stage.add_argument("--no-prefect", action="store_true",
                           help="run the bare stage function, no Prefect flow (also IMER_NO_PREFECT=1)")
        stage.set_defaults(handler=_run_stages, parser=stage)
    for name, (module, line) in DELEGATES.items():
        tool = sub.add_parser(name, help=line, add_help=False, prefix_chars="\0",
                              description=f"{line}; `imer {name} --help` lists its options.")
        tool.add_argument("rest", nargs=argparse.REMAINDER)
        tool.set_defaults(handler=_delegate(module))
    return parser


def _run_stages(args: argparse.Namespace) -> int:
    unknown = [s for s in args.more if s not in STAGE_MODULES]
    if unknown:  # a usage error (exit 2), found before any stage runs
        args.parser.error(f"unknown stage(s) {', '.join(unknown)}; choose from {', '.join(STAGE_MODULES)}")
    params_path = ",".join(args.params or ["params.yaml"])
    for stage in [args.command, *args.more]:
        summary = run_stage_command(stage, params_path, prefect=False if args.no_prefect else None)
        print(json.dumps(summary, indent=2, sort_keys=True, default=str))
    return 0


def _delegate(module: str) -> Callable[[argparse.Namespace], int]:
    def handler(args: argparse.Namespace) -> int:
        return int(importlib.import_module(module).main(list(args.rest)) or 0)  # lazy: Prefect/torch only when used
    return handler


def main(argv: list[str] | None = None) -> int:
    """Parse `argv` and run the command; always returns the exit code (help and usage errors included)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help, --version (0) and usage errors (2)
        return int(exc.code or 0)
    try:
        return args.handler(args)
    except SystemExit as exc:  # a delegate's own argparse: its --help or usage error
        if isinstance(exc.code, int) or exc.code is None:
            return exc.code or 0
        print(f"imer {args.command}: error: {exc.code}", file=sys.stderr)  # sys.exit("message")
        return 1
    except KeyboardInterrupt:
        print(f"imer {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # runtime error: one line, the traceback only on request
        if os.environ.get("IMER_DEBUG"):
            raise
        print(f"imer {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
