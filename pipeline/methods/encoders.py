"""Per-modality encoder: adapted input projection, pre-norm transformer layers, masked mean pooling."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from pipeline.methods.config import ModelConfig
from pipeline.methods.mcla import MCLALinear


def make_linear(cfg: ModelConfig, in_f: int, out_f: int, target: str) -> MCLALinear:
    """An MCLALinear that carries adapters only if `target` is in cfg.adapt_targets."""
    variant = cfg.variant if target in cfg.adapt_targets else "plain"
    return MCLALinear(in_f, out_f, variant=variant, rank=cfg.lora_rank, alpha=cfg.lora_alpha,
                      dropout=cfg.lora_dropout, mixed_mode=cfg.mixed_mode)


def masked_mean(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean over valid tokens: x (N, T, D), valid (N, T) bool -> (N, D); a row with no valid token -> 0."""
    w = valid.to(x.dtype).unsqueeze(-1)  # (N, T, 1)
    return (x * w).sum(1) / w.sum(1).clamp_min(1.0)


class SelfAttention(nn.Module):
    """Multi-head self-attention over one modality's tokens; padded keys are never attended."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.dropout = cfg.n_heads, cfg.dropout
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.out = nn.Linear(cfg.d_model, cfg.d_model)

    def forward(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        N, T, D = x.shape
        q, k, v = self.qkv(x).split(D, dim=-1)  # 3 x (N, T, D)
        q, k, v = (t.view(N, T, self.n_heads, D // self.n_heads).transpose(1, 2) for t in (q, k, v))  # (N, H, T, Dh)
        # A row with no valid token would softmax over nothing (NaN): let it attend everywhere;
        # such rows are dropped by pooling anyway.
        keys = valid | ~valid.any(dim=1, keepdim=True)  # (N, T)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=keys[:, None, None, :],
                                           dropout_p=self.dropout if self.training else 0.0)  # (N, H, T, Dh)
        return self.out(y.transpose(1, 2).reshape(N, T, D))  # (N, T, D)


class EncoderLayer(nn.Module):
    """Pre-norm transformer layer; the MLP's two linears are adapted (target "encoder_mlp")."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        D = cfg.d_model
        self.ln1, self.ln2 = nn.LayerNorm(D), nn.LayerNorm(D)
        self.attn = SelfAttention(cfg)
        self.fc1 = make_linear(cfg, D, 4 * D, "encoder_mlp")
        self.fc2 = make_linear(cfg, 4 * D, D, "encoder_mlp")
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln1(x), valid))
        return x + self.drop(self.fc2(F.gelu(self.fc1(self.ln2(x)))))  # (N, T, D)


class ModalityEncoder(nn.Module):
    """Tokens (N, T, d_m) -> pooled h_m (N, D), plus pooled R_com^m / R_c^m from the input projection."""

    def __init__(self, cfg: ModelConfig, d_in: int, max_len: int):
        super().__init__()
        D = cfg.d_model
        self.max_len = max_len
        # Per-feature standardisation fitted on the train split (`set_input_statistics`); identity until
        # then. Buffers, so a saved checkpoint and the served model standardise exactly as training did.
        self.register_buffer("in_mean", torch.zeros(d_in))
        self.register_buffer("in_scale", torch.ones(d_in))
        self.proj = make_linear(cfg, d_in, D, "input")
        self.pos = nn.Parameter(torch.randn(max_len, D) * 0.02)  # learned positions
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(D)
        self.drop = nn.Dropout(cfg.dropout)

    def set_input_statistics(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Standardise inputs as (x - mean) / std per feature; a constant feature (std ~ 0) is only centred."""
        std = torch.as_tensor(std, dtype=torch.float32)
        self.in_mean.copy_(torch.as_tensor(mean, dtype=torch.float32))
        self.in_scale.copy_(torch.where(std > 1e-6, 1.0 / std.clamp_min(1e-6), torch.ones_like(std)))

    def forward(self, x: torch.Tensor, lengths: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        N, T, _ = x.shape
        if T > self.max_len:
            raise ValueError(f"sequence of {T} tokens exceeds seq_len={self.max_len} of this modality")
        valid = torch.arange(T, device=x.device)[None, :] < lengths[:, None]  # (N, T)
        x = torch.where(valid.unsqueeze(-1), (x - self.in_mean) * self.in_scale, 0.0)  # padding (even NaN) never leaks in
        z, shared, spec = self.proj.forward_with_branches(x)  # (N, T, D) each
        r_com = masked_mean(shared, valid) if shared is not None else None  # (N, D)
        r_spec = masked_mean(spec, valid) if spec is not None else None  # (N, D)
        z = self.drop(z + self.pos[:T])
        for layer in self.layers:
            z = layer(z, valid)
        return masked_mean(self.ln_f(z), valid), r_com, r_spec  # (N, D)
