"""The records an extraction passes around: what a worker builds, what it is given, what it returns.

All are small and picklable, so any executor (the local pool, Prefect task mapping,
a Dask cluster) can carry them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


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
    path: str  # absolute as listed (symlinks not resolved), so workers with another cwd still find it
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


def absent(uid: str, reason: str, message: str) -> ClipOutcome:
    """The outcome of a clip with no file to extract (missing data, not an extractor failure)."""
    return ClipOutcome(uid, None, False, reason, message)
