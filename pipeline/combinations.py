"""The 7 non-empty modality combinations and conversions between names, indices and masks.

Order is fixed project-wide: index 0..6 = a, t, v, at, av, tv, atv. Masks are
boolean (B, 3) in modality order (a, t, v).
"""
from __future__ import annotations

import numpy as np

MODALITY_ORDER: tuple[str, ...] = ("a", "t", "v")
# Feature-table modality name for each letter.
TABLE_NAME: dict[str, str] = {"a": "acoustic", "t": "textual", "v": "visual"}
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
