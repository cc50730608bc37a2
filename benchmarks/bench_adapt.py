"""Source-free adaptation methods on a shifted project tree: WA on shifted_test per method and seed.

Run in a project tree built with `corpus.shifted_domain: true` (dvc repro, or
`dvc exp run -S corpus.shifted_domain=true`): the source model is its models/model.pt, never
written. Prints one line per (method, seed) and writes a JSON with per-combination, natural
and MR scores, gate decisions, source-val forgetting and time. No MLflow, no registration.

    cd <shifted project> && python -m benchmarks.bench_adapt --seeds 20261126 20261127 20261128
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import yaml

METHODS = ("none", "input_stats", "tent", "casp_contrastive", "casp")


def main() -> None:
    from pipeline.adaptation.config import AdaptConfig
    from pipeline.adaptation.run import run_adaptation

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--seeds", type=int, nargs="+", default=[20261126])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--out", default="benchmarks/results/adapt.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    base = yaml.safe_load(Path(args.params).read_text())["adapt"]
    out = {}
    for seed in args.seeds:
        for method in args.methods:
            where = f"runs/bench_adapt/s{seed}/{method}"
            cfg = AdaptConfig.from_params({**base, "method": method, "seed": seed, "log_mlflow": False,
                                           "out_dir": f"{where}/adapted", "metrics": f"{where}/adapt_metrics.json",
                                           "reports_dir": f"{where}/adapt"})
            r = run_adaptation(cfg)
            st = r["shifted_test"]
            row = {"status": r["status"], "reasons": r["gate"]["reasons"],
                   "natural": st["natural"]["adapted"]["wa"], "natural_src": st["natural"]["source"]["wa"],
                   "fixed": {c: v["adapted"]["wa"] for c, v in st["fixed"].items()},
                   "fixed_src": {c: v["source"]["wa"] for c, v in st["fixed"].items()},
                   "mr": {k: v["adapted"]["wa"] for k, v in st["random"].items()},
                   "mr_src": {k: v["source"]["wa"] for k, v in st["random"].items()},
                   "delta_fixed_mean_ci": st["fixed"]["mean"]["delta_ci95"]["wa"],
                   "src_val_drop_pts": r["source_val"]["drop_points"], "adapt_s": r["adapt_time_s"],
                   "params": r["adapted_parameters"]}
            out[f"{method}/{seed}"] = row
            print(f"{method:>16} seed {seed}: {row['status']:>12}  natural {row['natural_src']:.3f} -> "
                  f"{row['natural']:.3f}  fixed mean {row['fixed_src']['mean']:.3f} -> {row['fixed']['mean']:.3f}  "
                  f"source-val drop {row['src_val_drop_pts']:.2f} pts  {row['adapt_s']:.0f} s", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
