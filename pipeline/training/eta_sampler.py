"""MPLMM's samplers: `eta` dropout for stage 2 and naturally complete rows for a faithful stage 1.

Both have the public surface of `ModalityDropoutSampler` (pipeline/training/samplers.py):
`(natural, batch_size, seed, allowed=None)` (`allowed` (7,) bool: the formable combinations),
`__len__`, `draw_epoch(epoch)` (a pure function of seed and epoch), `__iter__` (advances `epoch`,
records `last_counts` and `history` as samples per combination), yielding `BatchKey(index, mask=(B, 3))`.
"""
from __future__ import annotations

import numpy as np

from pipeline.core.modalities import COMBINATIONS, MASKS, mask_to_index
from pipeline.training.batches import MaskedPassSampler

N_COMB = len(COMBINATIONS)


class EtaDropoutSampler(MaskedPassSampler):
    """Per sample, with probability `eta` keep a uniformly drawn proper non-empty subset of its
    natural set, else all of it (a single-modality sample always keeps it). A complete row loses
    1.5 eta of its 3 modalities on average (eta 0.7 ~ missing rate 0.35; never above 0.5)."""

    def __init__(self, natural: np.ndarray, batch_size: int, seed: int, allowed: np.ndarray | None = None,
                 eta: float = 0.7, groups: np.ndarray | None = None):
        if not 0.0 <= float(eta) <= 1.0:
            raise ValueError(f"eta must lie in [0, 1], got {eta}")
        self.eta = float(eta)
        super().__init__(natural, batch_size, seed, allowed, groups)

    def _subsets(self, nat: np.ndarray) -> np.ndarray:
        """(N, 7): allowed non-empty subsets of each natural set."""
        return (nat[:, None, :] | ~MASKS[None, :, :]).all(axis=2) & self.allowed[None, :]

    def _rows(self) -> np.ndarray:
        rows = np.flatnonzero(self._subsets(self.natural).any(axis=1))
        if len(rows) == 0:
            raise ValueError("no training sample has any modality present")
        return rows

    def _masks(self, nat: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        own = mask_to_index(nat)  # (N,) the natural combination
        subsets = self._subsets(nat)  # (N, 7)
        proper = subsets & (np.arange(N_COMB)[None, :] != own[:, None])  # (N, 7)
        pick = np.argmax(np.where(proper, rng.random(proper.shape), -1.0), axis=1)  # uniform among proper
        drop = rng.random(len(nat)) < self.eta  # (N,)
        keep_all = ~drop & self.allowed[own]  # natural set kept (if it is a formable combination)
        drop = ~keep_all & proper.any(axis=1)
        return np.where(drop[:, None], MASKS[pick], nat)  # (N, 3)


class CompleteRowsSampler(MaskedPassSampler):
    """Only the naturally complete rows, all modalities kept (MPLMM's faithful stage 1)."""

    def __init__(self, natural: np.ndarray, batch_size: int, seed: int, allowed: np.ndarray | None = None,
                 groups: np.ndarray | None = None):
        super().__init__(natural, batch_size, seed, allowed, groups)

    def _full(self) -> np.ndarray:
        return MASKS[self.allowed].any(axis=0)  # (3,) every modality of the formable combinations

    def _rows(self) -> np.ndarray:
        rows = np.flatnonzero((self.natural | ~self._full()[None, :]).all(axis=1))
        if len(rows) == 0:
            raise ValueError("no training sample has all the modalities: stage1_sampler complete cannot "
                             "run here; use train.mplmm.stage1_sampler: dropout (backbone imer)")
        return rows

    def _masks(self, nat: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return np.broadcast_to(self._full(), nat.shape).copy()  # (N, 3)
