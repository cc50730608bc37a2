"""Extraction as Prefect tasks: one task per chunk of clips, through the runner's `chunk_mapper` hook.

Why chunk tasks: each chunk is retried on its own, its state is visible in the API,
and the same tasks run on any Prefect task runner: the default one here (each task
hands its chunk to a local process pool, so CPU-bound extractors still use every
core) or a Dask cluster through `prefect-dask` (`DaskTaskRunner`).

Failure policy
- A transient I/O error (OSError: NFS hiccup, full disk, cache write race) fails the
  task, and Prefect retries it `chunk_retries` times with the configured delays.
- Any other exception from a chunk is permanent: retrying cannot help, so the task
  returns every clip of the chunk as missing with the reason (`chunk_failed:<Type>`);
  the same happens to a chunk whose retries are exhausted (`io_error:<Type>`). The
  runner then counts them against `max_failure_share`, like any failed clip.
"""
from __future__ import annotations

import concurrent.futures as cf
import multiprocessing as mp
import os
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from features.runner import ClipJob, ClipOutcome, stage_from_params

ChunkFn = Callable[[list[ClipJob]], list[ClipOutcome]]

# Set by `local_process_pool` in the flow process; tasks of the default runner submit to it.
_POOL: cf.ProcessPoolExecutor | None = None


def missing_outcomes(jobs: list[ClipJob], reason: str, detail: str) -> list[ClipOutcome]:
    """Every clip of a lost chunk, marked missing with `reason` (counted as an extraction failure)."""
    return [
        ClipOutcome(j.utterance_id, j.content_hash, False, reason, f"{j.path}: {reason}: {detail}",
                    extraction_failure=True)
        for j in jobs
    ]


def _run_chunk(fn: ChunkFn, jobs: list[ClipJob]) -> list[ClipOutcome]:
    """Run `fn(jobs)` in the local pool when one is open (default runner), else right here (Dask worker)."""
    if _POOL is not None:
        return _POOL.submit(fn, jobs).result()
    return fn(jobs)


@task(name="extract-chunk", retries=2, retry_delay_seconds=[1, 5], cache_policy=NO_CACHE,
      task_run_name="extract-chunk-{index}")
def extract_chunk_task(fn: ChunkFn, jobs: list[ClipJob], index: int) -> list[ClipOutcome]:
    """Extract one chunk; OSError propagates (retried), anything else marks the chunk's clips missing."""
    try:
        return list(_run_chunk(fn, jobs))
    except OSError:
        raise
    except cf.process.BrokenProcessPool:
        raise OSError("local extraction pool broke (a worker died)")  # transient: retry on a fresh pool
    except Exception as exc:  # noqa: BLE001 - permanent: record the reason per clip, lose nothing
        return missing_outcomes(jobs, f"chunk_failed:{type(exc).__name__}", str(exc))


def prefect_chunk_mapper(retries: int = 2, retry_delay_s: list[float] | None = None) -> Callable:
    """A `chunk_mapper` submitting one `extract_chunk_task` per chunk to the current flow's task runner."""
    chunk_task = extract_chunk_task.with_options(
        retries=retries, retry_delay_seconds=list(retry_delay_s or [1, 5]))

    def mapper(fn: ChunkFn, chunks: list[list[ClipJob]]) -> Iterator[list[ClipOutcome]]:
        futures = [chunk_task.submit(fn, chunk, index=i) for i, chunk in enumerate(chunks)]
        for chunk, future in zip(chunks, futures):
            result = future.result(raise_on_failure=False)
            if isinstance(result, BaseException):  # retries exhausted on a transient error
                yield missing_outcomes(chunk, f"io_error:{type(result).__name__}", str(result))
            else:
                yield result

    return mapper


@contextmanager
def local_process_pool(workers: int) -> Iterator[None]:
    """Open the process pool the default runner's chunk tasks use (spawned: the flow process has threads)."""
    global _POOL
    n = workers or os.cpu_count() or 1
    from features.workers import die_with_stage

    # workers die with the stage process, also on kill -9 (no orphan pool holding the stage's stdout)
    pool = cf.ProcessPoolExecutor(n, mp_context=mp.get_context("spawn"), initializer=die_with_stage,
                                  initargs=(os.getpid(),))
    _POOL = pool
    try:
        yield
    finally:
        _POOL = None
        pool.shutdown(wait=True, cancel_futures=True)


def run_extraction_stage(modality: str, params: dict[str, Any], mapper: Callable) -> dict[str, Any]:
    """Run the extraction stage's own code with `mapper` as its chunk mapper."""
    return stage_from_params(modality, params, chunk_mapper=mapper)


def dask_task_runner(address: str | None, workers: int):
    """A DaskTaskRunner on `address`, or on a LocalCluster of `workers` single-thread processes on 127.0.0.1."""
    try:
        from prefect_dask import DaskTaskRunner
    except ImportError as exc:  # the Dask stack is an optional extra
        raise ImportError("orchestration.extraction_runner: dask needs the dask extra: "
                          "pip install -c requirements/lock.txt -e '.[dask]'") from exc

    if address:
        return DaskTaskRunner(address=address)
    return DaskTaskRunner(cluster_kwargs={
        "n_workers": int(workers), "threads_per_worker": 1, "processes": True,
        "host": "127.0.0.1", "dashboard_address": "127.0.0.1:0",
    })


def consume(outcomes: Iterable[list[ClipOutcome]]) -> list[ClipOutcome]:
    """Flatten a mapper's output (tests)."""
    return [o for chunk in outcomes for o in chunk]
