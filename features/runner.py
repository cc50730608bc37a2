"""The generic extraction stage, driver side: manifest -> jobs -> per-clip cached extraction -> one table.

The work is split by concern: `features.clips` (the records passed around),
`features.cache` (the per-clip cache), `features.workers` (thread limits, the
worker's `extract_chunk`, the process pool) and this driver (job planning, the
output lock, the failure report and the table).

Failure routing
- Every per-path operation here (stat, open, hash) and in the workers (open,
  decode) turns an OS-level failure into that clip's missing modality with a named
  reason (`pipeline.core.media_paths`), never into a stage failure.
- Failure share: only clips whose file exists count (denominator) and only their
  extraction failures (numerator). A clip without a file (manifest `*_missing`, no
  path, `file_absent`, `not_a_file`, `symlink_loop`) is missing data, not an
  extractor failure; it still gets a row. A file that exists but cannot be read
  (`permission_denied`, `unreadable_file`) is an extraction failure: a corpus that
  the stage's user cannot read fails the stage by the share rule, with the report.
- Above `max_failure_share` the failure report is written, then the stage raises and
  the previous table (if any) is left untouched.
- One run per output at a time: a second run on the same output stops at once and
  names the run holding the lock (`pipeline.core.atomic.output_lock`).
"""
from __future__ import annotations

import contextlib
import functools
import logging
import os
import time
from pathlib import Path
from typing import Any

from features.cache import file_hash, load_cached
from features.clips import ClipJob, ClipOutcome, ExtractionFailed, ExtractorSpec, absent
from features.registry import MANIFEST_MODALITY, build_extractor
from features.report import finish
from features.workers import _WORKER_EXTRACTORS, ChunkMapper, extract_chunk, extractor_key, local_pool_mapper, scoped_thread_limit
from pipeline.core.atomic import output_lock
from pipeline.core.media_paths import NO_FILE_REASONS, listed_path, os_error_reason, probe_file
from pipeline.formats.manifest import read_manifest

__all__ = ["ClipJob", "ClipOutcome", "ExtractionFailed", "ExtractorSpec", "RUNNER_KEYS", "extract_chunk", "plan_jobs", "run_extraction", "stage_from_params"]

log = logging.getLogger(__name__)
RUNNER_KEYS = frozenset({"workers", "max_failure_share", "chunk_size", "manifest", "out", "cache_dir", "progress"})


def _unusable(uid: str, path: Path, reason: str, detail: str) -> ClipOutcome:
    message = f"{path}: {reason}: {detail}"
    if reason in NO_FILE_REASONS:
        return absent(uid, reason, message)
    return ClipOutcome(uid, None, False, reason, message, extraction_failure=True)


def plan_jobs(modality: str, manifest_path: str | Path) -> tuple[list[str], list[ClipJob], dict[str, ClipOutcome]]:
    """Manifest rows -> (all ids in order, jobs for readable files, outcomes for the rest).

    Never raises for one clip's path: a stat, open or hash failure becomes that clip's outcome.
    """
    table, _ = read_manifest(manifest_path)
    family = MANIFEST_MODALITY[modality]
    ids = [str(u) for u in table.column("utterance_id").to_pylist()]
    paths = table.column(f"{family}_path").to_pylist()
    missing = table.column(f"{family}_missing").to_pylist()
    jobs: list[ClipJob] = []
    outcomes: dict[str, ClipOutcome] = {}
    cwd = Path.cwd()
    for uid, raw, why in zip(ids, paths, missing):
        if why:
            outcomes[uid] = absent(uid, str(why), f"{uid}: {family} missing in manifest ({why})")
            continue
        if not raw:
            outcomes[uid] = absent(uid, "no_path", f"{uid}: no {family} path in manifest")
            continue
        path = listed_path(str(raw), cwd)
        problem = probe_file(path)
        if problem is None:
            try:
                jobs.append(ClipJob(uid, str(path), file_hash(path)))
                continue
            except OSError as exc:
                problem = os_error_reason(exc), exc.strerror or str(exc)
        outcomes[uid] = _unusable(uid, path, *problem)
    return ids, jobs, outcomes


