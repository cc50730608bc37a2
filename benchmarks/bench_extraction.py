"""Extraction stage throughput: clips/s, stage overhead, 2-worker speed-up, incremental re-run.

Prints figures only (no asserts). Each measurement runs in a fresh interpreter so
model/openSMILE set-up is paid the way a real stage run pays it.

Targets: stage wall <= 1.15x summed raw extractor time on 1 worker; >= 1.7x
speed-up on 2 workers; a re-run after adding 5 % clips <= 10 % of a full run.

    python -m benchmarks.bench_extraction [--clips acoustic=200,visual=120,textual=300]   (from the repo root)
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

MODALITY_FAMILY = {"acoustic": "audio", "visual": "video", "textual": "text"}


def measure(modality: str, manifest: str, cache: str, workers: int) -> dict:
    """One stage run in this interpreter; returns the runner summary."""
    from features.runner import run_extraction

    out = Path(cache).parent / f"{modality}_{workers}.arrow"
    return run_extraction(modality, manifest, out, cache, {}, workers=workers, max_failure_share=1.0, progress=False)


def _measure_in_subprocess(*args: str) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run([sys.executable, __file__, "--measure", *args], env=env, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def bench_modality(modality: str, n: int, root: Path) -> dict:
    from tests.media_factory import good_clips, make_manifest

    rows = good_clips(root / "media", n, modalities=(MODALITY_FAMILY[modality],))
    n_old = int(round(n * 0.95))
    full = str(make_manifest(root / "full.parquet", rows))
    part = str(make_manifest(root / "part.parquet", rows[:n_old]))
    one = _measure_in_subprocess(modality, full, str(root / "cache1"), "1")
    two = _measure_in_subprocess(modality, full, str(root / "cache2"), "2")
    _measure_in_subprocess(modality, part, str(root / "cache_inc"), "1")
    inc = _measure_in_subprocess(modality, full, str(root / "cache_inc"), "1")
    return {
        "clips": n,
        "clips_per_s_1w": n / one["wall_s"],
        "clips_per_s_2w": n / two["wall_s"],
        "stage_over_raw_1w": one["wall_s"] / one["extract_s"],
        "stage_over_setup_plus_raw_1w": one["wall_s"] / (one["extract_s"] + one["setup_s"]),
        "setup_1w_s": one["setup_s"],
        "stage_over_raw_2w": two["wall_s"] / two["extract_s"],
        "speedup_2w": one["wall_s"] / two["wall_s"],
        "rerun_5pct_share": inc["wall_s"] / one["wall_s"],
        "rerun_new_clips": inc["cache_misses"],
        "wall_1w_s": one["wall_s"],
        "raw_extract_1w_s": one["extract_s"],
        "wall_2w_s": two["wall_s"],
        "wall_rerun_s": inc["wall_s"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--clips", default="acoustic=200,visual=120,textual=300")
    parser.add_argument("--measure", nargs=4, metavar=("MODALITY", "MANIFEST", "CACHE", "WORKERS"))
    args = parser.parse_args()
    if args.measure:
        modality, manifest, cache, workers = args.measure
        print(json.dumps(measure(modality, manifest, cache, int(workers))))
        return
    print(f"cpu cores: {os.cpu_count()}, load avg: {os.getloadavg()}")
    for item in args.clips.split(","):
        modality, n = item.split("=")
        with tempfile.TemporaryDirectory(prefix=f"bench_{modality}_") as tmp:
            res = bench_modality(modality, int(n), Path(tmp))
        print(f"\n[{modality}] {res['clips']} clips")
        print(f"  clips/s: 1 worker {res['clips_per_s_1w']:.1f}, 2 workers {res['clips_per_s_2w']:.1f}")
        print(f"  stage wall / summed raw extract (1 worker): {res['stage_over_raw_1w']:.2f}x (target <= 1.15)"
              f"  [{res['wall_1w_s']:.1f} s vs {res['raw_extract_1w_s']:.1f} s]")
        print(f"  stage wall / (extractor set-up + summed raw extract) (1 worker): {res['stage_over_setup_plus_raw_1w']:.2f}x"
              f"  [set-up {res['setup_1w_s']:.1f} s]")
        print(f"  speed-up 2 workers: {res['speedup_2w']:.2f}x (target >= 1.7)")
        print(f"  re-run after +5 % clips ({res['rerun_new_clips']} new): {res['rerun_5pct_share']:.1%} of full (target <= 10 %)")
        print("  " + json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in res.items()}))


if __name__ == "__main__":
    main()
