"""What a training batch is: a `BatchKey` (rows + how their modalities are masked), the dataset
that turns a key into tensors, and the base of the samplers that make one masked pass per epoch.

Each sampler yields `BatchKey`s; `BatchDataset[key]` turns one key into one batch of tensors,
so a torch DataLoader with `batch_size=None` copies only the rows of that batch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
from torch.utils.data import Dataset

from pipeline.core.modalities import COMBINATIONS, mask_to_index
from pipeline.training.data import MultimodalData
from pipeline.training.grouping import cut_groups, group_order

N_COMB = len(COMBINATIONS)


@dataclass(frozen=True)
class BatchKey:
    """Local sample indices of one batch plus how its modalities are masked."""

    index: np.ndarray  # (B,) local indices into the training view
    combination: int | None = None  # homogeneous batch
    mask: np.ndarray | None = None  # (B, 3) per-sample mask (random modality dropout)


class BatchDataset(Dataset):
    """Maps a BatchKey to a batch of tensors (no per-sample Python work)."""

    def __init__(self, data: MultimodalData):
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, key: BatchKey) -> dict:
        return self.data.batch(key.index, combination=key.combination, mask=key.mask)


class MaskedPassSampler:
    """A seeded shuffled pass over `rows`, each sample with a mask from `_masks`. With `groups`
    (N,) (dialogue mode) the pass shuffles whole groups and batches never split one."""

    def __init__(self, natural: np.ndarray, batch_size: int, seed: int, allowed: np.ndarray | None,
                 groups: np.ndarray | None = None):
        self.natural = np.asarray(natural, dtype=bool)  # (N, 3)
        self.batch_size, self.seed = int(batch_size), int(seed)
        self.allowed = np.ones(N_COMB, dtype=bool) if allowed is None else np.asarray(allowed, dtype=bool)  # (7,)
        self.groups = None if groups is None else np.asarray(groups)
        self.usable = self._rows()
        self.epoch = 0
        self.history: list[dict[str, int]] = []
        self.last_counts: dict[str, int] = {}

    def __len__(self) -> int:
        if self.groups is not None:  # whole-group batches: the count depends on the epoch's order
            return len(self.draw_epoch(self.epoch))
        return int(np.ceil(len(self.usable) / self.batch_size))

    def _rows(self) -> np.ndarray:
        raise NotImplementedError

    def _masks(self, nat: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        raise NotImplementedError

    def draw_epoch(self, epoch: int) -> list[BatchKey]:
        """The batches of `epoch` (BatchKeys): a pure function of (seed, epoch)."""
        rng = np.random.default_rng([self.seed, epoch])
        if self.groups is not None:
            order = group_order(self.groups, self.usable, rng)
            masks = self._masks(self.natural[order], rng)  # (N, 3)
            ends = np.cumsum([len(b) for b in cut_groups(self.groups, order, self.batch_size)])  # contiguous cuts
            return [BatchKey(index=order[s:e], mask=masks[s:e]) for s, e in zip(np.r_[0, ends[:-1]], ends)]
        order = rng.permutation(self.usable)
        masks = self._masks(self.natural[order], rng)  # (N, 3)
        return [BatchKey(index=order[s:s + self.batch_size], mask=masks[s:s + self.batch_size])
                for s in range(0, len(order), self.batch_size)]

    def __iter__(self) -> Iterator[BatchKey]:
        keys = self.draw_epoch(self.epoch)
        counts = np.bincount(np.concatenate([mask_to_index(k.mask) for k in keys]), minlength=N_COMB)
        self.last_counts = {c: int(counts[i]) for i, c in enumerate(COMBINATIONS)}  # samples per combination
        self.history.append({"epoch": self.epoch, **self.last_counts})
        self.epoch += 1
        return iter(keys)
