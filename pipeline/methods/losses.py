"""Training losses: the task loss and MCULoRA's orthogonality (decoupling) loss."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.core.modalities import MODALITY_ORDER


def orthogonality_loss(r_spec: dict[str, torch.Tensor], r_com: dict[str, torch.Tensor],
                       mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Squared cosine between R_c^m and R_com^m: mean over present m per sample, then over samples.

    mask (B, 3) bool; samples with no present modality are left out; a zero vector has cosine 0.
    """
    sq = torch.stack([(F.normalize(r_spec[m], dim=-1, eps=eps) * F.normalize(r_com[m], dim=-1, eps=eps))
                      .sum(-1).pow(2) for m in MODALITY_ORDER], dim=1)  # (B, 3)
    w = mask.to(sq.dtype)  # (B, 3)
    per_sample = (sq * w).sum(1) / w.sum(1).clamp_min(1.0)  # (B,)
    has_any = mask.any(dim=1)
    if not bool(has_any.any()):
        return sq.sum() * 0.0  # keeps the graph, value 0
    return per_sample[has_any].mean()


def task_loss(prediction: torch.Tensor, target: torch.Tensor, task: str,
              regression_loss: str = "l1", reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy on logits (B, C) vs class ids (B,); regression: L1 (default) or MSE on (B, 1) vs (B,).

    `reduction="none"` gives the per-row losses (B,) (CGGM weights rows by the modalities present).
    """
    if task == "classification":
        return F.cross_entropy(prediction, target.long(), reduction=reduction)
    if task == "regression":
        score = prediction.reshape(-1)  # (B,)
        if regression_loss == "l1":
            return F.l1_loss(score, target.to(score.dtype), reduction=reduction)
        if regression_loss == "mse":
            return F.mse_loss(score, target.to(score.dtype), reduction=reduction)
        raise ValueError(f"regression_loss must be 'l1' or 'mse', got {regression_loss!r}")
    raise ValueError(f"task must be classification|regression, got {task!r}")
