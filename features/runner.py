"""The generic extraction stage: manifest -> per-clip cached extraction -> one feature table.

Design
- `extract_chunk` is a pure top-level function over picklable `ClipJob`s, so any
  executor can run it: the local process pool here, Prefect task mapping or a Dask
  cluster through `chunk_mapper`.
- Cache: one `.npz` per clip at `<cache_dir>/<config_hash>/<content_hash>.npz`, written
  atomically. The key is (file bytes, extractor recipe): new clips extract only
  themselves, a changed config or extractor version extracts everything again.
- `ClipError` failures are cached too: every check behind them (decoding, length,
  silence, face detection) is a deterministic function of the bytes and the config,
  so re-running cannot change the verdict. Unexpected exceptions
  (`extractor_error:<Type>`) are NOT cached: they may be transient (memory, I/O) or a
  bug fixed without a config change.
- Failure share: only clips whose file exists count (denominator) and only their
  extraction failures (numerator). A clip absent by design (manifest `*_missing`, no
  path, file absent) is missing data, not an extractor failure; it still gets a row.
- Above `max_failure_share` the failure report is written, then the stage raises and
  the previous table (if any) is left untouched.
"""
from __future__ import annotations

import concurrent.futures as cf
import contextlib
import functools
import hashlib
import io
import json
import logging
import multiprocessing as mp
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from features.base import ClipError, ClipFeatures, Extractor
from features.registry import MANIFEST_MODALITY, build_extractor
from pipeline.atomic import atomic_path, write_json
from pipeline.feature_table import FeatureTable, build_meta, write_feature_table
from pipeline.manifest import read_manifest

log = logging.getLogger(__name__)

ChunkMapper = Callable[[Callable[[list["ClipJob"]], list["ClipOutcome"]], list[list["ClipJob"]]], Iterable[list["ClipOutcome"]]]
RUNNER_KEYS = frozenset({"workers", "max_failure_share", "chunk_size", "manifest", "out", "cache_dir", "progress"})


class ExtractionFailed(ValueError):
    """Too many clips failed extraction; the message lists counts per reason."""


@dataclass(frozen=True)
class ExtractorSpec:
    """Everything a worker needs to build the extractor itself (picklable, no heavy state)."""

    modality: str
    config: dict[str, Any]
    threads: int | None = 1  # BLAS/torch/OpenCV threads in the worker; None = leave as is


@dataclass(frozen=True)
class ClipJob:
    utterance_id: str
    path: str  # absolute, so workers with another cwd still find it
    content_hash: str


@dataclass
class ClipOutcome:
    utterance_id: str
    content_hash: str | None
    present: bool
    failure_reason: str | None = None
    message: str | None = None
    sequence: np.ndarray | None = None  # (T, d) float32
    length: int = 0
    summary: np.ndarray | None = None  # (d_s,) float32
    extras: dict[str, float] = field(default_factory=dict)
    cache_hit: bool = False
    extract_s: float = 0.0  # share of time spent inside the extractor (0 for cache hits)
    setup_s: float = 0.0  # extractor set-up (model load) paid by the chunk that built it; on its first clip
    extraction_failure: bool = False  # True only for a failed clip whose file exists


# ---------------------------------------------------------------- worker side

_WORKER_EXTRACTORS: dict[str, Extractor] = {}
_THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS")


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


def _extractor_key(modality: str, config: dict[str, Any]) -> str:
    return json.dumps([modality, config], sort_keys=True, default=str)


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


def worker_extractor(spec: ExtractorSpec, setup: bool = True) -> Extractor:
    """The extractor for `spec`, built once per process; set up (models loaded) once, when `setup`."""
    ext = _WORKER_EXTRACTORS.get(_extractor_key(spec.modality, spec.config))
    if ext is None:
        ext = build_extractor(spec.modality, spec.config)
        _WORKER_EXTRACTORS[_extractor_key(spec.modality, spec.config)] = ext
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
            out = _to_outcome(job, result, ext)
            out.extract_s = per_clip
            outcomes[job.utterance_id] = out
            if cache is not None and (out.present or not out.failure_reason.startswith("extractor_error")):
                save_cached(cache, job, out)
    ordered = [outcomes[j.utterance_id] for j in jobs]
    if ordered:
        ordered[0].setup_s = setup_s
    return ordered


