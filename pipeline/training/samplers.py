"""Training batch samplers: homogeneous-combination batches (MCULoRA/DPFT) or random modality dropout.

Each sampler yields `BatchKey`s; `BatchDataset[key]` turns one key into one batch of
tensors, so a torch DataLoader with `batch_size=None` copies only the rows of that
batch. Homogeneous batches only contain samples whose natural presence covers the
drawn combination: the combination of the batch is a fact about every sample in
it (the research code read it off the first sample).
"""
from __future__ import annotations

from typing import Iterator

import numpy as np

from pipeline.core.modalities import COMBINATIONS, MASKS
from pipeline.training.batches import BatchDataset, BatchKey, MaskedPassSampler  # noqa: F401  (re-exported)
from pipeline.training.grouping import group_order
from pipeline.training.eta_sampler import CompleteRowsSampler, EtaDropoutSampler

N_COMB = len(COMBINATIONS)


class HomogeneousBatchSampler:
    """Draw a combination c ~ q per batch, then a batch of samples whose natural presence covers c.

    Per combination, the eligible samples are consumed from a seeded shuffled pool
    (reshuffled when exhausted), so over an epoch every eligible sample is visited
    about evenly. Combinations with no eligible sample get probability 0 (their
    share moves to the others). `q` is set by DPFT between epochs.

    With `groups` (N,) (dialogue mode) the pools hold whole dialogues: a batch is one combination
    over consecutive dialogues of c's pool (their rows that cover c), about `batch_size` rows.
    """

    def __init__(self, natural: np.ndarray, batch_size: int, seed: int, q: np.ndarray | None = None,
                 batches_per_epoch: int | None = None, allowed: np.ndarray | None = None,
                 groups: np.ndarray | None = None):
        self.natural = np.asarray(natural, dtype=bool)  # (N, 3)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        covers = (self.natural[:, None, :] | ~MASKS[None, :, :]).all(axis=2)  # (N, 7): sample has all of c
        if allowed is not None:  # only the combinations the dataset can form
            covers &= np.asarray(allowed, dtype=bool)[None, :]
        self.eligible = [np.flatnonzero(covers[:, c]) for c in range(N_COMB)]
        # the units a pool draws: single rows, or (dialogue mode) the eligible rows of one dialogue each
        self.units = None if groups is None else [_split_groups(np.asarray(groups), e) for e in self.eligible]
        self.available = np.array([len(e) > 0 for e in self.eligible])
        if not self.available.any():
            raise ValueError("no training sample has any modality present")
        n = int(self.natural.any(axis=1).sum())
        per_batch = self.batch_size
        if self.units is not None:  # whole dialogues: a batch holds at least one, so an epoch stays one pass
            sizes = np.array([len(u) for units in self.units for u in units])
            per_batch = max(self.batch_size, float(sizes.mean()) if len(sizes) else 1.0)
        self.n_batches = batches_per_epoch or max(1, int(np.ceil(n / per_batch)))
        self.q = np.full(N_COMB, 1.0 / N_COMB) if q is None else np.asarray(q, dtype=float)
        self.epoch = 0
        self.history: list[dict[str, int]] = []  # per-epoch batch counts per combination
        self.last_counts: dict[str, int] = {}

    def set_q(self, q: np.ndarray) -> None:
        q = np.asarray(q, dtype=float)
        if q.shape != (N_COMB,) or (q < 0).any() or q.sum() <= 0:
            raise ValueError(f"q must be 7 non-negative weights, got {q}")
        self.q = q / q.sum()

    def effective_q(self) -> np.ndarray:
        """q restricted to combinations that have eligible samples, renormalised."""
        q = np.where(self.available, self.q, 0.0)
        return q / q.sum()

    def __len__(self) -> int:
        return self.n_batches

    def draw_epoch(self, epoch: int) -> list[BatchKey]:
        """The batches of `epoch`: a pure function of (seed, epoch, q)."""
        rng = np.random.default_rng([self.seed, epoch])
        combos = rng.choice(N_COMB, size=self.n_batches, p=self.effective_q())
        if self.units is not None:
            return self._draw_dialogues(combos, rng)
        pools = [rng.permutation(e) for e in self.eligible]
        cursor = [0] * N_COMB
        keys = []
        for c in combos.tolist():
            pool, take = pools[c], min(self.batch_size, len(pools[c]))
            if cursor[c] + take > len(pool):  # exhausted: reshuffle this combination's pool
                pools[c] = pool = rng.permutation(self.eligible[c])
                cursor[c] = 0
            idx = pool[cursor[c]:cursor[c] + take]
            cursor[c] += take
            keys.append(BatchKey(index=idx, combination=c))
        return keys

    def _draw_dialogues(self, combos: np.ndarray, rng: np.random.Generator) -> list[BatchKey]:
        """Dialogue mode: each batch takes whole dialogues from its combination's shuffled pool."""
        pools = [rng.permutation(len(u)) for u in self.units]
        cursor = [0] * N_COMB
        keys = []
        for c in combos.tolist():
            taken: list[np.ndarray] = []
            rows = 0
            while rows < self.batch_size and len(taken) < len(pools[c]):
                if cursor[c] >= len(pools[c]):  # exhausted: reshuffle this combination's dialogues
                    pools[c], cursor[c] = rng.permutation(len(self.units[c])), 0
                taken.append(self.units[c][pools[c][cursor[c]]])
                rows += len(taken[-1])
                cursor[c] += 1
            keys.append(BatchKey(index=np.concatenate(taken), combination=c))
        return keys

    def __iter__(self) -> Iterator[BatchKey]:
        keys = self.draw_epoch(self.epoch)
        counts = np.bincount([k.combination for k in keys], minlength=N_COMB)
        self.last_counts = {c: int(counts[i]) for i, c in enumerate(COMBINATIONS)}
        self.history.append({"epoch": self.epoch, **self.last_counts})
        self.epoch += 1
        return iter(keys)


