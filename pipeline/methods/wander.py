"""WanderNet: the `plain` backbone plus a corrected Wander adapter (spec: shared/spec/wander.md).

Stage 1 trains the plain MCULoRANet backbone (encoders, fusion, head) with modality dropout.
Stage 2 freezes the encoders (kept in eval mode) and trains the adapter, the head and, with
`train_fusion`, the fusion layer. The adapter reads each present modality's final token states
(after `ln_f`, before pooling; `placement: every_layer` reads every layer) and adds
U_up g to the fusion pre-activation; U_up starts at zero, so stage 2 starts exactly at the
stage-1 model. State-dict keys of the backbone are those of a plain MCULoRANet, so a plain
stage-1 checkpoint loads with `load_backbone_state`.

Cached backbone: frozen eval-mode encoders see neither another modality nor the combination,
so their outputs depend on the sample alone; `enable_cache` computes them once per row
(keyed by the batch's `index`) and keeps them only if a probe batch gives the same
predictions and states cached and live (|diff| <= 1e-6 * max(1, |value|)).
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any, Iterable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from pipeline.core.modalities import MODALITY_ORDER
from pipeline.methods.backbone_cache import BackboneCache, encoder_states, relative_gap
from pipeline.methods.config import ModelConfig
from pipeline.methods.cp_adapter import WanderAdapter, adapter_parameter_count
from pipeline.methods.mcla import Combination
from pipeline.methods.mculora import MCULoRANet, ModelOutput

# train.wander defaults (params.yaml shows each with a comment; a test checks they agree). Stage-1
# epochs are train.stage1_epochs, shared with MCULoRA two_stage and MPLMM.
DEFAULTS: dict[str, Any] = dict(
    rank=16, cp_rank=8, token_rank=4, out_tokens=4, absent="learned", init="live", placement="last",
    train_fusion=True, cache_backbone=True, stage1_from=None, stage2_sampler="dropout",
)
PLACEMENTS = ("last", "every_layer")
STAGE2_SAMPLERS = ("dropout", "complete")
CACHE_TOLERANCE = 1e-6


def wander_options(options: dict[str, Any]) -> dict[str, Any]:
    """`config.options` merged over DEFAULTS and checked; raises ValueError naming the bad key."""
    unknown = set(options) - set(DEFAULTS)
    if unknown:
        raise ValueError(f"train.wander: unknown keys {sorted(unknown)}; known {sorted(DEFAULTS)}")
    o = {**DEFAULTS, **options}
    for key in ("rank", "cp_rank", "token_rank", "out_tokens"):
        if not isinstance(o[key], int) or o[key] < 1:
            raise ValueError(f"train.wander.{key} must be an integer >= 1, got {o[key]!r}")
    if o["placement"] not in PLACEMENTS:
        raise ValueError(f"train.wander.placement must be one of {PLACEMENTS}, got {o['placement']!r}")
    if o["stage1_from"] is not None and not isinstance(o["stage1_from"], str):
        raise ValueError(f"train.wander.stage1_from must be a checkpoint path or null, got {o['stage1_from']!r}")
    if o["stage2_sampler"] not in STAGE2_SAMPLERS:
        raise ValueError(f"train.wander.stage2_sampler must be one of {STAGE2_SAMPLERS}, got {o['stage2_sampler']!r}")
    for key in ("train_fusion", "cache_backbone"):
        if not isinstance(o[key], bool):
            raise ValueError(f"train.wander.{key} must be true or false, got {o[key]!r}")
    return o


class WanderNet(MCULoRANet):
    STAGES = ("stage1", "stage2")
    reads_row_index = True  # forward(..., index=batch["index"]) lets stage 2 read the backbone cache

    def __init__(self, config: ModelConfig):
        self.options = wander_options(dict(config.options))
        # The backbone is always the plain network (variant/adapt_targets/lora_* play no part here).
        super().__init__(replace(config, variant="plain"))
        o, D = self.options, config.d_model
        present = [m for m in MODALITY_ORDER if m in config.modalities]
        n_adapters = config.n_layers if o["placement"] == "every_layer" else 1
        self.adapters = nn.ModuleList(
            WanderAdapter(present, config.seq_lens, D, rank=o["rank"], cp_rank=o["cp_rank"],
                          token_rank=o["token_rank"], out_tokens=o["out_tokens"], absent=o["absent"],
                          init=o["init"]) for _ in range(n_adapters))
        self.up = nn.Linear(D, config.d_fusion, bias=False)  # U_up: zero, so stage 2 starts at stage 1
        nn.init.zeros_(self.up.weight)
        self.adapter_active = True  # explicit state: stage 1 skips the adapter (its output is 0 there)
        self.encoders_frozen = False
        self._cache: BackboneCache | None = None

    # ---- forward ----------------------------------------------------------------------------------
    def forward(self, features: dict[str, torch.Tensor], lengths: dict[str, torch.Tensor], mask: torch.Tensor,
                combination: Combination | str | None = None, index: torch.Tensor | None = None) -> ModelOutput:
        """As MCULoRANet.forward; `index` (B,) (the batch's row positions) lets stage 2 read the cache."""
        present = self._present(lengths, mask, combination)
        if self._use_cache(index):
            states, pooled = self._cached(index, lengths, present)
        else:
            states, pooled = self._live(features, lengths, present)
        u = self.fusion(torch.cat([pooled[m] for m in MODALITY_ORDER], dim=-1))  # (B, D_f)
        if self.adapter_active:
            valid = {m: torch.arange(states[m][0].shape[1], device=mask.device)[None, :] < lengths[m][:, None]
                     for m in states}  # (B, T_m)
            g = sum(adapter({m: s[j] for m, s in states.items()}, valid, present)
                    for j, adapter in enumerate(self.adapters))  # (B, D)
            u = u + self.up(g)
        prediction = self.head(self.drop(F.gelu(u)))  # (B, n_outputs)
        zeros = {m: torch.zeros_like(pooled[m]) for m in MODALITY_ORDER}
        return ModelOutput(prediction, zeros, dict(zeros), torch.stack([present[m] for m in MODALITY_ORDER], 1),
                           pooled)

    def _present(self, lengths, mask, combination) -> dict[str, torch.Tensor]:
        """m -> (B,) bool: in the mask, in the sample's combination and of length > 0."""
        allowed = self.comb_masks[self._resolve_combination(combination, mask)]  # (3,) or (B, 3)
        return {m: mask[:, i] & allowed[..., i] & (lengths[m] > 0) for i, m in enumerate(MODALITY_ORDER)}

    def _live(self, features, lengths, present) -> tuple[dict[str, list[torch.Tensor]], dict[str, torch.Tensor]]:
        """Run each encoder on its present rows only; absent rows get zero states and h_m = 0."""
        every = self.options["placement"] == "every_layer"
        B, D = next(iter(present.values())).shape[0], self.config.d_model
        states, pooled = {}, {}
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.encoders_frozen):
            for m in MODALITY_ORDER:
                p = present[m]
                zero_h = self.head.base.weight.new_zeros(B, D)
                if not bool(p.any()):
                    pooled[m] = zero_h
                    if m in self.config.modalities:
                        T = features[m].shape[1]
                        states[m] = [zero_h.new_zeros(B, T, D)] * len(self.adapters)
                    continue
                if bool(p.all()):
                    states[m], pooled[m] = encoder_states(self.encoders[m], features[m], lengths[m], every)
                    continue
                rows = p.nonzero(as_tuple=True)[0]  # (N,)
                s, h = encoder_states(self.encoders[m], features[m].index_select(0, rows),
                                      lengths[m].index_select(0, rows), every)
                states[m] = [zero_h.new_zeros(B, *t.shape[1:]).index_copy(0, rows, t) for t in s]  # (B, T, D)
                pooled[m] = zero_h.index_copy(0, rows, h)  # (B, D)
        return {m: s for m, s in states.items() if m in self.config.modalities}, pooled

    # ---- cache ------------------------------------------------------------------------------------
    def _use_cache(self, index: torch.Tensor | None) -> bool:
        return self._cache is not None and index is not None and self.encoders_frozen and self._cache.covers(index)

    def _cached(self, index, lengths, present):
        device = self.comb_masks.device
        if self._cache.slot.device != device:  # built before Lightning moved the model
            self._cache = self._cache.to(device)
        return self._cache.lookup(index, lengths, present)

    def build_cache(self, batches: Iterable[dict[str, Any]]) -> None:
        """Encode every row of `batches` (dicts with features, lengths_natural or lengths, index) once."""
        if not self.encoders_frozen:
            raise RuntimeError("build_cache: call set_stage('stage2') first (the encoders must be frozen)")
        self.encoders.eval()
        every = self.options["placement"] == "every_layer"
        encode = lambda x, n, m: encoder_states(self.encoders[m], x, n, every)  # noqa: E731
        modalities = tuple(m for m in MODALITY_ORDER if m in self.config.modalities)
        self._cache = BackboneCache.build(encode, batches, modalities, self.comb_masks.device)

    @torch.no_grad()
    def probe_cache(self, batch: dict[str, Any]) -> dict[str, float]:
        """Cached vs live on `batch` (eval mode): the largest |diff| / max(1, |live|) of the predictions
        (the spec's 1e-6, read so it stays above float32 resolution for logits > 1) and of the
        backbone states on present rows and valid tokens."""
        was = self.training
        self.eval()
        feats, lens, mask, comb = batch["features"], batch["lengths"], batch["mask"], batch.get("combination")
        pred = relative_gap(self(feats, lens, mask, comb, index=batch["index"]).prediction,
                            self(feats, lens, mask, comb).prediction)
        present = self._present(lens, mask, comb)
        (s_c, h_c), (s_l, h_l) = self._cached(batch["index"], lens, present), self._live(feats, lens, present)
        gaps = [relative_gap(h_c[m], h_l[m]) for m in h_l]
        for m in s_l:
            valid = (torch.arange(s_l[m][0].shape[1], device=mask.device)[None, :] < lens[m][:, None]) \
                & present[m][:, None]  # (B, T)
            gaps += [relative_gap(c[valid], live[valid]) for c, live in zip(s_c[m], s_l[m])]
        self.train(was)
        return {"cache_probe_max_diff": pred, "cache_probe_state_diff": max(gaps)}

    def enable_cache(self, batches: Iterable[dict[str, Any]], probe: dict[str, Any],
                     tolerance: float = CACHE_TOLERANCE) -> dict[str, Any]:
        """Build the cache and keep it only if the probe batch agrees to `tolerance` (NaN refuses too)."""
        self.build_cache(batches)
        report = self.probe_cache(probe)
        if not all(v <= tolerance for v in report.values()):
            self._cache = None
        return {"cache_backbone": self._cache is not None, **report}

    def clear_cache(self) -> None:
        self._cache = None

    # ---- the method interface (pipeline/methods/registry.py) -----------------------------------------
    def training_plan(self, cfg: Any) -> list:
        """stage 1: the plain backbone on random modality dropout (skipped with `stage1_from`; stored and
        reused via cache_key); stage 2: frozen encoders, adapter + head (+ fusion), selected on val."""
        from pipeline.training.plan import StagePlan

        plan = []
        if self.options["stage1_from"] is None:
            plan.append(StagePlan("stage1", cfg.stage1_epochs, "dropout",
                                  cache_key={"backbone": "plain", "sampler": "dropout"}))
        plan.append(StagePlan("stage2", cfg.max_epochs, self.options["stage2_sampler"], select=True))
        return plan

    def auxiliary_losses(self, out: ModelOutput, batch: dict) -> dict[str, tuple[float, torch.Tensor]]:
        """Wander trains on the task loss alone (no L_ort, no DPFT)."""
        return {}

    def prepare_stage(self, stage: Any, train: Any, val: Any, batch_size: int = 256) -> dict[str, Any]:
        """Before stage 2: load `stage1_from` if set, then build and probe the backbone cache over the
        train and val rows (`cache_backbone`). Returns what to record (cache used, probe gaps)."""
        if stage.name != "stage2":
            return {}
        notes: dict[str, Any] = {}
        if self.options["stage1_from"] is not None:
            notes["stage1_from"] = self.load_stage1(self.options["stage1_from"], train.provenance)
        if not self.options["cache_backbone"]:
            return {**notes, "cache_backbone": False}
        batches = (v.batch(np.arange(s, min(s + batch_size, len(v)))) for v in (train, val)
                   for s in range(0, len(v), batch_size))  # every train and val row once, natural presence
        rng = np.random.default_rng(0)
        local = np.arange(min(64, len(train)))
        keep = rng.random((len(local), 3)) < 0.5  # a mixed-combination probe: random subsets of natural presence
        keep[~(keep & train.view_natural()[local]).any(axis=1)] = True
        return {**notes, **self.enable_cache(batches, probe=train.batch(local, mask=keep))}

    def load_stage1(self, path: str, provenance: dict[str, Any]) -> str:
        """Load a stored stage-1 model's backbone; its feature, split and manifest hashes must match."""
        stored = torch.load(path, map_location="cpu", weights_only=True)
        theirs = stored.get("extra", {}).get("provenance")
        if theirs != provenance:
            raise ValueError(f"train.wander.stage1_from={path}: its feature/split hashes {theirs} differ from this "
                             f"run's {provenance}; retrain stage 1 (stage1_from: null)")
        self.load_backbone_state(stored["state_dict"])
        return str(path)

    # ---- stages -----------------------------------------------------------------------------------
    def set_stage(self, stage: str) -> None:
        """stage1: backbone trains, adapter off; stage2: encoders frozen (eval), adapter + head (+ fusion)."""
        self._cache = None
        if stage == "stage1":
            self.encoders_frozen, self.adapter_active = False, False
            for name, p in self.named_parameters():
                p.requires_grad_(not name.startswith(("adapters.", "up.")))
        elif stage == "stage2":
            self.encoders_frozen, self.adapter_active = True, True
            for name, p in self.named_parameters():
                p.requires_grad_(not name.startswith("encoders.")
                                 and (self.options["train_fusion"] or not name.startswith("fusion.")))
            self.encoders.eval()
        else:
            raise ValueError(f"{type(self).__name__}: unknown stage {stage!r}; known {self.STAGES}")

    def train(self, mode: bool = True) -> "WanderNet":
        super().train(mode)
        if self.encoders_frozen:
            self.encoders.eval()  # frozen encoders never run dropout
        return self

    def load_backbone_state(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Load a stage-1 model's encoders, fusion and head (MCULoRA adapter keys are ignored)."""
        own = {k for k in self.state_dict() if not k.startswith(("adapters.", "up."))}
        picked = {k: v for k, v in state_dict.items() if k in own}
        missing = sorted(own - set(picked))
        if missing:
            raise ValueError(f"stage-1 state lacks backbone keys {missing[:5]} ({len(missing)} in all)")
        self.load_state_dict(picked, strict=False)

    def parameter_counts(self) -> dict[str, int]:
        counts = dict(total=0, trainable=0, adapter=0, encoders=0, fusion=0, head=0)
        for name, p in self.named_parameters():
            n = p.numel()
            counts["total"] += n
            counts["trainable"] += n if p.requires_grad else 0
            group = "adapter" if name.startswith(("adapters.", "up.")) else name.split(".")[0]
            counts[group] = counts.get(group, 0) + n  # `context` in dialogue mode
        counts["frozen"] = counts["total"] - counts["trainable"]
        return counts

    def expected_adapter_count(self) -> int:
        """The spec's formula: adapters (one per read layer) plus U_up."""
        o, cfg = self.options, self.config
        one = adapter_parameter_count([m for m in MODALITY_ORDER if m in cfg.modalities], cfg.seq_lens, cfg.d_model,
                                      rank=o["rank"], cp_rank=o["cp_rank"], token_rank=o["token_rank"],
                                      out_tokens=o["out_tokens"], absent=o["absent"])
        return len(self.adapters) * one + cfg.d_model * cfg.d_fusion