def run_extraction(
    modality: str,
    manifest_path: str | Path,
    out_path: str | Path,
    cache_dir: str | Path | None,
    config: dict[str, Any],
    workers: int = 0,
    max_failure_share: float = 0.25,
    chunk_mapper: ChunkMapper | None = None,
    chunk_size: int = 16,
    progress: bool = True,
) -> dict[str, Any]:
    """Extract one modality for every manifest row and write the feature table atomically."""
    with output_lock(out_path, f"extract_{modality}"):
        return _run_locked(modality, manifest_path, Path(out_path), cache_dir, config, workers, max_failure_share, chunk_mapper, chunk_size, progress)


def _run_locked(modality, manifest_path, out_path: Path, cache_dir, config, workers, max_failure_share, chunk_mapper, chunk_size, progress) -> dict[str, Any]:
    from tqdm import tqdm

    wall = time.perf_counter()
    workers = int(workers) or len(os.sched_getaffinity(0)) or 1
    ids, jobs, outcomes = plan_jobs(modality, manifest_path)
    n_with_file = len(jobs) + sum(o.extraction_failure for o in outcomes.values())
    extractor = build_extractor(modality, config)
    in_process = chunk_mapper is None and workers == 1
    spec = ExtractorSpec(modality, extractor.config, threads=1)
    extractor = _WORKER_EXTRACTORS.setdefault(extractor_key(modality, extractor.config), extractor)  # in-process chunks reuse its set-up
    cache = Path(cache_dir) / extractor.config_hash if cache_dir else None
    seq_shape = extractor.seq_shape
    pending: list[ClipJob] = []
    for job in jobs:
        hit = load_cached(cache, job, seq_shape) if cache else None
        if hit is not None:
            outcomes[job.utterance_id] = hit
        else:
            pending.append(job)
    chunks = [pending[i : i + chunk_size] for i in range(0, len(pending), max(1, chunk_size))]
    fn = functools.partial(extract_chunk, spec, cache_dir=str(cache_dir) if cache_dir else None)
    mapper = chunk_mapper or local_pool_mapper(workers, extractor.preload)
    scope = scoped_thread_limit(1) if in_process else contextlib.nullcontext()
    with scope, tqdm(total=len(jobs), initial=len(jobs) - len(pending), desc=f"extract {modality}", unit="clip", disable=not progress) as bar:
        for chunk_out in mapper(fn, chunks):
            for out in chunk_out:
                outcomes[out.utterance_id] = out
            bar.update(len(chunk_out))
    lost = [u for u in ids if u not in outcomes]
    if lost:
        raise RuntimeError(f"{modality}: the chunk mapper returned no outcome for {len(lost)} clips (e.g. {lost[:3]})")
    summary = finish(modality, [outcomes[u] for u in ids], n_with_file, extractor, out_path, max_failure_share, workers)
    summary["wall_s"] = time.perf_counter() - wall
    return summary


def stage_from_params(modality: str, params: dict[str, Any], chunk_mapper: ChunkMapper | None = None) -> dict[str, Any]:
    """Resolve a stage's params section into a `run_extraction` call; Prefect/Dask pass their mapper."""
    config = {k: v for k, v in params.items() if k not in RUNNER_KEYS}
    return run_extraction(
        modality,
        manifest_path=params.get("manifest", "data/manifest.parquet"),
        out_path=params.get("out", f"data/features/{modality}.arrow"),
        cache_dir=params.get("cache_dir", f"data/cache/{modality}"),
        config=config,
        workers=int(params.get("workers", 0)),
        max_failure_share=float(params.get("max_failure_share", 0.25)),
        chunk_mapper=chunk_mapper,
        chunk_size=int(params.get("chunk_size", 16)),
        progress=bool(params.get("progress", True)),
    )
