"""Detect natural missingness in imported features, so zeros are never fed as data.

Published feature sets encode a missing modality in several ways: no file for the
utterance, an empty sequence, or a block of zeros (a face detector that found
nothing writes zeros). All of them become `present=False` with a reason, and the
sample is routed to its true combination instead of seeing fake evidence.
"""
from __future__ import annotations

import numpy as np

FILE_ABSENT = "file_absent"
ZERO_LENGTH = "zero_length"
ALL_ZERO = "all_zero_features"
NON_FINITE = "non_finite_features"
UNREADABLE = "unreadable_file"


def missing_reason(steps: np.ndarray, nonfinite: str = "zero") -> str | None:
    """Why the (T, d) valid steps of one utterance cannot count as present; None if they can.

    `nonfinite`: "zero" treats NaN/inf entries as zeros (the convention of the MMSA
    loaders, whose MOSEI audio holds -inf), "missing" drops the modality instead.
    """
    if steps.shape[0] == 0 or steps.size == 0:
        return ZERO_LENGTH
    finite = np.isfinite(steps)
    if not finite.all():
        if nonfinite == "missing":
            return NON_FINITE
        if not np.any(steps[finite]):
            return ALL_ZERO
        return None
    if not np.any(steps):
        return ALL_ZERO
    return None


def clean_steps(steps: np.ndarray) -> np.ndarray:
    """float32 copy of `steps` with non-finite entries set to zero."""
    out = np.asarray(steps, dtype=np.float32)
    if not np.isfinite(out).all():
        out = np.where(np.isfinite(out), out, np.float32(0.0))
    return out


def trailing_length(seq: np.ndarray) -> np.ndarray:
    """(N,) number of steps up to the last step with any non-zero entry, for (N, T, d) zero-padded data.

    Used when a pickle carries no `*_lengths`: padding is zeros at the end, so the
    true length is the index of the last non-zero step + 1 (0 for an all-zero row).
    """
    nonzero = np.any(seq != 0, axis=2)  # (N, T) step has signal (NaN counts as signal; cleaned later)
    last = seq.shape[1] - np.argmax(nonzero[:, ::-1], axis=1)  # (N,) 1 + index of last signal step
    return np.where(nonzero.any(axis=1), last, 0).astype(np.int32)


def pack_rows(
    items: list[tuple[np.ndarray | None, str | None]], seq_len: int, dim: int, nonfinite: str = "zero"
) -> tuple[np.ndarray, list[str | None], np.ndarray, np.ndarray, np.ndarray, int]:
    """Turn per-utterance (steps (T_i, d) or None, reason) into padded feature-table columns.

    Returns present (n,), failure_reason, length (n,), sequence (n, T, d) zero-padded and
    truncated to `seq_len`, summary (n, d) = mean over all true steps (before truncation),
    and how many rows were truncated. A row whose steps fail `missing_reason` is routed
    missing: present False, length 0, zeros.
    """
    n = len(items)
    present = np.zeros(n, dtype=bool)
    reasons: list[str | None] = []
    length = np.zeros(n, dtype=np.int32)
    seq = np.zeros((n, seq_len, dim), dtype=np.float32)  # (n, T, d)
    summ = np.zeros((n, dim), dtype=np.float32)  # (n, d)
    truncated = 0
    for i, (steps, reason) in enumerate(items):
        if reason is None and steps is not None:
            reason = missing_reason(steps, nonfinite)
        if reason is not None or steps is None:
            reasons.append(reason or FILE_ABSENT)
            continue
        clean = clean_steps(steps)  # (T_i, d)
        keep = min(clean.shape[0], seq_len)
        truncated += int(clean.shape[0] > seq_len)
        seq[i, :keep] = clean[:keep]
        summ[i] = clean.mean(axis=0)
        length[i] = keep
        present[i] = True
        reasons.append(None)
    return present, reasons, length, seq, summ, truncated
