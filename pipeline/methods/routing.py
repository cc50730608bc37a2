"""The routing rule, coded once: validation, evaluation and serving all call `route`.

Rule: each sample goes to the combination it actually has, i.e. the modalities that
are (1) naturally present, (2) kept by the protocol's mask (a fixed combination, a
stored random-missing mask, or all-ones for natural missingness), (3) non-empty
(length > 0) and (4) known to the model (`config.modalities`, the modalities its
training split had). A sample left with no modality gets the training prior (class
frequencies, or the mean score for regression) instead of a model output.

Any registered method works here: only `forward(features, lengths, mask, combination)`
and `config.task` / `config.modalities` are used.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from pipeline.core.modalities import MODALITY_ORDER, mask_to_index
from pipeline.methods.context import DialogueLayout, forward_extras


@dataclass
class Routed:
    output: np.ndarray  # (N, K) class probabilities, or (N, 1) scores; prior rows where comb == -1
    combination: np.ndarray  # (N,) combination index actually used, -1 = nothing usable (prior)
    mask: np.ndarray  # (N, 3) bool effective presence


def model_modalities(model: torch.nn.Module) -> tuple[str, ...]:
    """The modality letters a model was trained with (all three for checkpoints that predate the field)."""
    return tuple(getattr(model.config, "modalities", MODALITY_ORDER))


def effective_mask(presence: np.ndarray, lengths: dict[str, np.ndarray], protocol: np.ndarray,
                   modalities: Sequence[str] = MODALITY_ORDER) -> np.ndarray:
    """(N, 3) bool: present AND kept by the protocol mask ((3,) or (N, 3)) AND non-empty AND known."""
    presence = np.asarray(presence, dtype=bool)
    protocol = np.asarray(protocol, dtype=bool)
    nonempty = np.stack([np.asarray(lengths[m]) > 0 for m in MODALITY_ORDER], axis=1)  # (N, 3)
    known = np.array([m in modalities for m in MODALITY_ORDER], dtype=bool)  # (3,)
    return presence & nonempty & known[None, :] & (protocol if protocol.ndim == 2 else protocol[None, :])


@torch.no_grad()
def route(model: torch.nn.Module, features: dict[str, torch.Tensor], lengths: dict[str, torch.Tensor],
          presence: np.ndarray, protocol: np.ndarray, prior: Sequence[float],
          index: torch.Tensor | None = None, dialogue: DialogueLayout | None = None) -> Routed:
    """Route every sample of one batch under one protocol mask; see the module docstring.

    `features` (N, T, d) and `lengths` (N,) are the natural ones (any device); `presence` (N, 3)
    the natural presence. The model must be in eval mode (the caller's job). `index` (N,), the
    rows' positions, reaches only models that set `reads_row_index` (Wander's backbone cache);
    `dialogue` (the rows' places in their conversations) only dialogue-context models, and only
    for the routed rows: a row left with no modality takes no part in its dialogue's context.
    """
    lens_np = {m: lengths[m].detach().cpu().numpy() for m in MODALITY_ORDER}
    eff = effective_mask(presence, lens_np, protocol, model_modalities(model))  # (N, 3)
    comb = mask_to_index(eff)  # (N,) -1 where nothing is usable
    prior_arr = np.asarray(prior, dtype=np.float64)  # (K,)
    out = np.tile(prior_arr, (len(comb), 1))  # (N, K)
    rows = np.flatnonzero(comb >= 0)
    if rows.size:
        device = next(iter(features.values())).device
        idx = torch.as_tensor(rows, device=device)
        eff_t = torch.as_tensor(eff[rows], device=device)  # (R, 3)
        lens = {m: torch.where(eff_t[:, j], lengths[m].to(device).index_select(0, idx), 0)
                for j, m in enumerate(MODALITY_ORDER)}
        extra = forward_extras(model, index, dialogue, rows=idx)
        pred = model({m: features[m].index_select(0, idx) for m in MODALITY_ORDER}, lens, eff_t,
                     torch.as_tensor(comb[rows], dtype=torch.long, device=device), **extra).prediction  # (R, K)
        if model.config.task == "classification":
            pred = torch.softmax(pred.float(), dim=-1)
        out[rows] = pred.double().cpu().numpy()
    return Routed(out, comb, eff)


def serving_info(task: str, classes: Sequence[str], prior: Sequence[float]) -> dict[str, Any]:
    """What a served model needs besides its weights: task, class order, prior."""
    return {"task": task, "classes": list(classes), "prior": [float(x) for x in prior]}
