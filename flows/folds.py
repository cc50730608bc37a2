"""IEMOCAP leave-one-session-out: run the 5 folds and aggregate their metrics.

IEMOCAP has no published validation split; the protocol is 5 folds, each testing
one session (the `splits` stage's `loso` strategy: test = sorted session `fold`,
val = another session, never the test one). The fold result is the unweighted
mean over folds of each per-fold metric (every session counts once, as in the
GCNet/MoMKE tables), with the standard deviation and fold count beside it.

    python -m flows.folds run --folds 0 1 2 3 4 --out reports/loso
    python -m flows.folds aggregate reports/loso/fold*/metrics.json --out reports/loso/metrics.json

With DVC experiments instead (each fold is a tracked experiment on the imported data; params.yaml
declares `data.imports: {iemocap4: data/external/IEMOCAP}`, so stage import@iemocap4 runs once and
is restored from the DVC cache afterwards; README "Benchmark datasets"):

    for k in 0 1 2 3 4; do
      dvc exp run evaluate -n iemocap4-loso$k -S data.dir=data/imported/iemocap4 -S splits.strategy=loso -S splits.fold=$k
      mkdir -p reports/loso/fold$k && cp reports/metrics.json reports/loso/fold$k/
    done
    python -m flows.folds aggregate reports/loso/fold*/metrics.json --out reports/loso/metrics.json

`run` below is the direct path without DVC: pass the dataset's overlay (`--params
params.yaml,configs/iemocap4.yaml`, whose `data.dir` points the stages at the import).

`fold` k tests the k-th session in sorted order (0 -> Ses01 ... 4 -> Ses05).
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

from pipeline.core.atomic import write_json


def _leaves(tree: Any, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], float]:
    if isinstance(tree, dict):
        out: dict[tuple[str, ...], float] = {}
        for key, value in tree.items():
            out.update(_leaves(value, prefix + (str(key),)))
        return out
    if isinstance(tree, (int, float)) and not isinstance(tree, bool) and math.isfinite(float(tree)):
        return {prefix: float(tree)}
    return {}


def _nest(flat: dict[tuple[str, ...], float]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for path, value in sorted(flat.items()):
        node = out
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return out


def aggregate(metric_files: list[str | Path]) -> dict[str, Any]:
    """Per-metric mean and std (population) over folds of nested metrics JSON files.

    A metric missing from some fold (or non-finite there) is left out of the mean
    and listed under "incomplete", so a partial fold is visible, not averaged in.
    """
    if not metric_files:
        raise ValueError("aggregate needs at least one metrics file")
    per_fold = []
    for path in metric_files:
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"{path}: fold metrics not found")
        per_fold.append(_leaves(json.loads(path.read_text())))
    keys = set().union(*per_fold)
    complete = sorted(k for k in keys if all(k in f for f in per_fold))
    mean = {k: sum(f[k] for f in per_fold) / len(per_fold) for k in complete}
    std = {k: math.sqrt(sum((f[k] - mean[k]) ** 2 for f in per_fold) / len(per_fold)) for k in complete}
    return {
        "n_folds": len(per_fold),
        "folds": [str(p) for p in metric_files],
        "mean": _nest(mean),
        "std": _nest(std),
        "incomplete": sorted("/".join(k) for k in keys - set(complete)),
    }


def run_folds(folds: list[int], out_dir: str | Path, params_path: str | Path = "params.yaml") -> dict[str, Any]:
    """For each fold: splits (loso, that fold) -> train -> evaluate; keep each fold's metrics; aggregate.

    The stages run through the same `run_stage` entry as `imer <stage>`, each with a
    params copy whose only change is `splits.strategy: loso` and `splits.fold: k`.
    """
    from flows.stages import run_named_stage
    from pipeline.core.params import load_all_params

    out_dir = Path(out_dir)
    base = load_all_params(params_path)  # overlays (comma-separated) merge here
    metrics_path = Path(base.get("evaluate", {}).get("metrics", "reports/metrics.json"))
    files = []
    from tqdm import tqdm

    for fold in tqdm(folds, desc="LOSO folds", unit="fold", disable=None):  # a bar on a terminal
        params = json.loads(json.dumps(base))
        params.setdefault("splits", {}).update({"strategy": "loso", "fold": int(fold)})
        with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as handle:
            yaml.safe_dump(params, handle, sort_keys=False)
            fold_params = handle.name
        try:
            for stage in ("splits", "train", "evaluate"):
                run_named_stage(stage, fold_params)
        finally:
            Path(fold_params).unlink()
        target = out_dir / f"fold{fold}" / "metrics.json"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(metrics_path, target)
        files.append(target)
    result = aggregate(files)
    write_json(out_dir / "metrics.json", result)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="imer folds", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    agg = sub.add_parser("aggregate", help="mean/std over per-fold metrics.json files")
    agg.add_argument("files", nargs="+")
    agg.add_argument("--out", default=None, help="write the result here (default: print)")
    run = sub.add_parser("run", help="run splits -> train -> evaluate per LOSO fold, then aggregate")
    run.add_argument("--folds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    run.add_argument("--out", default="reports/loso")
    run.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)
    if args.command == "aggregate":
        result = aggregate(args.files)
        if args.out:
            write_json(args.out, result)
    else:
        result = run_folds(args.folds, args.out, args.params)
    print(json.dumps({"n_folds": result["n_folds"], "incomplete": result["incomplete"]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