class ModalityDropoutSampler(MaskedPassSampler):
    """Random modality dropout (variant `plain`, two_stage stage 1): a shuffled pass over the
    samples; each sample keeps a uniformly drawn non-empty subset of its present modalities."""

    def __init__(self, natural: np.ndarray, batch_size: int, seed: int, allowed: np.ndarray | None = None,
                 groups: np.ndarray | None = None):
        super().__init__(natural, batch_size, seed, allowed, groups)  # allowed: the dataset's formable combinations

    def _rows(self) -> np.ndarray:
        usable = np.flatnonzero(((self.natural[:, None, :] | ~MASKS[None, :, :]).all(axis=2)
                                 & self.allowed[None, :]).any(axis=1))
        if len(usable) == 0:
            raise ValueError("no training sample has any modality present")
        return usable

    def _masks(self, nat: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        allowed = (nat[:, None, :] | ~MASKS[None, :, :]).all(axis=2) & self.allowed[None, :]  # (N, 7) subsets
        pick = np.argmax(np.where(allowed, rng.random(allowed.shape), -1.0), axis=1)  # uniform among allowed
        return MASKS[pick]  # (N, 3)


def _split_groups(groups: np.ndarray, rows: np.ndarray) -> list[np.ndarray]:
    """`rows` split into one array per group (groups in order of first appearance)."""
    order = group_order(groups, rows)
    cuts = np.flatnonzero(groups[order][1:] != groups[order][:-1]) + 1
    return np.split(order, cuts) if len(order) else []


# Sampler registry: StagePlan.sampler -> class. Each takes (natural (N, 3), batch_size, seed, allowed (7,) bool).
SAMPLERS: dict[str, type] = {
    "homogeneous": HomogeneousBatchSampler,
    "dropout": ModalityDropoutSampler,
    "eta": EtaDropoutSampler,  # MPLMM stage 2
    "complete": CompleteRowsSampler,  # MPLMM's faithful stage 1: naturally complete rows only
}


def make_sampler(kind: str, natural: np.ndarray, batch_size: int, seed: int, allowed: np.ndarray | None = None,
                 groups: np.ndarray | None = None, **options):
    """The sampler registered as `kind`, drawing only the `allowed` (formable) combinations."""
    if kind not in SAMPLERS:
        raise ValueError(f"unknown sampler {kind!r}; registered: {', '.join(SAMPLERS)}")
    return SAMPLERS[kind](natural, batch_size, seed, allowed=allowed, groups=groups, **options)
