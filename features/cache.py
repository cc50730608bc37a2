"""The per-clip cache: one `.npz` per clip at `<cache_dir>/<config_hash>/<content_hash>.npz`.

The key is (file bytes, extractor recipe): new clips extract only themselves, a
changed config or extractor version extracts everything again. Entries are written
atomically (a killed worker leaves at most a stray temp file) with the umask's mode.
Deterministic failures (`ClipError`) are cached as well as features; what is cached
is decided by the worker (`features.workers`), not here.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
from pathlib import Path

import numpy as np

from features.clips import ClipJob, ClipOutcome
from pipeline.core.atomic import atomic_path

log = logging.getLogger(__name__)


def file_hash(path: Path) -> str:
    """Hash of the file bytes (blake2b-128): the content half of the cache key. Raises OSError."""
    h = hashlib.blake2b(digest_size=16)
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


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
