"""MPLMM's three prompt kinds (spec: shared/spec/mplmm.md), shared by both backbones.

- Generative prompts: G_m (P, D) per modality and a channel map C_{s->m} = GELU(Linear d_s -> D)
  per ordered pair; for an absent m, [G_m ; C_{s->m}(X_s) for present s] becomes Z_m (T'_m, D)
  through the `attention` generator (T'_m learned queries, padding-masked) or the faithful
  `dense` one (a linear map over time positions per (target, source set)); `none` = zero tokens.
- Missing-signal prompts S_m^pres / S_m^miss, zero-initialised, added to real / generated tokens
  (`positional`: one row per time step, `vector`: one row).
- Missing-type prompts: Q (3, P, D) shared, K_m (rows of S_m, D'), and per combination c
  M(c) = sum_m (S_m^{state of m in c})^T K_m; fusion target j receives the P tokens Q_j M(c).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from pipeline.core.modalities import MASKS, MODALITY_ORDER

GENERATORS = ("attention", "dense", "none")
SIGNAL_PROMPTS = ("positional", "vector")
TYPE_PROMPT_INITS = ("small", "zero")


def sources_of(m: str) -> tuple[str, str]:
    """The two other modalities, in project order (the sources a target m is generated from)."""
    return tuple(s for s in MODALITY_ORDER if s != m)  # type: ignore[return-value]


class CrossAttention(nn.Module):
    """Learned queries (Tq, D) attend over a padded sequence; padded keys get weight exactly 0."""

    def __init__(self, d: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.q, self.k, self.v, self.out = (nn.Linear(d, d) for _ in range(4))

    def keys_values(self, x: torch.Tensor) -> torch.Tensor:
        """[k(x); v(x)] (..., 2D) in one matmul; applied to valid tokens only (see PromptBank.generate)."""
        return F.linear(x, torch.cat([self.k.weight, self.v.weight]), torch.cat([self.k.bias, self.v.bias]))

    def forward(self, queries: torch.Tensor, kv: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """queries (Tq, D), kv (n, L, 2D) from `keys_values`, valid (n, L) -> (n, Tq, D)."""
        n, L, D = kv.shape[0], kv.shape[1], kv.shape[2] // 2
        H, Tq = self.n_heads, queries.shape[0]
        q = self.q(queries).view(1, Tq, H, D // H).transpose(1, 2).expand(n, -1, -1, -1)  # (n, H, Tq, Dh)
        k, v = (t.reshape(n, L, H, D // H).transpose(1, 2) for t in kv.split(D, dim=-1))  # (n, H, L, Dh)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=valid[:, None, None, :])  # (n, H, Tq, Dh)
        return self.out(y.transpose(1, 2).reshape(n, Tq, D))  # (n, Tq, D)


class AttentionGenerator(nn.Module):
    """Z_m = GELU(attention of T'_m learned queries over [G_m ; C_{s->m}(X_s)]); no length-sized weights."""

    def __init__(self, d: int, n_heads: int, gen_tokens: dict[str, int]):
        super().__init__()
        self.queries = nn.ParameterDict({m: nn.Parameter(torch.randn(t, d) * 0.02) for m, t in gen_tokens.items()})
        self.attn = nn.ModuleDict({m: CrossAttention(d, n_heads) for m in gen_tokens})

    def embed(self, m: str, x: torch.Tensor) -> torch.Tensor:
        return self.attn[m].keys_values(x)  # (..., 2D)

    def forward(self, m: str, parts: list[torch.Tensor], valids: list[torch.Tensor],
                source_present: torch.Tensor) -> torch.Tensor:
        kv, valid = torch.cat(parts, dim=1), torch.cat(valids, dim=1)  # (n, L, 2D), (n, L)
        return F.gelu(self.attn[m](self.queries[m], kv, valid))  # (n, T'_m, D)


class DenseGenerator(nn.Module):
    """Faithful generator: per (target m, source set S) one linear map over time positions,
    P + sum of the caps of S -> T'_m, applied to [G_m ; C_{s->m}(X_s) zero-padded to its cap]."""

    def __init__(self, prompt_length: int, caps: dict[str, int], gen_tokens: dict[str, int]):
        super().__init__()
        self.maps = nn.ModuleDict()
        for m, t_out in gen_tokens.items():
            for key in self.source_sets(m):
                self.maps[f"{m}_from_{key}"] = nn.Linear(prompt_length + sum(caps[s] for s in key), t_out)

    def embed(self, m: str, x: torch.Tensor) -> torch.Tensor:
        return x  # the time maps act on the tokens themselves

    @staticmethod
    def source_sets(m: str) -> tuple[str, ...]:
        s1, s2 = sources_of(m)
        return (s1, s2, s1 + s2)

    def forward(self, m: str, parts: list[torch.Tensor], valids: list[torch.Tensor],
                source_present: torch.Tensor) -> torch.Tensor:
        prompt, padded = parts[0], parts[1:]  # (n, P, D), 2 x (n, cap_s, D) zero where invalid
        n, D = prompt.shape[0], prompt.shape[2]
        out: torch.Tensor | None = None
        for key, pattern in zip(self.source_sets(m), ((True, False), (False, True), (True, True))):
            rows = (source_present == source_present.new_tensor(pattern)).all(dim=1).nonzero(as_tuple=True)[0]
            if rows.numel() == 0:
                continue
            seq = torch.cat([prompt] + [p for p, used in zip(padded, pattern) if used], dim=1)  # (n, L, D)
            lin = self.maps[f"{m}_from_{key}"]
            z = torch.einsum("tl,nld->ntd", lin.weight, seq.index_select(0, rows)) + lin.bias[None, :, None]
            out = (seq.new_zeros(n, lin.out_features, D) if out is None else out).index_copy(0, rows, F.gelu(z))
        if out is None:
            raise ValueError(f"generating {m!r}: no row has a present source modality")
        return out  # (n, T'_m, D)


class PromptBank(nn.Module):
    """All MPLMM prompts and the generator; the backbone supplies widths D (tokens) and D' (type prompts)."""

    def __init__(self, *, d: int, d_type: int, prompt_length: int, input_dims: dict[str, int],
                 caps: dict[str, int], gen_tokens: dict[str, int], generator: str, signal_prompts: str,
                 type_prompt_init: str, n_heads: int, type_prompts: bool = True):
        super().__init__()
        self.caps, self.gen_tokens, self.generator_kind = dict(caps), dict(gen_tokens), generator
        self.use_type_prompts = type_prompts
        P = prompt_length
        if generator != "none":
            self.generative = nn.ParameterDict({m: nn.Parameter(torch.randn(P, d) * 0.02) for m in MODALITY_ORDER})
            self.channel = nn.ModuleDict({f"{s}_to_{m}": nn.Linear(input_dims[s], d)
                                          for m in MODALITY_ORDER for s in sources_of(m)})
            self.generator = (AttentionGenerator(d, n_heads, gen_tokens) if generator == "attention"
                              else DenseGenerator(P, caps, gen_tokens))
        rows = {m: caps[m] if signal_prompts == "positional" else 1 for m in MODALITY_ORDER}
        self.signal_present = nn.ParameterDict({m: nn.Parameter(torch.zeros(r, d)) for m, r in rows.items()})
        self.signal_missing = nn.ParameterDict({m: nn.Parameter(torch.zeros(r, d)) for m, r in rows.items()})
        if type_prompts:
            std = 0.02 if type_prompt_init == "small" else 0.0  # "zero" = the published, inert prompts
            # Q: one (P, D) block per target, so that Q_j M(c) is (P, D') (the spec's "P x D'" cannot
            # multiply M(c) (D, D') when D' = 2D, as for MulT)
            self.type_queries = nn.Parameter(torch.randn(3, P, d) * std)
            self.type_keys = nn.ParameterDict({m: nn.Parameter(torch.randn(r, d_type) * std)
                                               for m, r in rows.items()})
        self.register_buffer("comb_masks", torch.as_tensor(MASKS), persistent=False)  # (7, 3)

    def signal(self, m: str, state: str, T: int) -> torch.Tensor:
        """S_m^state for T tokens: (T, D) for positional prompts, (1, D) (broadcast) for a vector."""
        s = (self.signal_present if state == "present" else self.signal_missing)[m]
        return s[:T] if s.shape[0] > 1 else s

    def generate(self, m: str, xs: dict[str, torch.Tensor], valid: dict[str, torch.Tensor],
                 rows: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        """Z_m (n, T'_m, D) for the batch rows `rows` lacking m, from each row's present sources.

        xs[s] (B, T_s, d_s) standardised features, zero wherever valid[s] (B, T_s) is False, so
        an absent source (or a padded step) contributes only masked or zero tokens.
        """
        n = rows.numel()
        if self.generator_kind == "none":
            D = self.signal_missing[m].shape[1]
            return self.signal_missing[m].new_zeros(n, self.gen_tokens[m], D)
        srcs = sources_of(m)
        idx = [MODALITY_ORDER.index(s) for s in srcs]
        source_present = present.index_select(0, rows)[:, idx]  # (n, 2)
        P = self.generative[m].shape[0]
        parts = [self.generator.embed(m, self.generative[m]).unsqueeze(0).expand(n, -1, -1)]  # (n, P, D or 2D)
        valids = [source_present.new_ones(n, P)]
        for s in srcs:
            ok = valid[s].index_select(0, rows)  # (n, T_s): present source, real step
            r, t = ok.nonzero(as_tuple=True)  # (k,) each: only valid tokens are computed
            c = self.generator.embed(m, F.gelu(self.channel[f"{s}_to_{m}"](xs[s][rows[r], t])))  # (k, D or 2D)
            c = c.new_zeros(n, ok.shape[1], c.shape[1]).index_put((r, t), c)  # (n, T_s, .), zero elsewhere
            if self.generator_kind == "dense":  # fixed time layout: zero-pad to the cap
                c, ok = F.pad(c, (0, 0, 0, self.caps[s] - c.shape[1])), F.pad(ok, (0, self.caps[s] - ok.shape[1]))
            parts.append(c)
            valids.append(ok)
        return self.generator(m, parts, valids, source_present)

    def type_tokens(self, comb: torch.Tensor) -> torch.Tensor | None:
        """Missing-type prompt tokens Q_j M(c) for each row's combination: (3, B, P, D'); None if disabled."""
        if not self.use_type_prompts:
            return None
        M = 0.0
        for i, m in enumerate(MODALITY_ORDER):
            pres = self.signal_present[m].t() @ self.type_keys[m]  # (D, D')
            miss = self.signal_missing[m].t() @ self.type_keys[m]  # (D, D')
            M = M + torch.where(self.comb_masks[:, i, None, None], pres, miss)  # (7, D, D')
        J, P, D = self.type_queries.shape
        per_comb = torch.matmul(self.type_queries.reshape(1, J * P, D), M)  # (7, 3P, D')
        return per_comb.index_select(0, comb).view(-1, J, P, M.shape[2]).transpose(0, 1)  # (3, B, P, D')

    def group_sizes(self) -> dict[str, int]:
        """Parameters per prompt kind: generative (G, channel maps, generator), signal, type."""
        sizes = {"prompts_generative": 0, "prompts_signal": 0, "prompts_type": 0}
        for name, p in self.named_parameters():
            kind = ("prompts_signal" if name.startswith("signal_") else
                    "prompts_type" if name.startswith("type_") else "prompts_generative")
            sizes[kind] += p.numel()
        return sizes
