"""The project's `imer` backbone as MPLMM drives it: the network's own encoder layers, fusion and head
(`net.encoders`, `net.fusion`, `net.head`, `net.drop`, as in MCULoRANet) over prompted token sequences."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from pipeline.core.modalities import MODALITY_ORDER
from pipeline.methods.encoders import EncoderLayer, masked_mean


def imer_fuse(net: nn.Module, tokens: dict[str, torch.Tensor], valid: dict[str, torch.Tensor],
              type_tokens: torch.Tensor | None, entered: torch.Tensor, readout: str
              ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The project's encoder layers per modality (+ P type-prompt tokens (3, B, P, D), no position), fusion,
    head -> (prediction, pooled h_m). Rows where m did not enter (`entered` (B, 3); imer stage 1) are
    skipped and get h_m = 0, as in MCULoRANet."""
    hs, pooled = [], {}
    for j, m in enumerate(MODALITY_ORDER):
        enc, T = net.encoders[m], tokens[m].shape[1]
        B = tokens[m].shape[0]
        rows = None if bool(entered[:, j].all()) else entered[:, j].nonzero(as_tuple=True)[0]  # (k,)
        if rows is not None and rows.numel() == 0:
            pooled[m] = h = tokens[m].new_zeros(B, tokens[m].shape[2])
            hs.append(h)
            continue
        z, v = (tokens[m], valid[m]) if rows is None else (tokens[m][rows], valid[m][rows])
        z = enc.drop(z + enc.pos[:T])  # (k, T, D)
        keep = slice(0, T)  # the outputs the read-out needs: data tokens (mean) or the last prompt token
        if type_tokens is not None:
            extra = type_tokens[j] if rows is None else type_tokens[j][rows]  # (k, P, D)
            z, v = torch.cat([z, extra], dim=1), torch.cat([v, v.new_ones(extra.shape[:2])], dim=1)
            keep = slice(-1, None) if readout == "prompt" else keep
        for layer in enc.layers[:-1]:
            z = layer(z, v)
        z = enc.ln_f(last_layer(enc.layers[-1], z, v, keep))  # (k, |keep|, D)
        h = z[:, -1] if keep.start == -1 else masked_mean(z, valid[m] if rows is None else valid[m][rows])
        if rows is not None:
            h = h.new_zeros(B, h.shape[1]).index_copy(0, rows, h)  # (B, D)
        pooled[m] = h
        hs.append(h)
    return net.head(net.drop(F.gelu(net.fusion(torch.cat(hs, dim=-1))))), pooled


def last_layer(layer: EncoderLayer, x: torch.Tensor, valid: torch.Tensor, keep: slice) -> torch.Tensor:
    """`layer(x, valid)[:, keep]` without computing the other positions' queries and MLP: every token
    is still a key and value, but only the read-out's tokens (data tokens, or the last prompt token)
    come out. x (N, L, D), valid (N, L) -> (N, |keep|, D)."""
    attn, (N, L, D) = layer.attn, x.shape
    H = attn.n_heads
    h = layer.ln1(x)
    Wq, Wk, Wv = attn.qkv.weight.split(D)
    bq, bk, bv = attn.qkv.bias.split(D)
    heads = lambda t: t.view(N, t.shape[1], H, D // H).transpose(1, 2)  # noqa: E731  (N, H, L, D/H)
    q, k, v = heads(F.linear(h[:, keep], Wq, bq)), heads(F.linear(h, Wk, bk)), heads(F.linear(h, Wv, bv))
    keys = valid | ~valid.any(dim=1, keepdim=True)  # as SelfAttention: an empty row attends everywhere
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=keys[:, None, None, :],
                                       dropout_p=attn.dropout if attn.training else 0.0)  # (N, H, |keep|, D/H)
    x = x[:, keep] + layer.drop(attn.out(y.transpose(1, 2).reshape(N, y.shape[2], D)))
    return x + layer.drop(layer.fc2(F.gelu(layer.fc1(layer.ln2(x)))))  # (N, |keep|, D)
