"""The unlabelled adaptation pool: targets replaced by a sentinel, batches read without labels.

`MultimodalData.batch` copies targets along with features; adaptation never calls it on
a pool view directly. `input_batch` reads features through a label-free placeholder, so
the pool's real targets (a `LabelSentinel`, which raises on any read) are never touched.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any, Sequence

import numpy as np
import torch

from pipeline.core.modalities import MODALITY_ORDER, mask_to_index
from pipeline.methods.routing import effective_mask
from pipeline.training.data import MultimodalData


class LabelReadError(RuntimeError):
    """Raised when code reads the targets of an unlabelled pool."""


class LabelSentinel:
    """Stands in for the targets of rows whose labels adaptation must not see; any read raises."""

    def __init__(self, n: int):
        self.n = n
        self.dtype = np.dtype(np.int64)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: Any) -> Any:
        raise LabelReadError("target labels of the unlabelled adaptation pool were read")

    def __array__(self, *args: Any, **kwargs: Any) -> np.ndarray:
        raise LabelReadError("target labels of the unlabelled adaptation pool were read")


def unlabelled(data: MultimodalData) -> MultimodalData:
    """The same view with its targets replaced by a sentinel."""
    return replace(data, target=LabelSentinel(len(data.utterance_id)))


def input_batch(data: MultimodalData, local: np.ndarray) -> dict[str, Any]:
    """Features, lengths and presence of rows `local` in forward() format; no `target` key."""
    blind = replace(data, target=np.zeros(len(data.utterance_id), dtype=np.int64))  # placeholder, not labels
    batch = blind.batch(np.asarray(local, dtype=np.int64))
    batch.pop("target")
    return batch


def usable_mask(batch: dict[str, Any], modalities: Sequence[str] = MODALITY_ORDER) -> np.ndarray:
    """(B, 3) naturally present, non-empty and known to the model (the routing rule's mask)."""
    lens = {m: batch["lengths_natural"][m].numpy() for m in MODALITY_ORDER}
    return effective_mask(batch["natural"].numpy(), lens, np.ones(3, dtype=bool), modalities)


def usable_rows(data: MultimodalData, modalities: Sequence[str] = MODALITY_ORDER) -> np.ndarray:
    """Local indices of the view's samples with at least one usable modality."""
    pos = data._pos()
    lens = {m: data.lengths[m][pos] for m in MODALITY_ORDER}
    eff = effective_mask(data.natural[pos], lens, np.ones(3, dtype=bool), modalities)  # (n, 3)
    return np.flatnonzero(eff.any(axis=1))


def drop_one(usable: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(B, 3) mask: per sample with >= 2 usable modalities, one of them removed uniformly at random."""
    score = rng.random(usable.shape)  # (B, 3)
    score[~usable] = -1.0
    drop = score.argmax(axis=1)  # uniform among the usable ones
    out = usable.copy()
    multi = np.flatnonzero(usable.sum(axis=1) >= 2)
    out[multi, drop[multi]] = False
    return out


def masked_inputs(batch: dict[str, Any], mask: np.ndarray) -> tuple[dict, dict, torch.Tensor, torch.Tensor]:
    """(features, lengths, mask (B, 3), combination (B,)) routing every row to `mask`'s combination."""
    mask_t = torch.as_tensor(mask)
    lens = {m: torch.where(mask_t[:, j], batch["lengths_natural"][m], 0) for j, m in enumerate(MODALITY_ORDER)}
    comb = torch.as_tensor(mask_to_index(mask), dtype=torch.long)
    return batch["features"], lens, mask_t, comb
