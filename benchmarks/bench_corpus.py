"""Time the generation of the full default corpus at a few worker counts; report peak RSS.

Each run is a fresh subprocess (`python -m pipeline.corpus`-equivalent) whose process
tree is sampled with psutil, so the RSS figure includes the pool workers.

    python benchmarks/bench_corpus.py [--workers 1 2] [--out /tmp/imer_bench_corpus] [--keep]
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import yaml

CHILD = """
import json, sys
from pathlib import Path
from pipeline.corpus import generate_corpus
params = json.loads(sys.argv[1])
summary = generate_corpus(params, Path(sys.argv[2]), progress=False)
print(json.dumps({"utterances": summary["counts"]["utterances"], "audio_s": summary["counts"]["total_duration_s"]}))
"""


def tree_rss(proc: psutil.Process) -> int:
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def run_once(params: dict, out: Path, workers: int) -> dict:
    if out.exists():
        shutil.rmtree(out)
    params = {**params, "workers": workers}
    started = time.perf_counter()
    proc = psutil.Popen([sys.executable, "-c", CHILD, json.dumps(params), str(out)], stdout=subprocess.PIPE, text=True)
    peak = 0
    while proc.poll() is None:
        peak = max(peak, tree_rss(proc))
        time.sleep(0.2)
    elapsed = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"generation with {workers} workers failed (rc={proc.returncode})")
    result = json.loads(proc.stdout.read().strip().splitlines()[-1])
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    return {"workers": workers, "wall_s": round(elapsed, 1), "clips_per_s": round(result["utterances"] / elapsed, 2),
            "peak_rss_mib": round(peak / 2**20, 1), "corpus_mib": round(size / 2**20, 1), **result}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "imer_bench_corpus")
    parser.add_argument("--keep", action="store_true", help="keep the last corpus (e.g. for calibrate_corpus.py)")
    args = parser.parse_args()
    params = yaml.safe_load(Path("params.yaml").read_text())["corpus"]
    print(f"cores available: {psutil.cpu_count()}, load average: {psutil.getloadavg()}")
    for workers in args.workers:
        print(json.dumps(run_once(params, args.out, workers)))
    if not args.keep:
        shutil.rmtree(args.out, ignore_errors=True)


if __name__ == "__main__":
    main()
