"""Conversation context (`train.context: dialogue`): a transformer over the utterances of a dialogue.

Every method encodes an utterance as it does in `utterance` mode (its frames, or its single
vector) down to the per-utterance state its prediction head reads. In dialogue mode a
`ContextEncoder` sits in front of that head: the batch's utterances are laid out per dialogue
(`DialogueLayout`: which dialogue, which turn, which speaker), padded to (dialogues, turns, D),
attended across turns (padding never attended; `causal` lets a turn see only earlier turns and
itself) and gathered back to one contextual state per utterance. The MLP of each context layer
works per utterance, so MCULoRA's per-utterance combination selects its adapters there too (a
conversation can lose the camera halfway).

The encoder is attached to a network by `attach_context` (called by `build_network` when
`config.context == "dialogue"`): a forward pre-hook on the network takes the `dialogue=` keyword
(a `DialogueLayout`, or None: every row its own dialogue), and a pre-hook on the method's head
module (`context_head()`, default `net.head`) replaces the head's input by the contextual state.
Callers build the keyword with `forward_extras`, the one place that knows which extra inputs a
model reads.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from pipeline.methods.config import CONTEXTS  # noqa: F401  (re-exported)


@dataclass
class DialogueLayout:  # not frozen: Lightning moves batch dataclasses field by field
    """Where each row of a batch sits in its conversation; all (N,) int64, row order = batch order."""

    slot: torch.Tensor  # dialogue of the row, 0..n_dialogues-1 (dense)
    turn: torch.Tensor  # position of the row inside its dialogue among the batch's rows, 0..len-1 (dense)
    speaker: torch.Tensor  # speaker role inside the dialogue: 0 = first speaker to talk, 1 = the next, ...

    @property
    def n_dialogues(self) -> int:
        return int(self.slot.max()) + 1 if self.slot.numel() else 0

    @property
    def max_turns(self) -> int:
        return int(self.turn.max()) + 1 if self.turn.numel() else 0

    def to(self, device: torch.device | str) -> "DialogueLayout":
        return DialogueLayout(self.slot.to(device), self.turn.to(device), self.speaker.to(device))

    def select(self, rows: torch.Tensor | np.ndarray) -> "DialogueLayout":
        """The layout of a subset of rows (index (R,) or bool (N,)), re-made dense: a dropped row
        leaves no hole in its dialogue, a dialogue left without rows disappears."""
        keep = torch.as_tensor(rows, device=self.slot.device)
        if keep.dtype == torch.bool:
            keep = keep.nonzero(as_tuple=True)[0]
        return dense_layout(self.slot.index_select(0, keep).cpu().numpy(),
                            self.turn.index_select(0, keep).cpu().numpy(),
                            self.speaker.index_select(0, keep).cpu().numpy()).to(self.slot.device)


def dense_layout(dialogue: np.ndarray, turn: np.ndarray, speaker: np.ndarray) -> DialogueLayout:
    """Layout of rows given their dialogue ids (any hashable), turn numbers and speaker ids.

    Rows of a dialogue are ordered by (turn, row order); speaker roles are numbered by first
    appearance in that order. Vectorised: no per-row Python work beyond `np.unique`.
    """
    n = len(dialogue)
    if n == 0:
        empty = torch.zeros(0, dtype=torch.long)
        return DialogueLayout(empty, empty, empty)
    _, slot = np.unique(np.asarray(dialogue).astype(str), return_inverse=True)  # (N,)
    order = np.lexsort((np.arange(n), np.asarray(turn, dtype=np.int64), slot))  # by slot, turn, row
    start = np.r_[0, np.flatnonzero(np.diff(slot[order])) + 1]  # first position of each dialogue in `order`
    rank = np.arange(n) - np.repeat(start, np.diff(np.r_[start, n]))  # position inside the dialogue
    dense_turn = np.empty(n, dtype=np.int64)
    dense_turn[order] = rank
    # speaker role: order of first appearance inside the dialogue
    _, spk = np.unique(np.asarray(speaker).astype(str), return_inverse=True)  # (N,) speaker codes
    pair = slot.astype(np.int64) * (int(spk.max()) + 1) + spk  # (N,) one code per (dialogue, speaker)
    pairs, first, inverse = np.unique(pair[order], return_index=True, return_inverse=True)  # first turn of each
    pair_slot = pairs // (int(spk.max()) + 1)
    by_slot = np.lexsort((first, pair_slot))  # pairs ordered by dialogue, then first appearance
    bounds = np.r_[0, np.flatnonzero(np.diff(pair_slot[by_slot])) + 1]
    pair_role = np.empty(len(pairs), dtype=np.int64)
    pair_role[by_slot] = np.arange(len(pairs)) - np.repeat(bounds, np.diff(np.r_[bounds, len(pairs)]))
    role = np.empty(n, dtype=np.int64)
    role[order] = pair_role[inverse.reshape(-1)]
    as_t = lambda a: torch.as_tensor(np.asarray(a, dtype=np.int64))  # noqa: E731
    return DialogueLayout(as_t(slot), as_t(dense_turn), as_t(role))


def singleton_layout(n: int, device: torch.device | str = "cpu") -> DialogueLayout:
    """Every row its own dialogue of one turn (a single utterance is a dialogue of one)."""
    rows = torch.arange(n, device=device)
    zeros = torch.zeros(n, dtype=torch.long, device=device)
    return DialogueLayout(rows, zeros, zeros)


class ContextLayer(nn.Module):
    """Pre-norm layer: attention across the turns of each dialogue, then a per-utterance MLP."""

    def __init__(self, cfg: Any, d: int, n_heads: int, causal: bool):
        super().__init__()
        from pipeline.methods.encoders import make_linear

        self.n_heads, self.causal, self.dropout = n_heads, causal, cfg.dropout
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)
        self.fc1 = make_linear(cfg, d, 2 * d, "context")  # MCLA adapters (per-utterance combination)
        self.fc2 = make_linear(cfg, 2 * d, d, "context")
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, h: torch.Tensor, layout: DialogueLayout, n_dial: int, n_turns: int) -> torch.Tensor:
        N, D = h.shape
        padded = h.new_zeros(n_dial, n_turns, 3 * D)
        padded[layout.slot, layout.turn] = self.qkv(self.ln1(h))  # (n_dial, L, 3D)
        valid = torch.zeros(n_dial, n_turns, dtype=torch.bool, device=h.device)
        valid[layout.slot, layout.turn] = True  # (n_dial, L)
        if torch.is_grad_enabled() and padded.requires_grad:
            # keep only q, k, v and the padding mask for backward (memory linear in dialogue length);
            # the (L x L) scores are recomputed there, with the same dropout draw
            y = checkpoint(self._attend, padded, valid, use_reentrant=False)
        else:
            y = self._attend(padded, valid)
        y = y[layout.slot, layout.turn]  # (N, D)
        h = h + self.drop(self.out(y))
        return h + self.drop(self.fc2(F.gelu(self.fc1(self.ln2(h)))))  # (N, D)

    def _attend(self, padded: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Attention across the turns of each dialogue: (n_dial, L, 3D) q|k|v -> (n_dial, L, D)."""
        n_dial, n_turns, D = padded.shape[0], padded.shape[1], padded.shape[2] // 3
        H = self.n_heads
        allowed = valid[:, None, :].expand(n_dial, n_turns, n_turns)  # (n_dial, L query, L key)
        if self.causal:
            allowed = allowed & torch.ones(n_turns, n_turns, dtype=torch.bool, device=padded.device).tril()
        # a padded query row would attend to nothing (NaN): let it see itself; it is never gathered
        allowed = allowed | torch.eye(n_turns, dtype=torch.bool, device=padded.device)[None]
        q, k, v = (t.view(n_dial, n_turns, H, D // H).transpose(1, 2) for t in padded.split(D, dim=-1))  # (n_dial, H, L, D/H)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed[:, None],
                                           dropout_p=self.dropout if self.training else 0.0)  # (n_dial, H, L, D/H)
        return y.transpose(1, 2).reshape(n_dial, n_turns, D)


class ContextEncoder(nn.Module):
    """Per-utterance states (N, D) -> contextual states (N, D) over each dialogue's turns."""

    def __init__(self, cfg: Any, d: int):
        super().__init__()
        opts = cfg.context_options
        heads = int(opts.get("n_heads") or cfg.n_heads)
        self.n_heads = heads if d % heads == 0 else 1
        self.max_turns, self.max_speakers = int(opts["max_turns"]), int(opts["max_speakers"])
        self.turn_embedding = nn.Parameter(torch.randn(self.max_turns, d) * 0.02)  # learned turn positions
        self.speaker_embedding = nn.Parameter(torch.randn(self.max_speakers, d) * 0.02)  # speaker roles
        self.layers = nn.ModuleList(ContextLayer(cfg, d, self.n_heads, bool(opts["causal"]))
                                    for _ in range(int(opts["n_layers"])))
        self.ln_f = nn.LayerNorm(d)

    def forward(self, h: torch.Tensor, layout: DialogueLayout | None) -> torch.Tensor:
        if layout is None:
            layout = singleton_layout(h.shape[0], h.device)
        if layout.slot.shape[0] != h.shape[0]:
            raise ValueError(f"dialogue layout has {layout.slot.shape[0]} rows, the batch {h.shape[0]}")
        layout = layout.to(h.device)
        # turns beyond the table share its last position; speakers beyond it share the last role
        turn = layout.turn.clamp_max(self.max_turns - 1)
        h = h + self.turn_embedding[turn] + self.speaker_embedding[layout.speaker.clamp_max(self.max_speakers - 1)]
        n_dial, n_turns = layout.n_dialogues, layout.max_turns
        for layer in self.layers:
            h = layer(h, layout, n_dial, n_turns)
        return self.ln_f(h)  # (N, D)


def context_head(net: nn.Module) -> nn.Module:
    """The module whose input is the method's per-utterance state (the prediction head)."""
    return net.context_head() if hasattr(net, "context_head") else net.head


def attach_context(net: nn.Module) -> nn.Module:
    """Give `net` a ContextEncoder in front of its head (see the module docstring); returns `net`."""
    head = context_head(net)
    d = head.in_features
    net.context = ContextEncoder(_context_config(net.config), d)
    net._dialogue_layout = None

    def take_layout(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        module._dialogue_layout = kwargs.pop("dialogue", None)
        return args, kwargs

    def contextualise(module: nn.Module, args: tuple) -> tuple:
        return (net.context(args[0], net._dialogue_layout), *args[1:])

    net.register_forward_pre_hook(take_layout, with_kwargs=True)
    head.register_forward_pre_hook(contextualise)
    return net


def _context_config(cfg: Any) -> Any:
    """MCLA adapters in the context layers only for MCULoRA (the other methods have none)."""
    return cfg if cfg.method == "mculora" else replace(cfg, variant="plain")


def reads_dialogue(model: nn.Module) -> bool:
    return getattr(getattr(model, "config", None), "context", "utterance") == "dialogue"


def forward_extras(model: nn.Module, index: torch.Tensor | None = None,
                   dialogue: DialogueLayout | None = None, rows: torch.Tensor | None = None) -> dict[str, Any]:
    """The keyword inputs `model` reads beyond (features, lengths, mask, combination).

    `rows` (R,): the batch rows the model will see; only the inputs the model reads are cut to them.
    """
    extras: dict[str, Any] = {}
    if index is not None and getattr(model, "reads_row_index", False):
        extras["index"] = index if rows is None else index.to(rows.device).index_select(0, rows)
    if reads_dialogue(model):
        extras["dialogue"] = dialogue if dialogue is None or rows is None else dialogue.select(rows)
    return extras
