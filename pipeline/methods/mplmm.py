"""MPLMMNet: a frozen backbone plus prompts for missing modalities (spec: shared/spec/mplmm.md).

An absent modality m is generated from the present ones (generative prompts), every modality's
tokens get a missing-signal prompt (real or generated), and each fusion target gets P
missing-type prompt tokens for the row's combination; the backbone always sees three sequences.
Backbone `imer` (default): the project's encoders, fusion and head (state names as in
MCULoRANet, so MPLMM and MCULoRA differ only in prompts versus adapters); `mult`: MulT.
Stage 1 trains the backbone alone (no prompts; an absent modality is h_m = 0 for `imer`, zero
tokens for `mult`); stage 2 freezes it and trains prompts, generator, input projections, head.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from pipeline.core.modalities import MASKS, MODALITY_ORDER
from pipeline.methods.config import ModelConfig
from pipeline.methods.encoders import ModalityEncoder, make_linear, masked_mean
from pipeline.methods.imer_backbone import imer_fuse
from pipeline.methods.mcla import Combination, normalise_combination
from pipeline.methods.mculora import ModelOutput
from pipeline.methods.mplmm_options import STAGE2_SAMPLER_KEY, resolve_options
from pipeline.methods.mult import MulTBackbone
from pipeline.methods.prompts import PromptBank


class MPLMMNet(nn.Module):
    STAGES = ("stage1", "stage2")

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.options = opts = resolve_options(config.options)
        self.backbone, self.readout = opts["backbone"], opts["readout"]
        self.stage = "stage2"  # the deployable network: prompts on (stage 1 trains the backbone alone)
        caps = config.seq_lens
        self.gen_tokens = {m: caps[m] if opts["gen_tokens"] is None else min(int(opts["gen_tokens"]), caps[m])
                           for m in MODALITY_ORDER}
        if self.backbone == "imer":
            plain = dataclasses.replace(config, variant="plain")  # the project's layers, without adapters
            self.encoders = nn.ModuleDict({m: ModalityEncoder(plain, config.input_dims[m], caps[m])
                                           for m in MODALITY_ORDER})
            self.fusion = make_linear(plain, 3 * config.d_model, config.d_fusion, "fusion")
            self.head = make_linear(plain, config.d_fusion, config.n_outputs, "head")
            self.drop = nn.Dropout(config.dropout)
            d, d_type, heads = config.d_model, config.d_model, config.n_heads
        else:
            self.mult = MulTBackbone(config.input_dims, config.n_outputs, opts["mult"])
            d, heads = int(opts["mult"]["d_model"]), int(opts["mult"]["n_heads"])
            d_type = 2 * d
        self.prompts = PromptBank(d=d, d_type=d_type, prompt_length=int(opts["prompt_length"]),
                                  input_dims=config.input_dims, caps=caps, gen_tokens=self.gen_tokens,
                                  generator=opts["generator"], signal_prompts=opts["signal_prompts"],
                                  type_prompt_init=opts["type_prompt_init"], n_heads=heads,
                                  type_prompts=bool(opts["type_prompts"]))
        self.register_buffer("comb_masks", torch.as_tensor(MASKS), persistent=False)  # (7, 3)
        lookup = torch.full((8,), -1, dtype=torch.long)  # bit code a + 2t + 4v -> combination index
        for i, row in enumerate(MASKS):
            lookup[int(row[0]) + 2 * int(row[1]) + 4 * int(row[2])] = i
        self.register_buffer("code_to_comb", lookup, persistent=False)

    # ---- forward ---------------------------------------------------------------------------------
    def forward(self, features: dict[str, torch.Tensor], lengths: dict[str, torch.Tensor],
                mask: torch.Tensor, combination: Combination | str | None = None) -> ModelOutput:
        """Same contract as MCULoRANet: m enters a row iff mask, combination and length > 0 say so;
        otherwise its features are never read (it is generated from the present ones)."""
        allowed = self._allowed(combination, mask)  # (B, 3) or (3,)
        present = torch.stack([mask[:, i] & allowed[..., i] & (lengths[m] > 0)
                               for i, m in enumerate(MODALITY_ORDER)], dim=1)  # (B, 3)
        comb = self.code_to_comb[present[:, 0].long() + 2 * present[:, 1].long() + 4 * present[:, 2].long()]  # (B,)
        if bool((comb < 0).any()):
            raise ValueError(f"rows {(comb < 0).nonzero(as_tuple=True)[0][:5].tolist()} have no modality "
                             "present: MPLMM needs at least one to generate the others from")
        xs, valid = {}, {}
        for i, m in enumerate(MODALITY_ORDER):
            T = features[m].shape[1]
            if T > self.config.seq_lens[m]:
                raise ValueError(f"sequence of {T} tokens exceeds seq_len={self.config.seq_lens[m]} of {m!r}")
            valid[m] = present[:, i, None] & (torch.arange(T, device=mask.device)[None, :] < lengths[m][:, None])
            xs[m] = self._standardise(m, features[m], valid[m])  # (B, T, d_m), zero where not valid
        tokens, tvalid, gen_means = self._tokens(xs, valid, present)
        type_tokens = self.prompts.type_tokens(comb) if self.stage == "stage2" else None
        entered = present if (self.backbone == "imer" and self.stage == "stage1") else torch.ones_like(present)
        if self.backbone == "imer":
            prediction, pooled = imer_fuse(self, tokens, tvalid, type_tokens, entered, self.readout)
        else:
            prediction, pooled = self.mult.fuse(tokens, tvalid, type_tokens, self.readout)
        pooled = {m: torch.where(present[:, i, None], pooled[m], 0.0) for i, m in enumerate(MODALITY_ORDER)}
        fields = {f.name for f in dataclasses.fields(ModelOutput)}
        out = ModelOutput(prediction=prediction, r_com={}, r_spec={}, modality_mask=present,  # no adapter branches
                          **({"pooled": pooled} if "pooled" in fields else {}))
        out.generated_means = gen_means  # m -> (rows (n,), mean_t Z_m (n, D)), read by auxiliary_losses
        return out

    def _allowed(self, combination: Combination | str | None, mask: torch.Tensor) -> torch.Tensor:
        if combination is None:
            return torch.ones_like(mask)
        comb = normalise_combination(combination)
        if isinstance(comb, torch.Tensor) and comb.shape != (mask.shape[0],):
            raise ValueError(f"combination has shape {tuple(comb.shape)}, mask has {mask.shape[0]} rows")
        return self.comb_masks[comb.to(mask.device) if isinstance(comb, torch.Tensor) else comb]

    def _standardise(self, m: str, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        if self.backbone == "mult":
            return self.mult.standardise(m, x, valid)
        enc = self.encoders[m]
        return torch.where(valid.unsqueeze(-1), (x - enc.in_mean) * enc.in_scale, 0.0)  # (B, T, d_m)

    def _embed(self, m: str, xs: torch.Tensor) -> torch.Tensor:
        return self.encoders[m].proj(xs) if self.backbone == "imer" else self.mult.embed(m, xs)  # (B, T, D)

    def _tokens(self, xs: dict[str, torch.Tensor], valid: dict[str, torch.Tensor], present: torch.Tensor):
        """Each modality's token sequence: proj(X) + S^pres on the rows that have it, Z + S^miss on the
        rows lacking it (stage 1: zero tokens for `mult`, nothing for `imer`). Returns tokens (B, T, D),
        their validity (B, T) and, per generated m, (rows, mean_t Z_m) for the generation loss."""
        prompts_on = self.stage == "stage2"
        tokens, tvalid, gen_means = {}, {}, {}
        for i, m in enumerate(MODALITY_ORDER):
            T, v, has = xs[m].shape[1], valid[m], present[:, i]
            if bool(has.all()):
                e = self._embed(m, xs[m])  # (B, T, D)
                tokens[m], tvalid[m] = (e + self.prompts.signal(m, "present", T) if prompts_on else e), v
                continue
            rows, absent = has.nonzero(as_tuple=True)[0], (~has).nonzero(as_tuple=True)[0]  # (k,), (n,)
            e = xs[m].new_zeros(present.shape[0], T, self.prompts.signal_missing[m].shape[1])  # (B, T, D)
            if prompts_on or self.backbone == "mult":  # imer stage 1: absent rows stay empty (h_m = 0)
                Tg = self.gen_tokens[m]
                if prompts_on:
                    z = self.prompts.generate(m, xs, valid, absent, present)  # (n, Tg, D)
                    gen_means[m] = (absent, z.mean(dim=1))
                    z = z + self.prompts.signal(m, "missing", Tg)
                else:
                    z = e.new_zeros(absent.numel(), Tg, e.shape[2])
                Tm = max(T, Tg)
                e = F.pad(e, (0, 0, 0, Tm - T)).index_copy(0, absent, F.pad(z, (0, 0, 0, Tm - Tg)))  # (B, Tm, D)
                v = F.pad(v, (0, Tm - T)).index_copy(0, absent, (torch.arange(Tm, device=v.device) < Tg)
                                                     .expand(absent.numel(), Tm))  # (B, Tm)
            if rows.numel():
                real = self._embed(m, xs[m].index_select(0, rows))  # (k, T, D): only rows that have m
                if prompts_on:
                    real = real + self.prompts.signal(m, "present", T)
                e = e.index_copy(0, rows, F.pad(real, (0, 0, 0, e.shape[1] - T)))
            tokens[m], tvalid[m] = e, v
        return tokens, tvalid, gen_means

    # ---- stages, statistics, counts ----------------------------------------------------------------
    def set_input_statistics(self, stats: dict[str, tuple[Any, Any]]) -> None:
        for m, (mean, std) in stats.items():
            if self.backbone == "imer":
                self.encoders[m].set_input_statistics(torch.as_tensor(mean), torch.as_tensor(std))
            else:
                self.mult.set_input_statistics(m, torch.as_tensor(mean), torch.as_tensor(std))

    def context_head(self) -> nn.Module:
        """The head whose input is the per-utterance state (dialogue context goes in front of it)."""
        return self.head if self.backbone == "imer" else self.mult.head

    def group_of(self, name: str) -> str:
        """Parameter group: prompts_* | input_proj | head | backbone."""
        if name.startswith("prompts."):
            kind = name.split(".")[1]
            return ("prompts_signal" if kind.startswith("signal_") else
                    "prompts_type" if kind.startswith("type_") else "prompts_generative")
        if (name.startswith("encoders.") and ".proj." in name) or name.startswith("mult.proj."):
            return "input_proj"
        if name.startswith(("head.", "mult.head.")):
            return "head"
        return "backbone"

    def set_stage(self, stage: str) -> None:
        """stage1: backbone only (prompts off and frozen); stage2: prompts on, backbone frozen except the
        input projections (re-initialised here iff `reinit_input_proj`) and the head."""
        if stage not in self.STAGES:
            raise ValueError(f"{type(self).__name__}: unknown stage {stage!r}; known {self.STAGES}")
        self.stage = stage
        self.train(self.training)  # re-apply which parts run in eval mode
        for name, p in self.named_parameters():
            group = self.group_of(name)
            p.requires_grad_(group != "backbone" if stage == "stage2" else not group.startswith("prompts_"))
        if stage == "stage2" and self.options["reinit_input_proj"]:
            for m in MODALITY_ORDER:
                (self.encoders[m].proj.base if self.backbone == "imer" else self.mult.proj[m]).reset_parameters()

    def train(self, mode: bool = True) -> "MPLMMNet":
        """In stage 2 the frozen backbone stays in eval mode (its dropout off) unless `frozen_dropout`
        (the research code kept it on)."""
        super().train(mode)
        if self.stage == "stage2" and not self.options["frozen_dropout"]:
            frozen = ([module for m in MODALITY_ORDER for module in (self.encoders[m].layers, self.encoders[m].drop)]
                      if self.backbone == "imer" else self.mult.frozen_modules())
            for module in frozen:
                module.train(False)
        return self

    def parameter_counts(self) -> dict[str, int]:
        counts = dict(total=0, trainable=0, backbone=0, input_proj=0, head=0, prompts_generative=0,
                      prompts_signal=0, prompts_type=0)
        for name, p in self.named_parameters():
            counts["total"] += p.numel()
            counts["trainable"] += p.numel() if p.requires_grad else 0
            counts[self.group_of(name)] += p.numel()
        counts["prompts"] = counts["prompts_generative"] + counts["prompts_signal"] + counts["prompts_type"]
        return counts

    # ---- training hooks ----------------------------------------------------------------------------
    def training_plan(self, cfg: Any) -> list:
        """Stage 1: the backbone alone on `stage1_sampler` rows (stored and reused via `cache_key`);
        stage 2: prompts etc. on `sampler` (eta / uniform7 / homogeneous), the selected stage."""
        from pipeline.training.plan import StagePlan

        o = self.options
        epochs1 = int(cfg.stage1_epochs if o["stage1_epochs"] is None else o["stage1_epochs"])
        arch = (o["mult"] if self.backbone == "mult" else
                {k: getattr(self.config, k) for k in ("d_model", "n_layers", "n_heads", "d_fusion", "dropout")})
        key = {"backbone": self.backbone, "arch": arch, "sampler": o["stage1_sampler"], "epochs": epochs1}
        stage2 = StagePlan("stage2", int(cfg.max_epochs), STAGE2_SAMPLER_KEY[o["sampler"]], select=True,
                           sampler_options={"eta": float(o["eta"])} if o["sampler"] == "eta" else {})
        if o["stage1_from"] is not None:  # stage 1 comes from a stored model (see prepare_stage)
            return [stage2]
        return [StagePlan("stage1", epochs1, o["stage1_sampler"], cache_key=key), stage2]

    def prepare_stage(self, stage: Any, train: Any, val: Any, batch_size: int = 256) -> dict[str, Any]:
        """Before stage 2: load the backbone of `stage1_from` if set (the trainer records what it returns)."""
        if stage.name != "stage2" or self.options["stage1_from"] is None:
            return {}
        return {"stage1_from": self.load_stage1(self.options["stage1_from"], train.provenance)}

    def load_stage1(self, path: str, provenance: dict[str, Any]) -> str:
        """Copy backbone, input projections and head from a stored model (any method with the same
        backbone names, e.g. MCULoRA or MPLMM); its feature, split and manifest hashes must match."""
        stored = torch.load(path, map_location="cpu", weights_only=True)
        theirs = stored.get("extra", {}).get("provenance")
        if theirs != provenance:
            raise ValueError(f"train.mplmm.stage1_from={path}: its feature/split hashes {theirs} differ from this "
                             f"run's {provenance}; retrain stage 1 (stage1_from: null)")
        skip = ("input_proj",) if self.options["reinit_input_proj"] else ()  # set_stage re-initialised them
        own = {k: v for k, v in self.state_dict().items()
               if not k.startswith("prompts.") and self.group_of(k) not in skip}
        found = {k: v for k, v in stored["state_dict"].items() if k in own and v.shape == own[k].shape}
        if set(found) != set(own):
            raise ValueError(f"train.mplmm.stage1_from={path}: no {self.backbone} backbone of this shape "
                             f"(missing or resized: {sorted(set(own) - set(found))[:5]})")
        self.load_state_dict(found, strict=False)
        return str(path)

    def auxiliary_losses(self, out: ModelOutput, batch: dict) -> dict[str, tuple[float, torch.Tensor]]:
        """`l_gen` (weight lambda_gen, off by default): for modalities the sampler dropped (real tokens
        known), mean over (row, m) of ||mean_t Z_m - sg(masked_mean_t proj_m(X_m))||^2."""
        lam = float(self.options["lambda_gen"])
        means = getattr(out, "generated_means", None) or {}
        if lam == 0.0 or "natural" not in batch:
            return {}
        terms = []
        for i, m in enumerate(MODALITY_ORDER):
            if m not in means:
                continue
            rows, z_mean = means[m]  # (n,), (n, D)
            lens = batch.get("lengths_natural", batch["lengths"])[m]  # dropped rows have lengths 0 in "lengths"
            known = batch["natural"][rows, i] & (lens[rows] > 0)  # (n,) dropped, not naturally missing
            if not bool(known.any()):
                continue
            r = rows[known]
            x, T = batch["features"][m][r], batch["features"][m].shape[1]
            valid = torch.arange(T, device=x.device)[None, :] < lens[r][:, None]  # (k, T)
            with torch.no_grad():
                target = masked_mean(self._embed(m, self._standardise(m, x, valid)), valid)  # (k, D)
            terms.append((z_mean[known] - target).pow(2).sum(dim=-1))  # (k,)
        value = torch.cat(terms).mean() if terms else out.prediction.sum() * 0.0
        return {"l_gen": (lam, value)}

