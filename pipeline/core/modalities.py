"""The modality vocabulary and the 7 non-empty modality combinations (the one home of both).

Each modality has three names: its letter (used in combinations, metrics and model
keys: `a`), its manifest column family (`audio_path`, `audio_missing`: `audio`) and
its feature-table name (`acoustic.arrow`: `acoustic`). Every other module derives
its lookups from `VOCABULARY`.

Combination order is fixed project-wide: index 0..6 = a, t, v, at, av, tv, atv.
Masks are boolean (B, 3) in modality order (a, t, v).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import numpy as np


@dataclass(frozen=True)
class Modality:
    letter: str  # "a"
    manifest: str  # "audio": manifest columns audio_path / audio_missing
    table: str  # "acoustic": data/features/acoustic.arrow, extractor name


VOCABULARY: tuple[Modality, ...] = (
    Modality("a", "audio", "acoustic"),
    Modality("t", "text", "textual"),
    Modality("v", "video", "visual"),
)
MODALITY_ORDER: tuple[str, ...] = tuple(m.letter for m in VOCABULARY)
TABLE_NAME: dict[str, str] = {m.letter: m.table for m in VOCABULARY}  # "a" -> "acoustic"
MANIFEST_NAME: dict[str, str] = {m.letter: m.manifest for m in VOCABULARY}  # "a" -> "audio"
LETTER_OF_MANIFEST: dict[str, str] = {m.manifest: m.letter for m in VOCABULARY}  # "audio" -> "a"
LETTER_OF_TABLE: dict[str, str] = {m.table: m.letter for m in VOCABULARY}  # "acoustic" -> "a"
MANIFEST_OF_TABLE: dict[str, str] = {m.table: m.manifest for m in VOCABULARY}  # "acoustic" -> "audio"
TABLE_OF_MANIFEST: dict[str, str] = {m.manifest: m.table for m in VOCABULARY}  # "audio" -> "acoustic"
COMBINATIONS: tuple[str, ...] = ("a", "t", "v", "at", "av", "tv", "atv")
COMBINATION_INDEX: dict[str, int] = {c: i for i, c in enumerate(COMBINATIONS)}


def combination_mask(name: str) -> np.ndarray:
    """(3,) bool mask of the modalities present in combination `name`."""
    if name not in COMBINATION_INDEX:
        raise ValueError(f"unknown combination {name!r}; expected one of {COMBINATIONS}")
    return np.array([m in name for m in MODALITY_ORDER], dtype=bool)


MASKS: np.ndarray = np.stack([combination_mask(c) for c in COMBINATIONS])  # (7, 3)


def mask_to_index(mask: np.ndarray) -> np.ndarray:
    """Map (..., 3) bool masks to combination indices; -1 where no modality is present."""
    mask = np.asarray(mask, dtype=bool)
    code = mask[..., 0] * 1 + mask[..., 1] * 2 + mask[..., 2] * 4  # bit code per mask
    lookup = np.full(8, -1, dtype=np.int64)
    for i, m in enumerate(MASKS):
        lookup[int(m[0]) + 2 * int(m[1]) + 4 * int(m[2])] = i
    return lookup[code]


def formable_combinations(modalities: Iterable[str]) -> tuple[str, ...]:
    """The combinations (in project order) that use only `modalities`: all 7 for a, t, v; ("t",) for text only."""
    have = set(modalities)
    unknown = have - set(MODALITY_ORDER)
    if unknown:
        raise ValueError(f"unknown modality letters {sorted(unknown)}; expected a subset of {MODALITY_ORDER}")
    return tuple(c for c in COMBINATIONS if set(c) <= have)
