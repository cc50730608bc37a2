"""Real stage processes: kill -9 leaves no worker behind; two runs on one output do not both work."""
from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml

from pipeline.core.atomic import lock_file_for
from tests.media_factory import good_clips, make_manifest

REPO = Path(__file__).resolve().parents[1]
CMD = [sys.executable, "-m", "features.stage_acoustic"]


def _stage_dir(tmp: Path, n: int, workers: int) -> dict[str, str]:
    """A project dir with `n` real audio clips and params for `imer extract_acoustic`; returns the env."""
    make_manifest(tmp / "data" / "manifest.parquet", good_clips(tmp / "media", n, modalities=("audio",)))
    params = {"extract_acoustic": {"segments": 8, "workers": workers, "chunk_size": 2, "max_failure_share": 0.2, "progress": False}}
    (tmp / "params.yaml").write_text(yaml.safe_dump(params))
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}


def _wait(cond, timeout: float, step: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(step)
    return cond()


def _alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    out = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.NoSuchProcess:
            pass
    return out


@pytest.mark.slow  # ~10 s: real stage, real fork server and pool
def test_sigkill_of_the_stage_takes_its_worker_pool_down(tmp_path):
    env = _stage_dir(tmp_path, 40, workers=2)
    cache = tmp_path / "data" / "cache" / "acoustic"
    stage = subprocess.Popen(CMD, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    parent = psutil.Process(stage.pid)
    descendants: list[psutil.Process] = []
    try:
        # mid-run: the pool is up (fork server + 2 workers) and clips are being written to the cache
        assert _wait(lambda: len(parent.children(recursive=True)) >= 3 and any(cache.rglob("*.npz")), 120), "pool never started"
        descendants = parent.children(recursive=True)
        stage.send_signal(signal.SIGKILL)
        assert stage.wait() == -signal.SIGKILL
        gone = _wait(lambda: not _alive(descendants), 5.0)
        survivors = [(p.pid, " ".join(p.cmdline())[:80]) for p in _alive(descendants)]
        assert gone, f"descendants alive 5 s after kill -9 of the stage: {survivors}"
        assert len(list(cache.rglob("*.npz"))) < 40  # it really was killed mid-run
    finally:  # never leave a pool behind, even when the assertion above failed
        for p in _alive(descendants + (parent.children(recursive=True) if _alive([parent]) else [])):
            p.kill()
        if stage.poll() is None:
            stage.kill()
            stage.wait()
        stage.stdout.close()


@pytest.mark.slow  # ~30 s: three real stage runs on 30 clips
def test_a_second_run_on_the_same_output_says_who_holds_it(tmp_path):
    env = _stage_dir(tmp_path, 30, workers=1)
    lock = lock_file_for(tmp_path / "data" / "features" / "acoustic.arrow")

    def held() -> bool:
        if not lock.exists():
            return False
        with lock.open("rb") as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(fh, fcntl.LOCK_UN)
            return False

    first = subprocess.Popen(CMD, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert _wait(held, 60), "first run never took the lock"
        second = subprocess.run(CMD, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
        assert first.poll() is None, "first run finished before the second started: make the corpus bigger"
        assert second.returncode != 0
        assert f"another run (pid {first.pid}) is writing" in second.stderr and lock.name in second.stderr
        out, err = first.communicate(timeout=180)
        assert first.returncode == 0, err[-2000:]
        assert '"n_present": 30' in out
    finally:
        if first.poll() is None:
            first.kill()
    # the lock dies with its holder: a later run goes through
    again = subprocess.run(CMD, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    assert again.returncode == 0 and '"cache_hits": 30' in again.stdout
