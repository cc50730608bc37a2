"""Worker side of an extraction: thread limits, the per-process extractor, `extract_chunk`, the pool.

`extract_chunk` is a pure top-level function over picklable `ClipJob`s, so any
executor can run it: the local process pool here, Prefect task mapping or a Dask
cluster through a chunk mapper.

What is cached: features, and `ClipError` failures (decoding, length, silence, face
detection are deterministic functions of the bytes and the config, so re-running
cannot change the verdict). Not cached: OS-level failures (`permission_denied`,
`file_absent`, ... from `pipeline.core.media_paths`: a chmod or a restored file
changes them) and unexpected exceptions (`extractor_error:<Type>`: maybe transient,
maybe a bug fixed without a config change).

Pool workers die with the stage: a worker's parent is the fork server, not the
stage, so each worker both asks the kernel for SIGKILL when its parent dies and
watches the stage process itself (`die_with_stage`).
"""
from __future__ import annotations

import concurrent.futures as cf
import contextlib
import ctypes
import json
import logging
import multiprocessing as mp
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from features.base import ClipError, ClipFeatures, Extractor
from features.cache import load_cached, save_cached
from features.clips import ClipJob, ClipOutcome, ExtractorSpec
from features.registry import build_extractor
from pipeline.core.media_paths import os_error_reason

log = logging.getLogger(__name__)

ChunkMapper = Callable[[Callable[[list[ClipJob]], list[ClipOutcome]], list[list[ClipJob]]], Iterable[list[ClipOutcome]]]
_WORKER_EXTRACTORS: dict[str, Extractor] = {}
_THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS")
PR_SET_PDEATHSIG = 1  # linux/prctl.h
WATCH_INTERVAL_S = 0.5


def limit_threads(n: int) -> None:
    """Cap BLAS, OpenMP, torch and OpenCV threads in this process (cheap; called per chunk).

    Each pool worker is one core's worth of work; letting every worker start a
    full-size BLAS/torch pool on a small machine oversubscribes it badly.
    """
    for var in _THREAD_VARS:
        os.environ[var] = str(n)
    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(limits=n)
    except ImportError:  # pragma: no cover - threadpoolctl ships with scikit-learn
        pass
    if "cv2" in sys.modules:
        sys.modules["cv2"].setNumThreads(n)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(n)
    os.environ["IMER_WORKER_THREADS"] = str(n)


@contextlib.contextmanager
def scoped_thread_limit(n: int) -> Iterator[None]:
    """`limit_threads(n)` for an in-process run, restoring the caller's settings afterwards.

    A 1-worker run is one core's worth of work too (and gives the same numbers as a
    pool), but the calling process (a Prefect flow, a notebook) keeps its own pools.
    """
    env = {v: os.environ.get(v) for v in (*_THREAD_VARS, "IMER_WORKER_THREADS")}
    cv2_before = sys.modules["cv2"].getNumThreads() if "cv2" in sys.modules else None
    torch_before = sys.modules["torch"].get_num_threads() if "torch" in sys.modules else None
    try:
        from threadpoolctl import threadpool_info

        blas_before = threadpool_info()
    except ImportError:  # pragma: no cover
        blas_before = []
    try:
        limit_threads(n)
        yield
    finally:
        for var, val in env.items():
            if val is None:
                os.environ.pop(var, None)
            else:
                os.environ[var] = val
        if "cv2" in sys.modules:
            sys.modules["cv2"].setNumThreads(cv2_before if cv2_before is not None else -1)
        if "torch" in sys.modules:
            sys.modules["torch"].set_num_threads(torch_before or len(os.sched_getaffinity(0)))
        if blas_before:
            from threadpoolctl import threadpool_limits

            for info in blas_before:
                threadpool_limits(limits=info["num_threads"], user_api=info["user_api"])


def extractor_key(modality: str, config: dict[str, Any]) -> str:
    return json.dumps([modality, config], sort_keys=True, default=str)


def worker_extractor(spec: ExtractorSpec, setup: bool = True) -> Extractor:
    """The extractor for `spec`, built once per process; set up (models loaded) once, when `setup`."""
    ext = _WORKER_EXTRACTORS.get(extractor_key(spec.modality, spec.config))
    if ext is None:
        ext = build_extractor(spec.modality, spec.config)
        _WORKER_EXTRACTORS[extractor_key(spec.modality, spec.config)] = ext
    if not setup:
        return ext
    if spec.threads is not None:
        limit_threads(spec.threads)  # before set-up: env vars size pools of libraries loaded by it
    ext.ensure_setup()
    if spec.threads is not None:
        limit_threads(spec.threads)  # again after set-up: torch may have been imported by it
    return ext


