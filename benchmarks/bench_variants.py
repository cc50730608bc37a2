"""Methods and ablations on one data tree: test WA per combination, mean +- std over seeds.

Rows: plain, no_specific, uniform-DPFT and full MCULoRA; MPLMM (imer and mult backbones, and
its type-prompt ablation); Wander (and its rank-one CP ablation); CGGM on MCULoRA / plain.

Trains every (variant, seed) on an already-built project tree (manifest, feature tables
and splits from `dvc repro` on the default corpus), selects on validation as the train
stage does, evaluates the selected checkpoint once on test, and prints mean +- std over
seeds per combination and for the 7-combination mean. Runs go to a process pool (one
torch thread each). No MLflow: this compares methods, it does not register models.

    python -m benchmarks.bench_variants --project /tmp/full --seeds 1 2 3 --jobs 2
"""
from __future__ import annotations

import argparse
import copy
import json
import multiprocessing as mp
import resource
import time
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.modalities import COMBINATIONS
from pipeline.core.params import load_params

VARIANTS: dict[str, dict[str, Any]] = {
    "plain": {"variant": "plain"},
    "no_specific": {"variant": "no_specific", "dpft": {"mode": "uniform"}},
    "mculora_uniform": {"variant": "mculora", "dpft": {"mode": "uniform"}},
    "mculora": {"variant": "mculora", "dpft": {"mode": "separability"}},
    "mplmm": {"method": "mplmm"},
    "mplmm_type_zero": {"method": "mplmm", "mplmm": {"type_prompt_init": "zero"}},
    "mplmm_mult": {"method": "mplmm", "mplmm": {"backbone": "mult"}},
    "wander": {"method": "wander"},
    "wander_cp1": {"method": "wander", "wander": {"cp_rank": 1}},
    "mculora_cggm": {"variant": "mculora", "cggm": {"enabled": True}},
    "mculora_uniform_cggm": {"variant": "mculora", "dpft": {"mode": "uniform"}, "cggm": {"enabled": True}},
    "plain_cggm": {"variant": "plain", "cggm": {"enabled": True}},
}


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in over.items():
        out[key] = _merge(out.get(key, {}), value) if isinstance(value, dict) else value
    return out


def run_one(project: str, name: str, seed: int, out_root: str, params_path: str) -> dict[str, Any]:
    """Train one variant with one seed and evaluate it once; returns its test/val scores and timings."""
    from pipeline.training.data import MultimodalData
    from pipeline.evaluate import evaluate_model
    from pipeline.train import train_model

    root = Path(project)
    base = load_params("train", params_path)
    params = _merge(base, {**VARIANTS[name], "seed": seed})
    params["mlflow"] = {"enabled": False}
    splits = root / base["splits_dir"]
    data = MultimodalData.load(root / base["manifest"], root / base["features_dir"], splits)
    out = Path(out_root) / f"{name}-{seed}"
    t0 = time.perf_counter()
    summary = train_model(data, params, out)
    t1 = time.perf_counter()
    result = evaluate_model(out / "models" / "model.pt", data, splits)
    test, val = result["metrics"]["test"]["fixed"], result["metrics"]["val"]["fixed"]
    return {
        "variant": name, "seed": seed, "train_s": t1 - t0, "epochs": summary["epochs_run"],
        "s_per_epoch": (t1 - t0) / max(1, summary["epochs_run"]), "parameter_counts": summary["parameter_counts"],
        "best_epoch": summary["best_epoch"], "val_mean": val["mean"]["wa"],
        "test": {c: test[c]["wa"] for c in [*COMBINATIONS, "mean"]},
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def _star(args: tuple) -> dict[str, Any]:
    return run_one(*args)


def summarise(rows: list[dict[str, Any]]) -> dict[str, dict[str, list[float]]]:
    """variant -> combination -> [mean, std] of test WA over seeds (std with ddof=1)."""
    table: dict[str, dict[str, list[float]]] = {}
    for name in VARIANTS:
        mine = [r for r in rows if r["variant"] == name]
        if not mine:
            continue
        table[name] = {}
        for c in [*COMBINATIONS, "mean"]:
            vals = np.array([r["test"][c] for r in mine])
            table[name][c] = [float(vals.mean()), float(vals.std(ddof=1)) if len(vals) > 1 else 0.0]
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--project", required=True, help="project tree with data/manifest, features, splits")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--variants", nargs="+", default=["plain", "no_specific", "mculora_uniform", "mculora"],
                        choices=list(VARIANTS))
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results/variants.json")
    args = parser.parse_args()
    project = str(Path(args.project).resolve())
    params_path = str(Path(args.params).resolve())
    out_root = Path(project) / "bench_variants"
    todo = [(project, v, s, str(out_root), params_path) for s in args.seeds for v in args.variants]
    t0 = time.perf_counter()
    with mp.get_context("spawn").Pool(args.jobs) as pool:
        rows = []
        partial = Path(args.out).with_suffix(".rows.jsonl")  # each finished cell at once: a kill loses nothing
        partial.parent.mkdir(parents=True, exist_ok=True)
        for row in pool.imap_unordered(_star, todo):
            rows.append(row)
            with partial.open("a") as fh:
                fh.write(json.dumps(row) + "\n")
            print(f"{row['variant']:>16} seed {row['seed']}: test WA mean {row['test']['mean']:.3f}  "
                  f"val {row['val_mean']:.3f}  {row['epochs']} epochs in {row['train_s']:.0f} s", flush=True)
    table = summarise(rows)
    header = "variant".ljust(16) + "".join(c.rjust(14) for c in [*COMBINATIONS, "mean"])
    print(header)
    for name, per in table.items():
        print(name.ljust(16) + "".join(f"{m:.3f}+-{s:.3f}".rjust(14) for m, s in per.values()))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"rows": rows, "summary": table, "seeds": args.seeds,
                                          "wall_s": time.perf_counter() - t0}, indent=2))
    print(f"wrote {args.out} ({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
