"""A compact MulT (Tsai et al., ACL 2019) backbone for MPLMM's `backbone: mult`.

Per target modality j: two cross-modal transformers (queries from j, keys/values from each
other modality s), their outputs joined along features (width 2D) into a memory transformer,
then a read-out per target, a residual MLP over [h_a; h_t; h_v] (6D) and an output layer.
Unlike the research code: every attention has a key padding mask, positions are explicit
(sinusoidal at 0..T-1, never inferred from zero features), causal masks are an option (off),
and the read-out never lands on a padded step. MPLMM's missing-type prompt tokens (P, 2D) are
appended to each memory transformer's input without a position.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from pipeline.core.modalities import MODALITY_ORDER
from pipeline.methods.encoders import masked_mean

DROPOUT_KEYS = ("attn", "relu", "res", "embed", "out")


def sinusoid(T: int, d: int, device: torch.device) -> torch.Tensor:
    """Sinusoidal positions 0..T-1: (T, d), sin in the first half of the features, cos in the second."""
    half = d // 2
    freq = torch.exp(torch.arange(half, device=device, dtype=torch.float32) * -(math.log(10000.0) / max(half - 1, 1)))
    angle = torch.arange(T, device=device, dtype=torch.float32)[:, None] * freq[None, :]  # (T, half)
    pe = torch.cat([angle.sin(), angle.cos()], dim=1)  # (T, 2 half)
    return F.pad(pe, (0, d - 2 * half))  # (T, d)


class MultLayer(nn.Module):
    """Pre-norm (cross-)attention layer: the same LayerNorm normalises queries and keys, as in MulT."""

    def __init__(self, d: int, n_heads: int, drop: dict[str, float]):
        super().__init__()
        self.n_heads, self.drop = n_heads, drop
        self.ln_attn, self.ln_ffn = nn.LayerNorm(d), nn.LayerNorm(d)
        self.in_proj = nn.Linear(d, 3 * d)  # q, k, v
        self.out = nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor, kv: torch.Tensor | None = None,
                keep: slice = slice(None)) -> torch.Tensor:
        """x (n, T, d); kv (n, Tk, d) or None (self-attention); allowed (n, 1, 1 or T, Tk) bool.
        Only the query positions `keep` are computed and returned (every token stays a key)."""
        n, _, d = x.shape
        H = self.n_heads
        h = self.ln_attn(x)
        src = h if kv is None else self.ln_attn(kv)
        Wq, Wk, Wv = self.in_proj.weight.split(d)
        bq, bk, bv = self.in_proj.bias.split(d)
        heads = lambda t: t.view(n, t.shape[1], H, d // H).transpose(1, 2)  # noqa: E731  (n, H, T, d/H)
        q, k, v = heads(F.linear(h[:, keep], Wq, bq)), heads(F.linear(src, Wk, bk)), heads(F.linear(src, Wv, bv))
        mask = allowed if allowed.shape[2] == 1 else allowed[:, :, keep]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                           dropout_p=self.drop["attn"] if self.training else 0.0)  # (n, H, Tq, d/H)
        x = x[:, keep] + F.dropout(self.out(y.transpose(1, 2).reshape(n, q.shape[2], d)), self.drop["res"],
                                   self.training)
        h = F.dropout(F.relu(self.fc1(self.ln_ffn(x))), self.drop["relu"], self.training)
        return x + F.dropout(self.fc2(h), self.drop["res"], self.training)  # (n, Tq, d)


class MultEncoder(nn.Module):
    """MulT's TransformerEncoder: scaled input + positions, layers, final LayerNorm."""

    def __init__(self, d: int, n_layers: int, n_heads: int, drop: dict[str, float], causal: bool):
        super().__init__()
        self.scale, self.drop, self.causal = math.sqrt(d), drop, causal
        self.layers = nn.ModuleList(MultLayer(d, n_heads, drop) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(d)

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        x = self.scale * x + sinusoid(x.shape[1], x.shape[2], x.device)
        return F.dropout(x, self.drop["embed"], self.training)

    def forward(self, x: torch.Tensor, valid: torch.Tensor, kv: torch.Tensor | None = None,
                kv_valid: torch.Tensor | None = None, extra: torch.Tensor | None = None,
                keep: slice = slice(None)) -> torch.Tensor:
        """x (n, T, d) with valid (n, T); kv/kv_valid for cross-attention; extra (n, P, d) appended, no
        position. The last layer computes only the positions `keep` (those a read-out needs)."""
        x = self._embed(x)
        if kv is not None:
            kv = self._embed(kv)
        if extra is not None:
            x = torch.cat([x, extra], dim=1)  # (n, T + P, d)
            valid = torch.cat([valid, valid.new_ones(extra.shape[:2])], dim=1)
        keys = valid if kv is None else kv_valid
        Tq, Tk = x.shape[1], keys.shape[1]
        allowed = keys[:, None, None, :]  # (n, 1, 1, Tk)
        if self.causal:  # MulT's future mask: key k visible from query q iff k <= q + |Tk - Tq|
            q_pos = torch.arange(Tq, device=x.device)[:, None]
            k_pos = torch.arange(Tk, device=x.device)[None, :]
            allowed = allowed & (k_pos <= q_pos + abs(Tk - Tq))[None, None]  # (n, 1, Tq, Tk)
        for i, layer in enumerate(self.layers):
            x = layer(x, allowed, kv, keep if i == len(self.layers) - 1 else slice(None))
        return self.ln_f(x)


class MulTBackbone(nn.Module):
    """Input projections, 6 cross-modal + 3 memory transformers, residual MLP, output layer."""

    def __init__(self, input_dims: dict[str, int], n_outputs: int, opts: dict):
        super().__init__()
        D, H = int(opts["d_model"]), int(opts["n_heads"])
        drop = {k: float(opts["dropout"][k]) for k in DROPOUT_KEYS}
        self.d, self.drop = D, drop
        for m in MODALITY_ORDER:  # train-split standardisation (see set_input_statistics)
            self.register_buffer(f"in_mean_{m}", torch.zeros(input_dims[m]))
            self.register_buffer(f"in_scale_{m}", torch.ones(input_dims[m]))
        self.proj = nn.ModuleDict({m: nn.Linear(input_dims[m], D, bias=False) for m in MODALITY_ORDER})
        self.cross = nn.ModuleDict({f"{s}_to_{m}": MultEncoder(D, int(opts["n_layers"]), H, drop, bool(opts["causal"]))
                                    for m in MODALITY_ORDER for s in MODALITY_ORDER if s != m})
        self.memory = nn.ModuleDict({m: MultEncoder(2 * D, int(opts["mem_layers"]), H, drop, bool(opts["causal"]))
                                     for m in MODALITY_ORDER})
        self.proj1, self.proj2 = nn.Linear(6 * D, 6 * D), nn.Linear(6 * D, 6 * D)
        self.out_drop = nn.Dropout(drop["out"])
        self.head = nn.Linear(6 * D, n_outputs)

    def set_input_statistics(self, m: str, mean: torch.Tensor, std: torch.Tensor) -> None:
        std = torch.as_tensor(std, dtype=torch.float32)
        getattr(self, f"in_mean_{m}").copy_(torch.as_tensor(mean, dtype=torch.float32))
        getattr(self, f"in_scale_{m}").copy_(torch.where(std > 1e-6, 1.0 / std.clamp_min(1e-6), torch.ones_like(std)))

    def standardise(self, m: str, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """(x - mean) / std where valid (n, T), exactly 0 elsewhere (absent or padded input never leaks in)."""
        mean, scale = getattr(self, f"in_mean_{m}"), getattr(self, f"in_scale_{m}")
        return torch.where(valid.unsqueeze(-1), (x - mean) * scale, 0.0)  # (B, T, d_m)

    def embed(self, m: str, xs: torch.Tensor) -> torch.Tensor:
        return self.proj[m](xs)  # (n, T, D)

    def fuse(self, tokens: dict[str, torch.Tensor], valid: dict[str, torch.Tensor],
             type_tokens: torch.Tensor | None, readout: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """tokens[m] (B, T_m, D) with valid[m] (B, T_m); type_tokens (3, B, P, 2D) or None -> (prediction, pooled)."""
        pooled = {}
        for j, m in enumerate(MODALITY_ORDER):
            crossed = [self.cross[f"{s}_to_{m}"](tokens[m], valid[m], tokens[s], valid[s])
                       for s in MODALITY_ORDER if s != m]  # 2 x (B, T_m, D)
            extra = None if type_tokens is None else type_tokens[j]
            T = valid[m].shape[1]
            keep = slice(-1, None) if (readout == "prompt" and extra is not None) else slice(0, T)
            h = self.memory[m](torch.cat(crossed, dim=-1), valid[m], extra=extra, keep=keep)  # (B, |keep|, 2D)
            if readout == "mean":
                pooled[m] = masked_mean(h, valid[m])  # (B, 2D)
            elif extra is not None:
                pooled[m] = h[:, -1]  # the last appended prompt token, as published
            else:  # the last valid step (the research code read the last, padded one)
                last = (valid[m].sum(dim=1) - 1).clamp_min(0)  # (B,)
                pooled[m] = h[torch.arange(h.shape[0], device=h.device), last]
        joint = torch.cat([pooled[m] for m in MODALITY_ORDER], dim=-1)  # (B, 6D)
        mid = self.out_drop(F.relu(self.proj1(joint)))
        return self.head(self.proj2(mid) + joint), pooled

    def frozen_modules(self) -> list[nn.Module]:
        """What stage 2 freezes: all transformers and the residual MLP (projections and head train)."""
        return [self.cross, self.memory, self.proj1, self.proj2, self.out_drop]


def encoder_size(d: int, n_layers: int) -> int:
    """Parameters of one MultEncoder of width d: n (12 d^2 + 13 d) + 2 d (final LayerNorm)."""
    return n_layers * (12 * d * d + 13 * d) + 2 * d
