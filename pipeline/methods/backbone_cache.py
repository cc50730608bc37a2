"""Frozen-backbone outputs computed once per row, for methods whose stage 2 only reads frozen encoders.

Valid only when the frozen encoders are in eval mode and see neither another modality nor the
combination (Wander's `plain` backbone): then each modality's token states and pooled vector
depend on the sample alone. Rows are keyed by the batch's `index` (the row's position in the
aligned data); the owning network decides when the cache may be used and proves it with a probe.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F

from pipeline.core.modalities import MODALITY_ORDER
from pipeline.methods.encoders import ModalityEncoder, masked_mean

def encoder_states(enc: ModalityEncoder, x: torch.Tensor, lengths: torch.Tensor, every_layer: bool
                   ) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Token states of a plain encoder: ([(N, T, D) per read layer], pooled h (N, D)).

    Same computation as `ModalityEncoder.forward` (tests check the pooled output equals it);
    intermediate layers (every_layer) are read through a parameter-free LayerNorm so every
    adapter sees unit-scale inputs, the last one after `ln_f`.
    """
    N, T, _ = x.shape
    if T > enc.max_len:
        raise ValueError(f"sequence of {T} tokens exceeds seq_len={enc.max_len} of this modality")
    valid = torch.arange(T, device=x.device)[None, :] < lengths[:, None]  # (N, T)
    x = torch.where(valid.unsqueeze(-1), (x - enc.in_mean) * enc.in_scale, 0.0)  # padding never leaks in
    z = enc.drop(enc.proj(x) + enc.pos[:T])  # (N, T, D)
    states = []
    for i, layer in enumerate(enc.layers):
        z = layer(z, valid)
        if every_layer and i < len(enc.layers) - 1:
            states.append(F.layer_norm(z, z.shape[-1:]))
    last = enc.ln_f(z)  # (N, T, D)
    states.append(last)
    return states, masked_mean(last, valid)


# (features (N, T, d), lengths (N,), modality) -> ([(N, T, D) per read layer], pooled (N, D))
Encode = Callable[[torch.Tensor, torch.Tensor, str], tuple[list[torch.Tensor], torch.Tensor]]


@dataclass
class BackboneCache:
    """slot[position] -> row of the tensors below (-1: not cached)."""

    slot: torch.Tensor  # (max position + 1,) long
    states: dict[str, torch.Tensor]  # m -> (n, S, T_m, D): S read layers
    pooled: dict[str, torch.Tensor]  # m -> (n, D), zero where the row lacks m
    lengths: dict[str, torch.Tensor]  # m -> (n,) natural lengths the states were computed with

    @classmethod
    @torch.no_grad()
    def build(cls, encode: Encode, batches: Iterable[dict[str, Any]], modalities: tuple[str, ...],
              device: torch.device) -> "BackboneCache":
        """Encode every row of `batches` (features, lengths_natural or lengths, index) once."""
        index, states, pooled, lengths = [], {m: [] for m in modalities}, {m: [] for m in MODALITY_ORDER}, \
            {m: [] for m in MODALITY_ORDER}
        for batch in batches:
            lens = batch.get("lengths_natural", batch["lengths"])
            index.append(batch["index"].to(device))
            for m in MODALITY_ORDER:
                n = lens[m].to(device)
                if m in modalities:
                    s, h = encode(batch["features"][m].to(device), n, m)
                    states[m].append(torch.stack(s, 1))  # (N, S, T, D)
                    pooled[m].append(torch.where((n > 0)[:, None], h, 0.0))  # (N, D)
                else:  # a modality the model does not know is never present
                    pooled[m].append(None)
                lengths[m].append(n)
        if not index:
            raise ValueError("BackboneCache.build: no batches")
        pos = torch.cat(index)
        slot = torch.full((int(pos.max()) + 1,), -1, dtype=torch.long, device=device)
        slot[pos] = torch.arange(len(pos), device=device)
        D = next(iter(states.values()))[0].shape[-1] if modalities else 0
        return cls(slot, {m: torch.cat(v) for m, v in states.items()},
                   {m: torch.cat(v) if v[0] is not None else torch.zeros(len(pos), D, device=device)
                    for m, v in pooled.items()},
                   {m: torch.cat(v) for m, v in lengths.items()})

    def to(self, device: torch.device) -> "BackboneCache":
        move = lambda d: {m: t.to(device) for m, t in d.items()}  # noqa: E731
        return BackboneCache(self.slot.to(device), move(self.states), move(self.pooled), move(self.lengths))

    def covers(self, index: torch.Tensor) -> bool:
        index = index.to(self.slot.device)
        return bool((index < len(self.slot)).all()) and bool((self.slot[index] >= 0).all())

    def lookup(self, index: torch.Tensor, lengths: dict[str, torch.Tensor], present: dict[str, torch.Tensor]
               ) -> tuple[dict[str, list[torch.Tensor]], dict[str, torch.Tensor]]:
        """(states m -> [(B, T, D) per read layer], pooled m -> (B, D), zero where absent) of rows `index`.

        States of absent rows are left as cached: readers must mask them (the adapter does)."""
        rows = self.slot[index.to(self.slot.device)]  # (B,)
        states, pooled = {}, {}
        for m in MODALITY_ORDER:
            p = present[m]
            if bool((p & (self.lengths[m][rows] != lengths[m])).any()):
                raise ValueError(f"cached backbone: lengths of modality {m} differ from the cached ones")
            pooled[m] = torch.where(p[:, None], self.pooled[m][rows], 0.0)  # (B, D)
            if m in self.states:
                states[m] = list(self.states[m][rows].unbind(1))  # (B, S, T, D) -> S x (B, T, D)
        return states, pooled


def relative_gap(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max(1, |b|): absolute below 1, relative above (float32 resolution)."""
    return float(((a - b).abs() / b.abs().clamp_min(1.0)).max()) if a.numel() else 0.0
