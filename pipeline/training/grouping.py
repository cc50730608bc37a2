"""Batches of whole groups (dialogues): the one rule for how dialogue mode cuts rows into batches.

Samplers (training), validation and evaluation all cut with these functions, so a dialogue is
never split across two forward passes and its turns always see each other.
"""
from __future__ import annotations

import numpy as np


def group_order(groups: np.ndarray, rows: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
    """`rows` rearranged so each group's rows are contiguous (in row order), the groups in a
    seeded random order (`rng`) or in order of first appearance (None)."""
    rows = np.asarray(rows, dtype=np.int64)
    _, first, inverse = np.unique(groups[rows], return_index=True, return_inverse=True)
    rank = rng.permutation(len(first)) if rng is not None else np.argsort(np.argsort(first))  # (G,)
    return rows[np.lexsort((np.arange(len(rows)), rank[inverse.reshape(-1)]))]


def cut_groups(groups: np.ndarray, order: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """Cut `order` (contiguous groups) into batches of whole groups: groups are added to a batch
    while it holds fewer than `batch_size` rows (a group longer than that is a batch of its own)."""
    if len(order) == 0:
        return []
    g = groups[order]
    starts = np.r_[0, np.flatnonzero(g[1:] != g[:-1]) + 1, len(order)]  # group boundaries in `order`
    batches, begin = [], 0
    for end in starts[1:].tolist():
        if end - begin >= batch_size or end == len(order):
            batches.append(order[begin:end])
            begin = end
    return batches


def batch_rows(n: int, batch_size: int, groups: np.ndarray | None = None) -> list[np.ndarray]:
    """Local indices 0..n-1 in read batches: contiguous ranges, or whole groups (dialogues) when
    `groups` (n,) is given, so no dialogue is ever split across two forward passes."""
    if groups is None:
        return [np.arange(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]
    return cut_groups(groups, group_order(groups, np.arange(n)), batch_size)
