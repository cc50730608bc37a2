"""Train-split input statistics: per-feature mean and std of each modality's valid frames."""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from pipeline.core.modalities import MODALITY_ORDER

if TYPE_CHECKING:
    from pipeline.training.data import MultimodalData


def feature_statistics(data: MultimodalData, chunk: int = 512) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per-feature (mean, std) of each modality over the valid frames of the view's present samples.

    Raw features live on wildly different scales (eGeMAPS loudness vs. spectral
    slopes, HOG cells ~1e-2); fitted on the train view only, so no val/test statistic
    leaks into the model. Reads table rows in sorted chunks: MOSEI-size tables stay
    memory-mapped, accumulators are float64.
    """
    pos = data._pos()
    stats = {}
    for j, m in enumerate(MODALITY_ORDER):
        lens = data.lengths[m][pos]
        sel = data.natural[pos, j] & (lens > 0)
        rows, lens = data.rows[m][pos][sel], lens[sel]
        order = np.argsort(rows, kind="stable")
        rows, lens = rows[order], lens[order]  # ascending table rows: sequential reads
        d = data.features[m].shape[2]
        total, total_sq, count, shift = np.zeros(d), np.zeros(d), 0, None
        for start in range(0, len(rows), chunk):
            x = np.asarray(data.features[m][rows[start:start + chunk]], dtype=np.float64)  # (n, T, d)
            valid = np.arange(x.shape[1])[None, :] < lens[start:start + chunk, None]  # (n, T)
            frames = x[valid]  # (frames, d)
            if shift is None:  # sums of shifted values keep the variance exact for large means
                shift = frames.mean(axis=0)
            frames -= shift
            total += frames.sum(axis=0)
            total_sq += np.square(frames).sum(axis=0)
            count += frames.shape[0]
        if count == 0:
            stats[m] = (np.zeros(d, np.float32), np.ones(d, np.float32))
            continue
        mean = total / count
        std = np.sqrt(np.maximum(total_sq / count - mean**2, 0.0))
        stats[m] = ((mean + shift).astype(np.float32), std.astype(np.float32))
    return stats
