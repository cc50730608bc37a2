"""Run a command and report the peak memory of its whole process tree (workers included).

GNU time's max RSS is the largest single process; a stage with a worker pool holds
several at once. This samples the tree every `--interval` seconds and prints the
peak of the summed RSS and of the summed unique set size (USS: memory that would be
freed if the processes exited, i.e. without shared libraries and page cache counted
twice), plus the wall time. Figures only, no thresholds.

    python -m benchmarks.tree_memory -- dvc repro
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import psutil


def _tree(root: psutil.Process) -> list[psutil.Process]:
    try:
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _sample(procs: list[psutil.Process], with_uss: bool) -> tuple[int, int]:
    rss = uss = 0
    for proc in procs:
        try:
            if with_uss:
                info = proc.memory_full_info()
                rss, uss = rss + info.rss, uss + info.uss
            else:
                rss += proc.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return rss, uss


def measure(cmd: list[str], interval: float = 0.5, with_uss: bool = True) -> dict[str, float]:
    """Peak summed RSS / USS (GiB) of `cmd`'s process tree, wall seconds and exit code."""
    t0 = time.perf_counter()
    child = subprocess.Popen(cmd)
    root = psutil.Process(child.pid)
    peak_rss = peak_uss = 0
    while child.poll() is None:
        rss, uss = _sample(_tree(root), with_uss)
        peak_rss, peak_uss = max(peak_rss, rss), max(peak_uss, uss)
        time.sleep(interval)
    return {"wall_s": time.perf_counter() - t0, "peak_tree_rss_gib": peak_rss / 1024**3,
            "peak_tree_uss_gib": peak_uss / 1024**3, "returncode": child.returncode}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--interval", type=float, default=0.5)
    parser.add_argument("--no-uss", action="store_true", help="RSS only (USS reads /proc/*/smaps, costlier)")
    parser.add_argument("cmd", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        parser.error("give the command after --")
    result = measure(cmd, args.interval, not args.no_uss)
    print(json.dumps(result), file=sys.stderr)
    sys.exit(result["returncode"])


if __name__ == "__main__":
    main()
