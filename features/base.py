"""The contract every modality extractor follows, and the clip-level error it raises.

An extractor turns one media file into a fixed-shape `ClipFeatures`. Bad input is not
an exception to swallow: it raises `ClipError` with a short machine-readable `reason`
(e.g. `silent_audio`), which the runner turns into `present=False` for that clip.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from pipeline.core.params import config_hash as _hash


class ClipError(Exception):
    """One clip cannot give features; `reason` is a short code, the message names the file."""

    def __init__(self, reason: str, path: str | Path, detail: str) -> None:
        self.reason = reason
        self.path = str(path)
        self.detail = detail
        super().__init__(f"{self.path}: {reason}: {detail}")


@dataclass
class ClipFeatures:
    """Features of one clip: `sequence` (T, d) float32 padded with zeros past `length`."""

    sequence: np.ndarray  # (T, d) float32
    length: int
    summary: np.ndarray  # (d_s,) float32
    extras: dict[str, float] = field(default_factory=dict)  # per-clip diagnostics (e.g. face rate)


def pool_segments(frames: np.ndarray, segments: int, stats: Sequence[str] = ("mean",)) -> tuple[np.ndarray, int]:
    """Pool (n, f) frame rows into `segments` contiguous time segments.

    Returns a (segments, f * len(stats)) array and the number of non-empty segments.
    With fewer frames than segments each frame is its own segment and the tail stays
    zero, so `length` tells the model how many steps are real.
    """
    n, f = frames.shape
    out = np.zeros((segments, f * len(stats)), dtype=np.float32)
    if n == 0:
        return out, 0
    if n < segments:
        bounds = np.arange(n + 1)
    else:
        bounds = np.linspace(0, n, segments + 1).round().astype(int)
    length = len(bounds) - 1
    for i in range(length):
        seg = frames[bounds[i] : bounds[i + 1]]  # (n_i, f)
        parts = [seg.mean(axis=0) if s == "mean" else seg.std(axis=0) for s in stats]
        out[i] = np.concatenate(parts)
    return out, length


class Extractor(ABC):
    """Base class: config in, `extract(path) -> ClipFeatures` out; heavy state built in `setup()`."""

    modality: str = ""
    version: int = 1  # bump when the code changes the numbers; part of the cache key
    preload: tuple[str, ...] = ()  # heavy modules a worker pool may import once up front

    defaults: dict[str, Any] = {}  # every accepted config key with its default

    def __init__(self, config: dict[str, Any]) -> None:
        unknown = sorted(set(config) - set(self.defaults))
        if unknown:
            raise ValueError(f"{self.modality} extractor: unknown config keys {unknown}; known: {sorted(self.defaults)}")
        self.config = {**self.defaults, **config}
        self._ready = False

    @property
    def config_hash(self) -> str:
        """Hash of (modality, code version, config): the cache key and the table's recipe id."""
        return _hash({"modality": self.modality, "version": self.version, "config": self.config})

    def recipe(self) -> dict[str, Any]:
        """The extractor description stored in the table metadata."""
        return {"modality": self.modality, "version": self.version, **self.config}

    def ensure_setup(self) -> None:
        """Run `setup()` once per process (openSMILE objects, cascades, models are not shared)."""
        if not self._ready:
            self.setup()
            self._ready = True

    def setup(self) -> None:  # noqa: B027 - optional hook
        """Build heavy state lazily; default: nothing to build."""

    @property
    @abstractmethod
    def seq_shape(self) -> tuple[int, int]:
        """(T, d) of `ClipFeatures.sequence`."""

    @property
    @abstractmethod
    def feature_names(self) -> list[str]:
        """Names of the d sequence features."""

    @property
    @abstractmethod
    def summary_names(self) -> list[str]:
        """Names of the d_s summary features."""

    @abstractmethod
    def extract(self, path: Path) -> ClipFeatures:
        """Features of one clip; raises ClipError for bad input."""

    def extract_many(self, paths: Sequence[Path]) -> list[ClipFeatures | Exception]:
        """Extract several clips; per clip a result or the exception it raised.

        Extractors that gain from batching (the text encoder) override this.
        """
        results: list[ClipFeatures | Exception] = []
        for path in paths:
            try:
                results.append(self.extract(Path(path)))
            except Exception as exc:  # noqa: BLE001 - the runner classifies it
                results.append(exc)
        return results