def _to_outcome(job: ClipJob, result: ClipFeatures | Exception, ext: Extractor) -> ClipOutcome:
    if isinstance(result, ClipFeatures):
        problem = _check_features(result, ext)
        if problem is None:
            return ClipOutcome(
                job.utterance_id, job.content_hash, True, sequence=result.sequence.astype(np.float32),
                length=int(result.length), summary=result.summary.astype(np.float32), extras=dict(result.extras),
            )
        result = RuntimeError(problem)
    if isinstance(result, ClipError):
        return ClipOutcome(job.utterance_id, job.content_hash, False, result.reason, str(result), extraction_failure=True)
    reason = f"extractor_error:{type(result).__name__}"
    log.warning("%s: %s: %s", job.path, reason, result, exc_info=result)
    return ClipOutcome(job.utterance_id, job.content_hash, False, reason, f"{job.path}: {reason}: {result}", extraction_failure=True)


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


def cache_file(cache: Path, job: ClipJob) -> Path:
    return cache / f"{job.content_hash}.npz"


def save_cached(cache: Path, job: ClipJob, out: ClipOutcome) -> None:
    """Write one cache entry atomically (a killed worker leaves only a stray temp file)."""
    if out.present:
        payload = {"sequence": out.sequence, "length": np.int64(out.length), "summary": out.summary, "extras": np.array(json.dumps(out.extras))}
    else:
        # the message names the file; keep only the path-free detail so equal bytes elsewhere reuse it
        detail = out.message.split(f"{out.failure_reason}: ", 1)[-1] if out.message else ""
        payload = {"failure_reason": np.array(out.failure_reason), "detail": np.array(detail)}
    buf = io.BytesIO()
    np.savez(buf, **payload)
    with atomic_path(cache_file(cache, job)) as tmp:
        tmp.write_bytes(buf.getvalue())


def load_cached(cache: Path, job: ClipJob, seq_shape: tuple[int, int]) -> ClipOutcome | None:
    """The cached outcome of `job`, or None on a miss or an unreadable/mismatched entry."""
    path = cache_file(cache, job)
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            if "failure_reason" in z:
                reason = str(z["failure_reason"])
                return ClipOutcome(job.utterance_id, job.content_hash, False, reason, f"{job.path}: {reason}: {z['detail']}", cache_hit=True, extraction_failure=True)
            seq = z["sequence"]
            if seq.shape != tuple(seq_shape):
                return None
            return ClipOutcome(
                job.utterance_id, job.content_hash, True, sequence=seq, length=int(z["length"]), summary=z["summary"],
                extras=json.loads(str(z["extras"])), cache_hit=True,
            )
    except Exception as exc:  # noqa: BLE001 - a damaged entry is just a miss
        log.warning("%s: ignoring unreadable cache entry (%s)", path, exc)
        return None


# ---------------------------------------------------------------- driver side


def file_hash(path: Path) -> str:
    """Hash of the file bytes (blake2b-128): the content half of the cache key."""
    h = hashlib.blake2b(digest_size=16)
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


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
            ctx.set_forkserver_preload(["features.runner", *preload])  # only effective before its first start
        else:
            ctx = mp.get_context("spawn")
        pool = cf.ProcessPoolExecutor(min(workers, len(chunks)), mp_context=ctx)
        try:
            futures = [pool.submit(fn, chunk) for chunk in chunks]
            for fut in cf.as_completed(futures):
                yield fut.result()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    return mapper


def _absent(uid: str, reason: str, message: str) -> ClipOutcome:
    return ClipOutcome(uid, None, False, reason, message)


