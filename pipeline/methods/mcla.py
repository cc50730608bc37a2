"""MCLA: a linear layer with one shared and one-per-combination low-rank adapter.

    y = W x + b + s * B_sh A_sh drop(x) + s * B_c A_c drop(x),   s = alpha / r

Peft-style: adapters live in `nn.ModuleDict`s keyed by adapter name ("shared", then the
7 combination names), A is Kaiming-uniform and B zero (a fresh adapter is a no-op), and
the active combination is explicit state set by `set_active`, never inferred from data.
Only the active combination's adapter is computed; mixed batches are served either by
grouping rows per combination or by gathering per-sample A/B matrices (same result).
"""
from __future__ import annotations

import contextlib
import math
from typing import Iterator, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from pipeline.core.modalities import COMBINATIONS
from pipeline.methods.config import MIXED_MODES, VARIANTS

Combination = Union[int, torch.Tensor]  # int (homogeneous batch) or LongTensor (B,) per sample
SHARED = "shared"


class MCLALinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, *, variant: str = "mculora", rank: int = 4,
                 alpha: float = 8.0, dropout: float = 0.0, mixed_mode: str = "group", bias: bool = True):
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"MCLALinear: variant must be one of {VARIANTS}, got {variant!r}")
        if mixed_mode not in MIXED_MODES:
            raise ValueError(f"MCLALinear: mixed_mode must be one of {MIXED_MODES}, got {mixed_mode!r}")
        self.in_features, self.out_features = in_features, out_features
        self.variant, self.mixed_mode = variant, mixed_mode
        self.rank, self.scaling = rank, alpha / rank
        self.base = nn.Linear(in_features, out_features, bias=bias)
        self.lora_A = nn.ModuleDict()  # name -> Linear(in, r): weight (r, in)
        self.lora_B = nn.ModuleDict()  # name -> Linear(r, out): weight (out, r)
        names = {"plain": (), "no_specific": (SHARED,), "mculora": (SHARED, *COMBINATIONS)}[variant]
        for name in names:
            self.lora_A[name] = nn.Linear(in_features, rank, bias=False)
            self.lora_B[name] = nn.Linear(rank, out_features, bias=False)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.active: Combination | None = None
        self.reset_adapters()

    def reset_adapters(self) -> None:
        """A as nn.Linear's default (kaiming_uniform a=sqrt(5)), B zero: the adapter starts as a no-op."""
        for name in self.lora_A:
            nn.init.kaiming_uniform_(self.lora_A[name].weight, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B[name].weight)

    @property
    def has_specific(self) -> bool:
        return self.variant == "mculora"

    def set_active(self, comb: Combination | str) -> None:
        """Select the combination adapter: int/name for a homogeneous batch, LongTensor (B,) for a mixed one."""
        self.active = normalise_combination(comb)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._can_merge():
            return F.linear(x, self.merged_weight(), self.base.bias)  # (..., out)
        return self.forward_with_branches(x)[0]

    def _can_merge(self) -> bool:
        """Homogeneous batch and no adapter dropout: fold the adapters into one weight for this call.

        W + s B_sh A_sh + s B_c A_c costs out*in*r flops per call instead of r*(in+out) per token,
        and keeps a single big matmul; gradients still reach W, A and B through the sum.
        """
        no_dropout = isinstance(self.lora_dropout, nn.Identity) or not self.training
        return self.variant != "plain" and no_dropout and (not self.has_specific or isinstance(self.active, int))

    def merged_weight(self) -> torch.Tensor:
        """W + s B_sh A_sh (+ s B_c A_c for the active combination): (out, in)."""
        names = [SHARED] + ([COMBINATIONS[self.active]] if self.has_specific else [])
        A = torch.cat([self.lora_A[n].weight for n in names], dim=0)  # (k r, in)
        B = torch.cat([self.lora_B[n].weight for n in names], dim=1)  # (out, k r)
        return torch.addmm(self.base.weight, B, A, alpha=self.scaling)  # (out, in)

    def forward_with_branches(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None,
                                                               torch.Tensor | None]:
        """(y, shared-branch output, combination-branch output); a branch the variant lacks is None.

        Branch outputs are the scaled terms s*B A drop(x) that enter y; the network pools them
        into R_com / R_c for the orthogonality loss and DPFT.
        """
        y = self.base(x)  # (..., out)
        if self.variant == "plain":
            return y, None, None
        xd = self.lora_dropout(x)
        shared = self._adapter(xd, SHARED)
        spec = None
        if self.has_specific:
            comb = self.active
            if comb is None:
                raise RuntimeError("MCLALinear: no active combination; call set_active() "
                                   "or use active_combination(model, comb)")
            if isinstance(comb, int):
                spec = self._adapter(xd, COMBINATIONS[comb])
            else:
                if comb.shape != (x.shape[0],):
                    raise ValueError(f"MCLALinear: per-sample combination has shape {tuple(comb.shape)}, "
                                     f"batch has {x.shape[0]} rows")
                spec = self._group(xd, comb) if self.mixed_mode == "group" else self._gather(xd, comb)
            y = y + spec
        return y + shared, shared, spec

    def _adapter(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return self.scaling * self.lora_B[name](self.lora_A[name](x))  # (..., out)

    def _group(self, x: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
        """Each combination's adapter on its own rows only."""
        out = x.new_zeros(*x.shape[:-1], self.out_features)  # (B, ..., out)
        for c in torch.unique(comb).tolist():
            rows = (comb == c).nonzero(as_tuple=True)[0]
            out = out.index_copy(0, rows, self._adapter(x.index_select(0, rows), COMBINATIONS[c]))
        return out

    def _gather(self, x: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
        """Per-sample A/B gathered from the stacked adapters, applied with batched matmuls.

        Without autograd all 7 adapters are stacked (no host sync). With autograd only the
        combinations present are stacked, so absent adapters get grad None rather than zeros
        (zero grads would still let Adam's momentum move them).
        """
        names, index = COMBINATIONS, comb
        if torch.is_grad_enabled() and self.lora_A[COMBINATIONS[0]].weight.requires_grad:
            present, index = torch.unique(comb, return_inverse=True)  # (P,), (B,) positions in present
            names = [COMBINATIONS[c] for c in present.tolist()]
        A = torch.stack([self.lora_A[c].weight for c in names])  # (P, r, in)
        B = torch.stack([self.lora_B[c].weight for c in names])  # (P, out, r)
        n = x.shape[0]
        xs = x.reshape(n, -1, self.in_features)  # (B, T, in); T = 1 for 2-D input
        h = torch.bmm(xs, A[index].transpose(1, 2))  # (B, T, r)
        y = torch.bmm(h, B[index].transpose(1, 2))  # (B, T, out)
        return self.scaling * y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, variant={self.variant}, "
                f"r={self.rank}, scaling={self.scaling:g}, mixed_mode={self.mixed_mode}")


def normalise_combination(comb: Combination | str) -> Combination:
    """Validate a combination: name or int -> int in 0..6; tensor -> LongTensor (B,) in 0..6."""
    if isinstance(comb, str):
        if comb not in COMBINATIONS:
            raise ValueError(f"unknown combination {comb!r}; expected one of {COMBINATIONS}")
        return COMBINATIONS.index(comb)
    if isinstance(comb, torch.Tensor):
        if comb.ndim == 0:
            return normalise_combination(int(comb))
        if comb.ndim != 1 or comb.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"per-sample combination must be an integer tensor (B,), got "
                             f"{comb.dtype} {tuple(comb.shape)}")
        if comb.numel() and (int(comb.min()) < 0 or int(comb.max()) >= len(COMBINATIONS)):
            raise ValueError(f"combination indices must lie in 0..{len(COMBINATIONS) - 1}, got "
                             f"{int(comb.min())}..{int(comb.max())}")
        return comb.long()
    comb = int(comb)  # accepts numpy integers
    if not 0 <= comb < len(COMBINATIONS):
        raise ValueError(f"combination index must lie in 0..{len(COMBINATIONS) - 1}, got {comb}")
    return comb


def set_active_combination(module: nn.Module, comb: Combination | str) -> None:
    """Set the active combination on every MCLALinear in `module`'s tree."""
    comb = normalise_combination(comb)
    for layer in module.modules():
        if isinstance(layer, MCLALinear):
            layer.active = comb


@contextlib.contextmanager
def active_combination(module: nn.Module, comb: Combination | str) -> Iterator[nn.Module]:
    """Temporarily activate `comb` on every MCLALinear in `module`; restores the previous state."""
    layers = [m for m in module.modules() if isinstance(m, MCLALinear)]
    previous = [m.active for m in layers]
    set_active_combination(module, comb)
    try:
        yield module
    finally:
        for layer, prev in zip(layers, previous):
            layer.active = prev


def is_adapter_parameter(name: str) -> bool:
    """True for parameters of a low-rank adapter (by the peft-style module names)."""
    return ".lora_A." in f".{name}" or ".lora_B." in f".{name}"
