"""CGGM (classifier-guided gradient modulation) as a training option, orthogonal to method and variant.

Spec: `cggm.md` (train.cggm). Unimodal classifiers f_m read the DETACHED pooled vector
sg(h_m) (`ModelOutput.pooled[m]`), learn in their own optimizer group at `cls_lr` and send
no gradient into the network. Their batch scores give a per-(combination, modality)
progress signal (cggm_parts.ProgressSignal), from which the guarded coefficient B_m
(cggm_parts.coefficients) scales modality m's update by rho * B_m, and a same-step
direction term L_gm turns the fused model's logit gradient toward the lagging modalities.
The classifiers live on this module, never on the network: `models/model.pt` keeps the
baseline's keys. Single-modality batches (and warm-up epochs) are left alone: factor 1, no L_gm.

How the trainer wires it: `loop._run_stage` passes one CGGM per run (built by `build_cggm`) in
`MethodModule(components=[...])`; the module calls these hooks (`module` = the LightningModule). The
CGGM is a plain list entry there, not a submodule, so the Lightning checkpoint holds the network only.

    configure_optimizers         param_groups(module) -> AdamW groups (moves the classifiers to the
                                 network's device)
    on_train_epoch_start         on_train_epoch_start(module)       (warm-up epochs)
    training_step                loss_terms(module, out, batch) -> {name: (weight, tensor)}
    on_before_optimizer_step     on_before_optimizer_step(module, optimizer)   (after backward)
    on_train_batch_end           on_train_batch_end(module)         (restores modulated lrs)
    on_train_epoch_end           on_train_epoch_end(module), then epoch_metrics() -> history

The same steps without Lightning (tests, benchmarks): `groups(model, lr, wd)`, `loss_terms(None, out,
batch)`, `before_optimizer_step(opt)`, `opt.step()`, `after_optimizer_step()`.

`apply: lr` (default) gives each modality's parameters (`model.encoders[m]`, or a method's own
`modality_parameter_groups()`) its own optimizer group and multiplies that group's lr by
rho * B_m for the step (AdamW divides by a running gradient RMS, so a persistent gradient
scale cancels; an lr scale does not; torch's AdamW decay is lr-scaled too). `apply: grad`
multiplies the group's gradients instead (the paper's form). Logged gradient norms "after"
are the effective ones: norm x factor under both forms.

Direction term (same step, B constant): L_gm = (1/M) sum_m (|B_m| - B_m cos(g_f, g_m)), g the
task-loss gradient w.r.t. the logits in closed form (`logit`: softmax(z) - onehot(y), or
prediction - y for regression), g_f differentiable through the fused model, g_m detached;
`weight_grad`: the output layers' weight gradients (1/N) sum_n g_n z_n^T, z_f = the head's
input (`ModelOutput.fused_hidden` if the method gives it, else captured from `model.head`),
z_m = f_m's last hidden layer. Under mixed batches every quantity of m uses the rows with m.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn as nn

from pipeline.core.modalities import COMBINATIONS, MASKS, MODALITY_ORDER
from pipeline.methods.context import forward_extras
from pipeline.methods.losses import task_loss
from pipeline.training.cggm_parts import (CGGMConfig, EpochStats, ProgressSignal, UnimodalClassifier, coefficients,
                                         logit_gradient, masked_cosine, modality_parameters, row_score)

MIXED = "mixed"


class CGGM(nn.Module):
    """Unimodal classifiers + coefficient state + the optimizer hooks listed in the module docstring."""

    def __init__(self, cfg: CGGMConfig, modalities: tuple[str, ...], d_in: int, d_head: int, n_outputs: int,
                 task: str, regression_loss: str = "l1"):
        super().__init__()
        hidden = int(cfg.cls_hidden or d_head)
        if cfg.direction == "weight_grad" and hidden != d_head:
            raise ValueError(f"train.cggm.direction weight_grad compares output-layer weight gradients: "
                             f"cls_hidden ({hidden}) must equal the head's input width ({d_head}); set it to null")
        self.cfg, self.task, self.regression_loss = cfg, task, regression_loss
        self.modalities = tuple(m for m in MODALITY_ORDER if m in modalities)
        self.classifiers = nn.ModuleDict({m: UnimodalClassifier(d_in, hidden, n_outputs) for m in self.modalities})
        self.progress = ProgressSignal(cfg)
        self.stats = EpochStats()
        self.epoch = 0
        self._pending: tuple[str, dict[str, float]] | None = None  # (key, m -> factor) of the current step
        self._saved_lr: list[tuple[dict, float]] = []
        self._head_input: torch.Tensor | None = None
        self._hook = None
        self.monitor_batch: Mapping[str, Any] | None = None

    @classmethod
    def for_model(cls, cfg: CGGMConfig, model: nn.Module, regression_loss: str = "l1",
                  monitor_batch: Mapping[str, Any] | None = None) -> "CGGM":
        """Sized from the network's config (pooled width: `model.pooled_dim` if set, else d_model);
        registers a head-input hook if direction is weight_grad.
        `monitor_batch`: the fixed TRAINING monitoring batch (signal epoch_monitor needs it)."""
        mc = model.config
        if not hasattr(model, "encoders") and not callable(getattr(model, "modality_parameter_groups", None)):
            raise ValueError(f"train.cggm: method {mc.method!r} exposes neither `encoders[m]` nor "
                             "`modality_parameter_groups()`, so CGGM cannot tell which parameters are modality m's")
        modalities = tuple(m for m in mc.modalities if m in modality_parameters(model))
        self = cls(cfg, modalities, int(getattr(model, "pooled_dim", mc.d_model)), int(mc.d_fusion),
                   int(mc.n_outputs), mc.task, regression_loss)
        if cfg.signal == "epoch_monitor" and monitor_batch is None:
            raise ValueError("train.cggm.signal epoch_monitor needs the training monitoring batch")
        self.monitor_batch = monitor_batch
        if cfg.direction == "weight_grad" and hasattr(model, "head"):
            self._hook = model.head.register_forward_pre_hook(self._capture_head_input)
        return self

    def _capture_head_input(self, module: nn.Module, args: tuple) -> None:
        self._head_input = args[0]

    def remove_hooks(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    # ------------------------------------------------------------------ MethodModule hooks
    def param_groups(self, module: Any) -> list[dict[str, Any]]:
        device = next(module.model.parameters()).device
        self.to(device)  # in place: the parameters keep their identity
        return self.groups(module.model, module.lr, module.weight_decay)

    def on_train_epoch_start(self, module: Any) -> None:
        self.on_epoch_start(module.epoch_offset + int(module.current_epoch))

    def on_before_optimizer_step(self, module: Any, optimizer: torch.optim.Optimizer) -> None:
        self.before_optimizer_step(optimizer)

    def on_train_batch_end(self, module: Any) -> None:
        self.after_optimizer_step()

    def on_train_epoch_end(self, module: Any) -> None:
        self.on_epoch_end(module.model, self.monitor_batch)

    # ------------------------------------------------------------------ optimizer groups
    def groups(self, model: nn.Module, lr: float, weight_decay: float) -> list[dict[str, Any]]:
        """One group per modality (key `cggm_modality`), one for the rest, one for the classifiers."""
        groups, seen = [], set()
        for m, params in modality_parameters(model).items():
            ps = [p for p in params if p.requires_grad and id(p) not in seen]
            seen.update(id(p) for p in ps)
            if ps:
                groups.append({"params": ps, "lr": lr, "weight_decay": weight_decay, "name": f"enc/{m}",
                               "cggm_modality": m})
        rest = [p for p in model.parameters() if p.requires_grad and id(p) not in seen]
        if rest:
            groups.append({"params": rest, "lr": lr, "weight_decay": weight_decay, "name": "rest"})
        groups.append({"params": list(self.classifiers.parameters()), "lr": self.cfg.cls_lr,
                       "weight_decay": weight_decay, "name": "cggm/classifiers"})
        return groups

    # ------------------------------------------------------------------ per step
    def on_epoch_start(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def loss_terms(self, module: Any, out: Any, batch: Mapping[str, Any]) -> dict[str, tuple[float, torch.Tensor]]:
        """{"cggm_cls": (1, L_cls)} (+ {"cggm_gm": (lambda_gm, L_gm)} on modulated steps); sets this
        step's factors for `before_optimizer_step`."""
        comb = batch["combination"]
        if isinstance(comb, torch.Tensor) and comb.ndim == 0:
            comb = int(comb)
        homogeneous = not isinstance(comb, torch.Tensor)
        candidates = [m for m in self.modalities if not homogeneous or m in COMBINATIONS[comb]]
        if getattr(out, "pooled", None) is None:
            raise RuntimeError("train.cggm: the method's ModelOutput has no `pooled` (m -> (B, D) h_m)")
        y, mask = batch["target"], out.modality_mask
        l_cls = out.prediction.new_zeros(())
        score_t, count_t, cls_out = [], [], {}
        for m in candidates:
            w = mask[:, MODALITY_ORDER.index(m)].to(out.prediction.dtype)  # (B,)
            logits, hidden = self.classifiers[m](out.pooled[m].detach())  # (B, C), (B, H)
            cls_out[m] = (logits, hidden, w)
            n = w.sum().clamp_min(1.0)
            l_cls = l_cls + (task_loss(logits, y, self.task, self.regression_loss, reduction="none") * w).sum() / n
            with torch.no_grad():
                score_t.append((row_score(logits, y, self.task) * w).sum() / n)
                count_t.append(w.sum())
        values = torch.stack(score_t + count_t).tolist() if candidates else []  # the one host sync per step
        scores = {m: values[i] for i, m in enumerate(candidates) if values[len(candidates) + i] > 0}
        present = list(scores)
        key = COMBINATIONS[comb] if homogeneous else MIXED
        signal_key = key if homogeneous or self.cfg.signal != "epoch_monitor" else "".join(present)
        b, guarded = coefficients(self.progress.step(signal_key, scores), self.cfg)
        modulated = len(present) >= 2 and self.epoch >= self.cfg.warmup_epochs
        if not modulated:
            b, guarded = {m: 1.0 for m in present}, False
        self._pending = (key, {m: (self.cfg.rho * b[m] if modulated else 1.0) for m in present})
        self.stats.record_step(key, b, modulated, guarded, {m: self.progress.value(signal_key, m) for m in present})
        self.stats.add(key, "l_cls", l_cls)
        terms = {"cggm_cls": (1.0, l_cls)}
        if modulated and self.cfg.direction != "off" and self.cfg.lambda_gm > 0:
            l_gm = self._direction_loss(out, y, {m: cls_out[m] for m in present}, b, key)
            self.stats.add(key, "l_gm", l_gm)
            terms["cggm_gm"] = (self.cfg.lambda_gm, l_gm)
        return terms

    def _direction_loss(self, out: Any, y: torch.Tensor, cls_out: dict, b: Mapping[str, float],
                        key: str) -> torch.Tensor:
        g_f = logit_gradient(out.prediction, y, self.task)  # (B, C), differentiable
        z_f = None
        if self.cfg.direction == "weight_grad":
            z_f = getattr(out, "fused_hidden", None)
            z_f = self._head_input if z_f is None else z_f
            if z_f is None:
                raise RuntimeError("cggm direction weight_grad: the method gives no `fused_hidden` and has no `head`")
        terms = []
        for m, (logits, hidden, w) in cls_out.items():
            with torch.no_grad():
                g_m = logit_gradient(logits, y, self.task) * w[:, None]  # (B, C) zero outside m's rows
            gf_m = g_f * w[:, None]
            if z_f is None:
                cos = masked_cosine(gf_m, g_m)
            else:  # output-layer weight gradients (C, H); 1/N cancels in the cosine
                cos = masked_cosine(gf_m.transpose(0, 1) @ z_f, (g_m.transpose(0, 1) @ hidden).detach())
            self.stats.add(key, f"cos_{m}", cos)
            terms.append(abs(b[m]) - b[m] * cos)
        return torch.stack(terms).mean()

    def before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Log encoder gradient norms and apply this step's factors (after backward, before the update)."""
        self.after_optimizer_step()  # a step whose restore was missed must not compound
        if self._pending is None:
            return
        key, factors = self._pending
        for group in optimizer.param_groups:
            m = group.get("cggm_modality")
            if m not in factors:
                continue
            grads = [p.grad for p in group["params"] if p.grad is not None]
            if not grads:
                continue
            f = factors[m]
            norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
            self.stats.add(key, f"gnorm_before_{m}", norm)
            self.stats.add(key, f"gnorm_after_{m}", norm * f)
            if f == 1.0:
                continue
            if self.cfg.apply == "grad":
                torch._foreach_mul_(grads, f)
            else:
                self._saved_lr.append((group, group["lr"]))
                group["lr"] = group["lr"] * f

    def after_optimizer_step(self) -> None:
        """Restore the learning rates modulated for the last step; forget its factors."""
        for group, lr in self._saved_lr:
            group["lr"] = lr
        self._saved_lr = []

    # ------------------------------------------------------------------ per epoch
    @torch.no_grad()
    def on_epoch_end(self, model: nn.Module, monitor_batch: Mapping[str, Any] | None) -> None:
        """signal epoch_monitor: score every f_m under every combination on the fixed training
        monitoring batch (rows that have all of c), eval mode; the coefficients hold next epoch."""
        self._pending = None
        if self.cfg.signal != "epoch_monitor" or monitor_batch is None:
            return
        from pipeline.training.data import select_rows, with_mask

        was_training, self_training = model.training, self.training
        model.eval()
        self.eval()
        device = next(model.parameters()).device
        monitor_batch = _to_device(monitor_batch, device)
        try:
            natural = monitor_batch["natural"]  # (B, 3)
            for c, name in enumerate(COMBINATIONS):
                mask_c = torch.as_tensor(MASKS[c], device=natural.device)  # (3,)
                keep = (natural | ~mask_c).all(dim=1)  # (B,) rows with every modality of c
                if not bool(keep.any()) or not set(name) <= set(self.modalities):
                    continue
                sub = select_rows(with_mask(monitor_batch, mask_c, c), keep)
                out = model(sub["features"], sub["lengths"], sub["mask"], c,
                            **forward_extras(model, dialogue=sub.get("dialogue")))
                scores = {}
                for m in name:
                    w = out.modality_mask[:, MODALITY_ORDER.index(m)].to(out.prediction.dtype)
                    if float(w.sum()) > 0:
                        logits, _ = self.classifiers[m](out.pooled[m])
                        scores[m] = float((row_score(logits, sub["target"], self.task) * w).sum() / w.sum())
                self.progress.monitor(name, scores)
        finally:
            model.train(was_training)
            self.train(self_training)

    def epoch_metrics(self) -> dict[str, float]:
        """This epoch's `cggm/<name>/<combination>` floats (then reset); see EpochStats.flush."""
        return self.stats.flush()


def _to_device(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    """The batch's tensors (and dicts of tensors) on `device`."""
    move = lambda v: v.to(device) if isinstance(v, torch.Tensor) else v  # noqa: E731
    return {k: {m: move(x) for m, x in v.items()} if isinstance(v, dict) else move(v) for k, v in batch.items()}


def build_cggm(options: Mapping[str, Any], model: nn.Module, regression_loss: str,
               monitor_batch: Mapping[str, Any] | None) -> CGGM | None:
    """The CGGM component of a run from its `train.cggm` section; None when not enabled."""
    cfg = CGGMConfig.from_dict(options)
    if not cfg.enabled:
        return None
    return CGGM.for_model(cfg, model, regression_loss, monitor_batch=monitor_batch)