def plan_jobs(modality: str, manifest_path: str | Path) -> tuple[list[str], list[ClipJob], dict[str, ClipOutcome]]:
    """Manifest rows -> (all ids in order, jobs for existing files, outcomes for absent ones)."""
    table, _ = read_manifest(manifest_path)
    family = MANIFEST_MODALITY[modality]
    ids = [str(u) for u in table.column("utterance_id").to_pylist()]
    paths = table.column(f"{family}_path").to_pylist()
    missing = table.column(f"{family}_missing").to_pylist()
    jobs: list[ClipJob] = []
    absent: dict[str, ClipOutcome] = {}
    for uid, raw, why in zip(ids, paths, missing):
        if why:
            absent[uid] = _absent(uid, str(why), f"{uid}: {family} missing in manifest ({why})")
        elif not raw:
            absent[uid] = _absent(uid, "no_path", f"{uid}: no {family} path in manifest")
        else:
            path = Path(raw).resolve()
            if not path.is_file():
                absent[uid] = _absent(uid, "file_absent", f"{path}: file_absent: no such file")
            else:
                jobs.append(ClipJob(uid, str(path), file_hash(path)))
    return ids, jobs, absent


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
    from tqdm import tqdm

    wall = time.perf_counter()
    workers = int(workers) or len(os.sched_getaffinity(0)) or 1
    ids, jobs, outcomes = plan_jobs(modality, manifest_path)
    extractor = build_extractor(modality, config)
    in_process = chunk_mapper is None and workers == 1
    spec = ExtractorSpec(modality, extractor.config, threads=1)
    extractor = _WORKER_EXTRACTORS.setdefault(_extractor_key(modality, extractor.config), extractor)  # in-process chunks reuse its set-up
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
    return _finish(modality, ids, jobs, outcomes, extractor, Path(out_path), max_failure_share, wall, workers)


def _finish(modality, ids, jobs, outcomes, extractor, out_path: Path, max_failure_share, wall, workers) -> dict[str, Any]:
    rows = [outcomes[u] for u in ids]
    failed = [o for o in rows if o.extraction_failure]
    counts = Counter(o.failure_reason for o in rows if not o.present)
    share = len(failed) / len(jobs) if jobs else 0.0
    report_path = out_path.with_name(f"{out_path.stem}.failures.json")
    summary = {
        "modality": modality,
        "out": str(out_path),
        "failures_report": str(report_path),
        "config_hash": extractor.config_hash,
        "n_clips": len(ids),
        "n_with_file": len(jobs),
        "n_present": sum(o.present for o in rows),
        "n_absent": len(ids) - len(jobs),
        "n_extraction_failures": len(failed),
        "failure_share": share,
        "max_failure_share": max_failure_share,
        "counts": dict(sorted(counts.items())),
        "cache_hits": sum(o.cache_hit for o in rows if o.content_hash is not None),
        "cache_misses": sum(not o.cache_hit for o in rows if o.content_hash is not None),
        "extract_s": sum(o.extract_s for o in rows),
        "setup_s": sum(o.setup_s for o in rows),  # extractor set-up, summed over the processes that built one
        "workers": workers,
    }
    report = {
        **summary,
        "clips": [{"utterance_id": o.utterance_id, "reason": o.failure_reason, "message": o.message, "extraction_failure": o.extraction_failure} for o in rows if not o.present],
        "clip_extras": {o.utterance_id: o.extras for o in rows if o.extras},
    }
    write_json(report_path, report)
    if share > max_failure_share:
        detail = ", ".join(f"{r}={n}" for r, n in Counter(o.failure_reason for o in failed).most_common())
        raise ExtractionFailed(
            f"extract_{modality}: {len(failed)} of {len(jobs)} clips with a file failed extraction "
            f"({share:.1%} > max_failure_share {max_failure_share:.1%}): {detail}; per-clip reasons in {report_path}; "
            f"table {out_path} not written"
        )
    t, d = extractor.seq_shape
    names, summary_names = extractor.feature_names, extractor.summary_names
    seq = np.zeros((len(rows), t, d), np.float32)  # (N, T, d)
    summ = np.zeros((len(rows), len(summary_names)), np.float32)  # (N, d_s)
    for i, o in enumerate(rows):
        if o.present:
            seq[i], summ[i] = o.sequence, o.summary
    meta = build_meta(modality, t, d, len(summary_names), names, summary_names, extractor.recipe(), extractor.config_hash)
    meta["failure_counts"] = summary["counts"]
    table = FeatureTable(
        modality=modality,
        utterance_id=np.asarray(ids, dtype=object),
        present=np.array([o.present for o in rows], bool),
        failure_reason=[o.failure_reason for o in rows],
        length=np.array([o.length if o.present else 0 for o in rows], np.int32),
        sequence=seq,
        summary=summ,
        content_hash=[o.content_hash for o in rows],
        meta=meta,
    )
    write_feature_table(out_path, table)
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