def extract_chunk(spec: ExtractorSpec, jobs: list[ClipJob], cache_dir: str | None) -> list[ClipOutcome]:
    """Extract a chunk of clips (cache first); never raises for a bad clip."""
    ext = worker_extractor(spec, setup=False)  # a chunk of cache hits never loads the models
    cache = Path(cache_dir) / ext.config_hash if cache_dir else None
    outcomes: dict[str, ClipOutcome] = {}
    todo: list[ClipJob] = []
    for job in jobs:
        hit = load_cached(cache, job, ext.seq_shape) if cache else None
        if hit is not None:
            outcomes[job.utterance_id] = hit
        else:
            todo.append(job)
    setup_s = 0.0
    if todo:
        start = time.perf_counter()
        worker_extractor(spec)
        setup_s = time.perf_counter() - start  # ~0 once this process has set it up
        start = time.perf_counter()
        results = ext.extract_many([Path(j.path) for j in todo])
        per_clip = (time.perf_counter() - start) / len(todo)
        for job, result in zip(todo, results):
            out, cacheable = to_outcome(job, result, ext)
            out.extract_s = per_clip
            outcomes[job.utterance_id] = out
            if cache is not None and cacheable:
                save_cached(cache, job, out)
    ordered = [outcomes[j.utterance_id] for j in jobs]
    if ordered:
        ordered[0].setup_s = setup_s
    return ordered


def to_outcome(job: ClipJob, result: ClipFeatures | Exception, ext: Extractor) -> tuple[ClipOutcome, bool]:
    """One extractor result as a `ClipOutcome`, and whether it may be cached."""
    if isinstance(result, ClipFeatures):
        problem = _check_features(result, ext)
        if problem is None:
            out = ClipOutcome(
                job.utterance_id, job.content_hash, True, sequence=result.sequence.astype(np.float32),
                length=int(result.length), summary=result.summary.astype(np.float32), extras=dict(result.extras),
            )
            return out, True
        result = RuntimeError(problem)
    if isinstance(result, ClipError):
        return ClipOutcome(job.utterance_id, job.content_hash, False, result.reason, str(result), extraction_failure=True), True
    if isinstance(result, OSError):  # the file changed under us since planning: named, not cached
        reason = os_error_reason(result)
        detail = result.strerror or str(result)
        return ClipOutcome(job.utterance_id, job.content_hash, False, reason, f"{job.path}: {reason}: {detail}", extraction_failure=True), False
    reason = f"extractor_error:{type(result).__name__}"
    log.warning("%s: %s: %s", job.path, reason, result, exc_info=result)
    return ClipOutcome(job.utterance_id, job.content_hash, False, reason, f"{job.path}: {reason}: {result}", extraction_failure=True), False


def _check_features(feats: ClipFeatures, ext: Extractor) -> str | None:
    t, d = ext.seq_shape
    if feats.sequence.shape != (t, d):
        return f"sequence shape {feats.sequence.shape} != {(t, d)}"
    if feats.summary.shape != (len(ext.summary_names),):
        return f"summary shape {feats.summary.shape} != ({len(ext.summary_names)},)"
    if not 0 < feats.length <= t:
        return f"length {feats.length} outside (0, {t}]"
    if not (np.isfinite(feats.sequence).all() and np.isfinite(feats.summary).all()):
        return "non-finite feature values"
    return None


# ---------------------------------------------------------------- the local pool


def _start_time(pid: int) -> str | None:
    """The kernel's start time of `pid` (None once it is gone or a zombie): tells pid reuse apart."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] in ("Z", "X") else fields[19]


def die_with_stage(stage_pid: int) -> None:
    """Pool initializer: end this worker when the stage process ends, however it ends (kill -9 too).

    1. PR_SET_PDEATHSIG: the kernel sends SIGKILL when the parent (the fork server) exits.
    2. A daemon thread polls the stage itself: the fork server may outlive the stage.
    """
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    born = _start_time(stage_pid)

    def watch() -> None:
        while born is not None and _start_time(stage_pid) == born:
            time.sleep(WATCH_INTERVAL_S)
        os.kill(os.getpid(), signal.SIGKILL)

    if Path("/proc/self/stat").exists():
        threading.Thread(target=watch, name="imer-die-with-stage", daemon=True).start()
    elif os.getppid() == 1:  # no /proc: at least catch a parent already gone
        os.kill(os.getpid(), signal.SIGKILL)


def local_pool_mapper(workers: int, preload: tuple[str, ...] = ()) -> ChunkMapper:
    """Default mapper: in-process for 1 worker, else a local process pool.

    The pool uses forkserver where available: a plain fork of a parent that already
    ran OpenCV or torch threads deadlocks in the child (seen with cv2.setNumThreads),
    while spawn re-imports torch in every worker. The fork server imports `preload`
    once, never runs extractor code, and hands out cheap clean forks.
    """

    def mapper(fn: Callable, chunks: list[list[ClipJob]]) -> Iterable[list[ClipOutcome]]:
        if workers == 1 or len(chunks) <= 1:
            for chunk in chunks:
                yield fn(chunk)
            return
        if "forkserver" in mp.get_all_start_methods():
            ctx = mp.get_context("forkserver")
            ctx.set_forkserver_preload(["features.workers", *preload])  # only effective before its first start
        else:
            ctx = mp.get_context("spawn")
        pool = cf.ProcessPoolExecutor(min(workers, len(chunks)), mp_context=ctx, initializer=die_with_stage, initargs=(os.getpid(),))
        try:
            futures = [pool.submit(fn, chunk) for chunk in chunks]
            for fut in cf.as_completed(futures):
                yield fut.result()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    return mapper
