"""Orchestration overhead and Dask scale-out, on a tiny generated corpus.

1. The tiny pipeline (corpus .. evaluate) as DVC runs it, one `imer <stage>` process per
   stage, three ways: bare stage functions (IMER_NO_PREFECT=1), Prefect with the
   temporary server (PREFECT_API_URL unset: each process starts its own), and Prefect
   against one running `prefect server`. Prints per-stage seconds and the ratios.
2. Acoustic extraction through Prefect chunk tasks on a Dask LocalCluster with 2 workers
   vs 1 (fresh cache each): clips per second.

Usage: python benchmarks/bench_orchestration.py [--utterances 48] [--skip-pipeline] [--skip-dask]
Writes benchmarks/results/orchestration.json.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
STAGES = ["corpus", "ingest", "extract_acoustic", "extract_visual", "extract_textual", "feature_report",
          "splits", "train", "evaluate"]


def tiny_params(utterances: int) -> dict:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["corpus"].update({"utterances": utterances, "sessions": 4})
    for m in ("acoustic", "visual", "textual"):
        params[f"extract_{m}"]["workers"] = 2
    if "splits" in params:
        params["splits"]["missing_rates"] = [0.0, 0.5]
    if "train" in params:
        params["train"].update({"max_epochs": 2, "batch_size": 16, "mlflow": {"enabled": False}})
    if "evaluate" in params:
        params["evaluate"]["log_mlflow"] = False
    return params


def run_pipeline(workdir: Path, params: dict, env: dict[str, str], stages: list[str] = STAGES) -> dict[str, float]:
    """Each stage as its own `imer <stage>` process (what `dvc repro` does); seconds per stage."""
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    imer = str(Path(sys.executable).parent / "imer")
    times = {}
    for stage in stages:
        start = time.perf_counter()
        proc = subprocess.run([imer, stage], cwd=workdir, env=env, capture_output=True, text=True)
        times[stage] = time.perf_counter() - start
        if proc.returncode != 0:
            raise RuntimeError(f"imer {stage} failed in {workdir}:\n{proc.stderr[-3000:]}")
    return times


def base_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update({"PREFECT_HOME": str(home), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "IMER_NO_PREFECT": "0"})
    return env


def bench_pipeline(tmp: Path, utterances: int) -> dict:
    from flows.servers import free_port, prefect_spec, start_server, stop_server

    params = tiny_params(utterances)
    out: dict[str, dict[str, float]] = {}
    out["bare"] = run_pipeline(tmp / "bare", params, {**base_env(tmp / "h0"), "IMER_NO_PREFECT": "1"})
    out["prefect_temporary_server"] = run_pipeline(tmp / "temp", params, base_env(tmp / "h1"))
    record = start_server(prefect_spec(free_port(), tmp / "h2", scheduler=False), tmp / "run")
    try:
        out["prefect_running_server"] = run_pipeline(tmp / "server", params,
                                                     {**base_env(tmp / "h3"), "PREFECT_API_URL": record["url"]})
    finally:
        stop_server(tmp / "run", "prefect")
    totals = {mode: sum(t.values()) for mode, t in out.items()}
    print(f"\n{'stage':18s}" + "".join(f"{m:>26s}" for m in out))
    for stage in STAGES:
        print(f"{stage:18s}" + "".join(f"{out[m][stage]:26.1f}" for m in out))
    print(f"{'total':18s}" + "".join(f"{totals[m]:26.1f}" for m in out))
    n = len(STAGES)
    summary = {
        "per_stage_s": out, "total_s": totals,
        "ratio_temporary_vs_bare": totals["prefect_temporary_server"] / totals["bare"],
        "ratio_running_server_vs_bare": totals["prefect_running_server"] / totals["bare"],
        "overhead_per_stage_temporary_s": (totals["prefect_temporary_server"] - totals["bare"]) / n,
        "overhead_per_stage_running_server_s": (totals["prefect_running_server"] - totals["bare"]) / n,
    }
    print(json.dumps({k: v for k, v in summary.items() if k != "per_stage_s"}, indent=2))
    return summary


def bench_dask(tmp: Path, utterances: int) -> dict:
    """Acoustic extraction on a Dask LocalCluster, 1 vs 2 workers, fresh caches."""
    from flows.api import shared_api
    from flows.stage import flow_for_stage

    corpus_dir = tmp / "dask-corpus"
    run_pipeline(corpus_dir, tiny_params(utterances), {**base_env(tmp / "h0"), "IMER_NO_PREFECT": "1"},
                 stages=["corpus", "ingest"])
    os.chdir(corpus_dir)  # manifest paths are relative to the project directory
    params = tiny_params(utterances)
    results = {}
    os.environ.update({"PREFECT_HOME": str(tmp / "hd"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"})
    with shared_api():
        for workers in (1, 2):
            params["extract_acoustic"].update({
                "manifest": str(corpus_dir / "data" / "manifest.parquet"), "progress": False,
                "out": str(tmp / f"dask{workers}" / "acoustic.arrow"), "cache_dir": str(tmp / f"dask{workers}" / "cache"),
                "chunk_size": 4})
            params["orchestration"] = {**params.get("orchestration", {}), "extraction_runner": "dask",
                                       "dask_workers": workers}
            path = tmp / f"dask{workers}.yaml"
            path.write_text(yaml.safe_dump(params, sort_keys=False))
            start = time.perf_counter()
            summary = flow_for_stage("extract_acoustic", str(path))(stage="extract_acoustic", params_path=str(path))
            wall = time.perf_counter() - start
            results[workers] = {"wall_s": wall, "clips": summary["n_with_file"],
                                "clips_per_s": summary["n_with_file"] / wall}
    speedup = results[1]["wall_s"] / results[2]["wall_s"]
    print(f"\nDask extraction (acoustic, {results[1]['clips']} clips, incl. cluster start): "
          f"1 worker {results[1]['clips_per_s']:.2f} clips/s, 2 workers {results[2]['clips_per_s']:.2f} clips/s, "
          f"speed-up {speedup:.2f}x (cores: {os.cpu_count()})")
    return {"workers": results, "speedup_2_vs_1": speedup, "cpu_count": os.cpu_count()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--utterances", type=int, default=48)
    parser.add_argument("--dask-utterances", type=int, default=96)
    parser.add_argument("--skip-pipeline", action="store_true")
    parser.add_argument("--skip-dask", action="store_true")
    args = parser.parse_args()
    report: dict = {"utterances": args.utterances}
    with tempfile.TemporaryDirectory(prefix="imer-bench-orch-") as tmp:
        if not args.skip_pipeline:
            report["pipeline"] = bench_pipeline(Path(tmp), args.utterances)
        if not args.skip_dask:
            report["dask"] = bench_dask(Path(tmp), args.dask_utterances)
    os.chdir(ROOT)
    out = ROOT / "benchmarks" / "results" / "orchestration.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=str))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
