"""MCULoRANet: three modality encoders, fusion and head, all sharing one active combination."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from pipeline.core.modalities import MASKS, MODALITY_ORDER
from pipeline.methods.config import ModelConfig
from pipeline.methods.encoders import ModalityEncoder, make_linear
from pipeline.methods.mcla import Combination, is_adapter_parameter, normalise_combination, set_active_combination


@dataclass
class ModelOutput:
    prediction: torch.Tensor  # (B, n_outputs): logits, or scores for regression
    r_com: dict[str, torch.Tensor]  # m -> (B, D) pooled shared-branch output (zeros where m is absent)
    r_spec: dict[str, torch.Tensor]  # m -> (B, D) pooled combination-branch output (zeros if absent/no branch)
    modality_mask: torch.Tensor  # (B, 3) bool: modalities that actually entered the model
    pooled: dict[str, torch.Tensor] | None = None  # m -> (B, D) pooled encoder output h_m (zeros where absent)


class MCULoRANet(nn.Module):
    # Training stages (see `set_stage`): "stage1" = base network only (adapters stay at their no-op
    # init), "main" = everything trains (from_scratch), "stage2" = adapters and head only (two_stage).
    STAGES = ("stage1", "main", "stage2")

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.encoders = nn.ModuleDict({m: ModalityEncoder(config, config.input_dims[m], config.seq_lens[m])
                                       for m in MODALITY_ORDER})
        self.fusion = make_linear(config, 3 * config.d_model, config.d_fusion, "fusion")
        self.head = make_linear(config, config.d_fusion, config.n_outputs, "head")
        self.drop = nn.Dropout(config.dropout)
        self.register_buffer("comb_masks", torch.as_tensor(MASKS), persistent=False)  # (7, 3)

    def forward(self, features: dict[str, torch.Tensor], lengths: dict[str, torch.Tensor],
                mask: torch.Tensor, combination: Combination | str | None = None) -> ModelOutput:
        """`mask` (B, 3) is the effective presence; `combination` selects the adapters (int for a
        homogeneous batch, LongTensor (B,) per sample, None = derive each sample's from `mask`).

        A modality enters a sample only if mask says so, the combination contains it and its length
        is > 0; otherwise its features are never read and h_m = 0.
        """
        B = mask.shape[0]
        comb = self._resolve_combination(combination, mask)
        set_active_combination(self, comb)
        allowed = self.comb_masks[comb]  # (3,) for an int, (B, 3) per sample
        D = self.config.d_model
        hs, r_com, r_spec, present_cols = [], {}, {}, []
        for i, m in enumerate(MODALITY_ORDER):
            present = mask[:, i] & allowed[..., i] & (lengths[m] > 0)  # (B,)
            present_cols.append(present)
            h = rc = rs = self.head.base.weight.new_zeros(B, D)
            if bool(present.any()):
                h, rc, rs = self._encode(m, features[m], lengths[m], present, comb, h)
            hs.append(h)
            r_com[m], r_spec[m] = rc, rs
        fused = torch.cat(hs, dim=-1)  # (B, 3D)
        prediction = self.head(self.drop(F.gelu(self.fusion(fused))))  # (B, n_outputs)
        pooled = dict(zip(MODALITY_ORDER, hs))
        return ModelOutput(prediction, r_com, r_spec, torch.stack(present_cols, dim=1), pooled)

    def _encode(self, m: str, x: torch.Tensor, lengths: torch.Tensor, present: torch.Tensor,
                comb: Combination, zeros: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Run modality m's encoder on its present rows only, scattering results back to (B, D)."""
        enc = self.encoders[m]
        if bool(present.all()):
            h, rc, rs = enc(x, lengths)
            return h, _or_zeros(rc, zeros), _or_zeros(rs, zeros)
        rows = present.nonzero(as_tuple=True)[0]  # (N,)
        if not isinstance(comb, int):
            set_active_combination(enc, comb[rows])
        h, rc, rs = enc(x.index_select(0, rows), lengths.index_select(0, rows))  # (N, D) each
        scatter = lambda t: zeros.index_copy(0, rows, _or_zeros(t, h))  # noqa: E731  (N, D) -> (B, D)
        return scatter(h), scatter(rc), scatter(rs)

    def _resolve_combination(self, combination: Combination | str | None, mask: torch.Tensor) -> Combination:
        if combination is not None:
            comb = normalise_combination(combination)
            if isinstance(comb, torch.Tensor) and comb.shape != (mask.shape[0],):
                raise ValueError(f"combination has shape {tuple(comb.shape)}, mask has {mask.shape[0]} rows")
            return comb.to(mask.device) if isinstance(comb, torch.Tensor) else comb
        code = mask[:, 0].long() + 2 * mask[:, 1].long() + 4 * mask[:, 2].long()  # (B,) bit code
        lookup = torch.full((8,), -1, dtype=torch.long, device=mask.device)
        for i, row in enumerate(self.comb_masks.long()):
            lookup[int(row[0] + 2 * row[1] + 4 * row[2])] = i
        comb = lookup[code]
        if bool((comb < 0).any()):
            bad = (comb < 0).nonzero(as_tuple=True)[0][:5].tolist()
            raise ValueError(f"rows {bad} have no modality present: pass `combination` explicitly")
        return comb

    # ---- regimes ---------------------------------------------------------------------------------
    def set_input_statistics(self, stats: dict[str, tuple[Any, Any]]) -> None:
        """Per-modality (mean, std) over the train split's valid frames (see `feature_statistics`)."""
        for m, (mean, std) in stats.items():
            self.encoders[m].set_input_statistics(torch.as_tensor(mean), torch.as_tensor(std))

    # ---- the method interface (pipeline/methods/registry.py) ----------------------------------------
    def training_plan(self, cfg: Any) -> list:
        """from_scratch: one stage, everything trains. two_stage: base with modality dropout, then adapters.

        `plain` trains on random modality dropout; the adapter variants on one combination per batch,
        re-weighted by DPFT. The selected stage is called "main" in the history either way.
        """
        from pipeline.training.plan import StagePlan

        final = "dropout" if self.config.variant == "plain" else "homogeneous"
        plan = []
        if cfg.regime == "two_stage":
            plan.append(StagePlan("stage1", cfg.stage1_epochs, "dropout"))
        plan.append(StagePlan("stage2" if cfg.regime == "two_stage" else "main", cfg.max_epochs, final,
                              dpft=final == "homogeneous", select=True, history_name="main"))
        return plan

    def auxiliary_losses(self, out: ModelOutput, batch: dict) -> dict[str, tuple[float, torch.Tensor]]:
        """MCULoRA's decoupling loss, weighted by lambda_ort (only the full variant has R_c to decouple)."""
        from pipeline.methods.losses import orthogonality_loss

        if self.config.variant != "mculora":
            return {"l_ort": (0.0, out.prediction.new_zeros(()))}
        weight = self.config.lambda_ort
        value = orthogonality_loss(out.r_spec, out.r_com, out.modality_mask) if weight > 0 else out.prediction.new_zeros(())
        return {"l_ort": (weight, value)}

    @property
    def has_separability(self) -> bool:
        """DPFT's separability statistic needs the combination branch of the input projection."""
        return self.config.variant == "mculora" and "input" in self.config.adapt_targets

    def set_stage(self, stage: str) -> None:
        """Which parameter groups train in `stage` (one of STAGES)."""
        if stage == "stage1":
            for name, p in self.named_parameters():
                p.requires_grad_(not is_adapter_parameter(name))
        elif stage == "main":
            self.unfreeze_all()
        elif stage == "stage2":
            self.freeze_base()
        else:
            raise ValueError(f"{type(self).__name__}: unknown stage {stage!r}; known {self.STAGES}")

    def freeze_base(self) -> None:
        """two_stage regime, stage 2: only adapters and the prediction head stay trainable."""
        for name, p in self.named_parameters():
            p.requires_grad_(is_adapter_parameter(name) or name.startswith("head."))

    def unfreeze_all(self) -> None:
        for p in self.parameters():
            p.requires_grad_(True)

    def parameter_counts(self) -> dict[str, int]:
        """total / trainable / adapters (shared + specific) / base (= total - adapters)."""
        counts = dict(total=0, trainable=0, adapters=0, adapters_shared=0, adapters_specific=0)
        for name, p in self.named_parameters():
            n = p.numel()
            counts["total"] += n
            counts["trainable"] += n if p.requires_grad else 0
            if is_adapter_parameter(name):
                counts["adapters"] += n
                counts["adapters_shared" if ".shared." in name else "adapters_specific"] += n
        counts["base"] = counts["total"] - counts["adapters"]
        return counts


def _or_zeros(t: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(like) if t is None else t
