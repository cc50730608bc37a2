"""WanderAdapter: a CP-factorised, low-rank-in-time fusion of the modalities' token sequences.

For each modality m and CP component k = 1..R (with r = rank, t = token_rank, K = out_tokens):

    Z_m   = GELU(H_m W_m + b_m), padding rows 0                   (T_m x r)
    S_mk  = U_mk V_mk^T on valid rows / valid length              (T_m x K)
    F_mk  = (S_mk^T Z_m) A_mk   if m is present, else C_mk        (K x D)
    fused = sum_k prod_m F_mk  (element-wise)                     (K x D)
    g     = LayerNorm(mean over the K rows of fused)              (D)

This is a *sum of rank-one products* (the published code sums each modality's factors over
k before the product, which collapses the CP rank to one; `cp_rank: 1` reproduces that
effective model). `init: live` starts U, V near a constant time map so every F_mk has
order-one entries; `init: zero_token` starts U, V at zero like the published code (the
adapter is then dead: every gradient is exactly zero). C_mk (`absent: learned`) stands in
for an absent modality; `absent: one` drops the absent modality from the product instead.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

ABSENT_MODES = ("learned", "one")
INIT_MODES = ("live", "zero_token")


class WanderAdapter(nn.Module):
    """One adapter reading one set of token states (one encoder layer) of every modality."""

    def __init__(self, modalities: Sequence[str], seq_lens: dict[str, int], d_model: int, *, rank: int,
                 cp_rank: int, token_rank: int, out_tokens: int, absent: str = "learned", init: str = "live"):
        super().__init__()
        if absent not in ABSENT_MODES:
            raise ValueError(f"wander.absent must be one of {ABSENT_MODES}, got {absent!r}")
        if init not in INIT_MODES:
            raise ValueError(f"wander.init must be one of {INIT_MODES}, got {init!r}")
        self.modalities = tuple(modalities)
        self.absent, self.init_mode = absent, init
        R, t, K, r, D = cp_rank, token_rank, out_tokens, rank, d_model
        self.inp = nn.ModuleDict({m: nn.Linear(D, r) for m in self.modalities})  # W_m, b_m
        self.time_u = nn.ParameterDict({m: nn.Parameter(torch.empty(R, seq_lens[m], t)) for m in self.modalities})
        self.time_v = nn.ParameterDict({m: nn.Parameter(torch.empty(R, K, t)) for m in self.modalities})
        self.feat = nn.ParameterDict({m: nn.Parameter(torch.empty(R, r, D)) for m in self.modalities})  # A_mk
        self.stand_in = nn.ParameterDict(
            {m: nn.Parameter(torch.ones(R, K, D)) for m in self.modalities} if absent == "learned" else {})  # C_mk
        self.norm = nn.LayerNorm(D)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Live: H W ~ N(0, 1) per entry, S ~ 1 + small noise, A scaled so F_mk is order one."""
        for m in self.modalities:
            lin = self.inp[m]
            nn.init.normal_(lin.weight, std=1.0 / math.sqrt(lin.in_features))
            nn.init.zeros_(lin.bias)
            R, _, t = self.time_u[m].shape
            r = self.feat[m].shape[1]
            with torch.no_grad():
                if self.init_mode == "zero_token":  # the published init: time factors at zero
                    self.time_u[m].zero_()
                    self.time_v[m].zero_()
                else:  # U V^T ~ 1: each output token starts as the valid-token mean, then specialises
                    self.time_u[m].copy_((1.0 + 0.1 * torch.randn_like(self.time_u[m])) / math.sqrt(t))
                    self.time_v[m].copy_((1.0 + 0.1 * torch.randn_like(self.time_v[m])) / math.sqrt(t))
                # mean_t GELU(N(0,1)) ~ 0.3 per entry, so A ~ N(0, 4/r) gives F entries of order one
                nn.init.normal_(self.feat[m], std=2.0 / math.sqrt(r))
                if m in self.stand_in:
                    self.stand_in[m].fill_(1.0)

    def factor(self, m: str, H: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """F_mk for every row: H (N, T, D), valid (N, T) bool -> (N, R, K, D).

        S_mk = U_mk V_mk^T is formed first (R x T x K, no batch dimension), so the batch sees two
        matmuls: Z^T S for all k at once, then the per-k feature maps A_mk."""
        N, T, _ = H.shape
        w = valid.to(H.dtype) / valid.sum(1, keepdim=True).clamp_min(1).to(H.dtype)  # (N, T): 1/len on valid rows
        z = F.gelu(self.inp[m](H)) * w.unsqueeze(-1)  # (N, T, r), padding rows 0
        S = torch.matmul(self.time_u[m][:, :T], self.time_v[m].transpose(1, 2))  # (R, T, K)
        R, _, K = S.shape
        r = z.shape[-1]
        y = z.transpose(1, 2).reshape(N * r, T) @ S.transpose(0, 1).reshape(T, R * K)  # (N r, R K) = S^T Z / len
        y = y.view(N, r, R, K).permute(2, 0, 3, 1).reshape(R, N * K, r)  # (R, N K, r)
        f = torch.bmm(y, self.feat[m])  # (R, N K, D)
        return f.view(R, N, K, -1).transpose(0, 1)  # (N, R, K, D)

    def forward(self, states: dict[str, torch.Tensor], valid: dict[str, torch.Tensor],
                present: dict[str, torch.Tensor]) -> torch.Tensor:
        """states m -> (B, T_m, D) (any values on absent rows: they are not used), valid m -> (B, T_m)
        bool, present m -> (B,) bool -> g (B, D)."""
        fused: torch.Tensor | None = None
        for m in self.modalities:
            p = present[m]
            if bool(p.any()):
                f = self.factor(m, states[m], valid[m] & p[:, None])  # (B, R, K, D)
                if m in self.stand_in:
                    f = torch.where(p[:, None, None, None], f, self.stand_in[m])  # absent rows use C_mk
                else:  # absent: one -> factor 1 on absent rows
                    f = torch.where(p[:, None, None, None], f, torch.ones_like(f))
            elif m in self.stand_in:
                f = self.stand_in[m].unsqueeze(0)  # (1, R, K, D): the whole batch lacks m
            else:
                continue  # absent: one, and no row has m: factor 1
            fused = f if fused is None else fused * f
        B = next(iter(present.values())).shape[0]
        if fused is None:  # absent: one and nothing present: the empty product
            R, K, _ = self.time_v[self.modalities[0]].shape
            fused = self.norm.weight.new_ones(1, R, K, self.norm.normalized_shape[0])
        fused = fused.expand(B, *fused.shape[1:])  # (B, R, K, D)
        return self.norm(fused.sum(1).mean(1))  # (B, D): sum of CP products, mean over output tokens


def adapter_parameter_count(modalities: Sequence[str], seq_lens: dict[str, int], d_model: int, *, rank: int,
                            cp_rank: int, token_rank: int, out_tokens: int, absent: str = "learned") -> int:
    """The spec's formula for one adapter (used by the network's counts and checked by tests)."""
    R, t, K, r, D = cp_rank, token_rank, out_tokens, rank, d_model
    per_m = sum(D * r + r + R * seq_lens[m] * t + R * K * t + R * r * D + (R * K * D if absent == "learned" else 0)
                for m in modalities)
    return per_m + 2 * D  # + LayerNorm
