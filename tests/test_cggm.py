"""CGGM invariants: neutral settings reproduce the baseline bit for bit, single-modality batches are
left alone, the coefficient is guarded, classifiers never touch the encoders, the saved keys do not change."""
from __future__ import annotations

import copy
import math

import pytest
import torch

from pipeline.core.modalities import COMBINATIONS, MASKS
from pipeline.methods import MCULoRANet, orthogonality_loss, task_loss
from pipeline.training.cggm import CGGM, MIXED
from pipeline.training.cggm_parts import CGGMConfig, ProgressSignal, coefficients
from tests.test_network import make_batch, tiny_config

NEUTRAL = dict(rho=1.0, lambda_gm=0.0, min_sum=math.inf)  # B = 1 always, no direction term


def net(seed: int = 0, **kw) -> MCULoRANet:
    torch.manual_seed(seed)
    return MCULoRANet(tiny_config(**kw)).train()


def batch_for(comb: int | torch.Tensor, B: int = 6, seed: int = 0) -> dict:
    """A training batch: homogeneous (int) or per-sample combination (LongTensor (B,))."""
    b = make_batch(B, seed)
    mask = b["mask"] & torch.as_tensor(MASKS)[comb]  # (3,) or (B, 3) -> (B, 3)
    lengths = {m: torch.where(mask[:, j], b["lengths"][m], 0) for j, m in enumerate("atv")}
    g = torch.Generator().manual_seed(seed + 100)
    return {**b, "mask": mask, "natural": b["mask"], "lengths": lengths, "lengths_natural": b["lengths"],
            "combination": comb, "target": torch.randint(0, 3, (B,), generator=g), "index": torch.arange(B)}


def forward_loss(model, batch, cggm: CGGM | None = None) -> tuple[torch.Tensor, dict]:
    out = model(batch["features"], batch["lengths"], batch["mask"], batch["combination"])
    loss = task_loss(out.prediction, batch["target"], "classification") + 0.1 * orthogonality_loss(
        out.r_spec, out.r_com, out.modality_mask)
    terms = {} if cggm is None else cggm.loss_terms(None, out, batch)
    for w, v in terms.values():
        loss = loss + w * v
    return loss, terms


def grads(model) -> dict[str, torch.Tensor | None]:
    return {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}


def assert_same_grads(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for n in a:
        assert (a[n] is None) == (b[n] is None), n
        if a[n] is not None:
            assert torch.equal(a[n], b[n]), n


@pytest.mark.parametrize("apply", ["lr", "grad"])
def test_neutral_settings_equal_baseline_bit_for_bit(apply):
    base = net()
    mod = copy.deepcopy(base)
    cggm = CGGM.for_model(CGGMConfig(enabled=True, apply=apply, **NEUTRAL), mod)
    opt_base = torch.optim.AdamW([p for p in base.parameters() if p.requires_grad], lr=1e-3, weight_decay=1e-2)
    opt_mod = torch.optim.AdamW(cggm.groups(mod, 1e-3, 1e-2))
    for step, comb in enumerate([6, 3, 0, 5, torch.tensor([0, 3, 6, 6, 4, 5])]):
        batch = batch_for(comb, seed=step)
        for model, opt, c in ((base, opt_base, None), (mod, opt_mod, cggm)):
            opt.zero_grad(set_to_none=True)
            forward_loss(model, batch, c)[0].backward()
        assert_same_grads(grads(base), grads(mod))
        cggm.before_optimizer_step(opt_mod)
        assert_same_grads(grads(base), grads(mod))
        opt_base.step(), opt_mod.step()
        cggm.after_optimizer_step()
        for (n, p), q in zip(base.named_parameters(), mod.parameters()):
            assert torch.equal(p, q), (step, n)


def test_single_modality_batches_are_unmodulated():
    base = net()
    mod = copy.deepcopy(base)
    cggm = CGGM.for_model(CGGMConfig(enabled=True, rho=1.3, lambda_gm=0.2, signal="batch"), mod)
    opt = torch.optim.AdamW(cggm.groups(mod, 1e-3, 1e-2))
    for step, comb in enumerate([0, 1, 2, 1, 0]):
        batch = batch_for(comb, seed=step)
        for model in (base, mod):
            model.zero_grad(set_to_none=True)
        forward_loss(base, batch)[0].backward()
        loss, terms = forward_loss(mod, batch, cggm)
        assert set(terms) == {"cggm_cls"}  # no direction term
        assert cggm._pending == (COMBINATIONS[comb], {COMBINATIONS[comb]: 1.0})
        loss.backward()
        lrs = [g["lr"] for g in opt.param_groups]
        cggm.before_optimizer_step(opt)
        assert [g["lr"] for g in opt.param_groups] == lrs
        assert_same_grads(grads(base), grads(mod))
        cggm.after_optimizer_step()
    metrics = cggm.epoch_metrics()
    assert metrics["cggm/modulated/all"] == 0.0 and metrics["cggm/b_mean_a/a"] == 1.0


def test_zero_progress_sum_gives_coefficient_one():
    cfg = CGGMConfig()
    b, guarded = coefficients({"a": 0.0, "t": 0.0, "v": 0.0}, cfg)
    assert b == {"a": 1.0, "t": 1.0, "v": 1.0} and guarded
    b, guarded = coefficients({"a": 0.02, "t": -0.02}, cfg)  # S = 0 from cancelling gains
    assert b == {"a": 1.0, "t": 1.0} and guarded
    assert coefficients({"a": 0.3}, cfg) == ({"a": 1.0}, False)  # nothing to balance


def test_guarded_coefficient_bounded_and_ordered():
    cfg = CGGMConfig()
    b, guarded = coefficients({"a": 0.3, "t": 0.1, "v": 0.0}, cfg)
    assert not guarded and b["a"] < b["t"] < b["v"]  # the fastest learner gets the smallest B
    assert b == pytest.approx({"a": 0.25, "t": 0.75, "v": 1.0})
    b, _ = coefficients({"a": 0.1, "t": -0.3}, cfg)  # S < 0: the paper's form turns B_t negative
    assert all(0.0 <= v <= 2.0 for v in b.values()) and b["t"] == 0.0
    paper, _ = coefficients({"a": 0.1, "t": -0.3}, CGGMConfig(coeff="paper"))
    assert paper["t"] < 0  # the unguarded form, kept for the ablation only
    one, _ = coefficients({"a": 0.3, "t": 0.1, "v": 0.0}, CGGMConfig(b_mean_one=True))
    assert sum(one.values()) / 3 == pytest.approx(1.0)


def test_ema_signal_per_combination():
    sig = ProgressSignal(CGGMConfig(ema=0.5))
    assert sig.step("at", {"a": 0.5, "t": 0.25}) == {"a": 0.0, "t": 0.0}  # first visit: no change
    assert sig.step("av", {"a": 1.0, "v": 0.0}) == {"a": 0.0, "v": 0.0}  # its own state
    assert sig.step("at", {"a": 1.0, "t": 0.25}) == pytest.approx({"a": 0.25, "t": 0.0})
    assert sig.value("at", "a") == pytest.approx(0.75) and sig.value("av", "a") == pytest.approx(1.0)


def test_classifiers_send_no_gradient_into_the_network():
    model = net()
    cggm = CGGM.for_model(CGGMConfig(enabled=True), model)
    for comb in (6, torch.tensor([0, 3, 6, 6, 4, 5])):
        model.zero_grad(set_to_none=True), cggm.zero_grad(set_to_none=True)
        out = model(*(batch_for(comb)[k] for k in ("features", "lengths", "mask", "combination")))
        terms = cggm.loss_terms(None, out, batch_for(comb))
        terms["cggm_cls"][1].backward()
        assert all(p.grad is None for p in model.parameters())
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in cggm.classifiers.parameters())


@pytest.mark.parametrize("direction", ["logit", "weight_grad"])
def test_direction_term_reaches_the_encoders(direction):
    model = net()
    cggm = CGGM.for_model(CGGMConfig(enabled=True, direction=direction, min_sum=math.inf), model)
    batch = batch_for(3)  # "at"
    out = model(batch["features"], batch["lengths"], batch["mask"], batch["combination"])
    terms = cggm.loss_terms(None, out, batch)
    assert set(terms) == {"cggm_cls", "cggm_gm"}
    terms["cggm_gm"][1].backward()
    for m in "at":
        norm = sum(float(p.grad.abs().sum()) for p in model.encoders[m].parameters() if p.grad is not None)
        assert norm > 0, m
    assert all(p.grad is None for p in model.encoders["v"].parameters())  # not in the combination
    assert all(p.grad is None for p in cggm.classifiers.parameters())  # g_m is detached
    assert 0.0 <= float(terms["cggm_gm"][1].detach()) <= 2.0  # B = 1: mean of (1 - cos)


@pytest.mark.parametrize("apply", ["lr", "grad"])
def test_factors_scale_lr_or_gradients_and_restore(apply):
    model = net()
    cggm = CGGM.for_model(CGGMConfig(enabled=True, apply=apply, signal="batch", rho=1.0), model)
    opt = torch.optim.AdamW(cggm.groups(model, 1e-3, 0.0))
    cggm._pending = ("at", {"a": 0.5, "t": 1.5})  # as loss_terms would set them
    forward_loss(model, batch_for(3))[0].backward()
    before = grads(model)
    cggm.before_optimizer_step(opt)
    by_name = {g["name"]: g for g in opt.param_groups}
    if apply == "lr":
        assert by_name["enc/a"]["lr"] == pytest.approx(5e-4) and by_name["enc/t"]["lr"] == pytest.approx(1.5e-3)
        assert_same_grads(before, grads(model))
    else:
        assert by_name["enc/a"]["lr"] == 1e-3
        p = next(p for n, p in model.named_parameters() if n.startswith("encoders.a.") and p.grad is not None)
        name = next(n for n, q in model.named_parameters() if q is p)
        assert torch.equal(p.grad, before[name] * 0.5)
    assert by_name["enc/v"]["lr"] == 1e-3 and by_name["rest"]["lr"] == 1e-3
    cggm.after_optimizer_step()
    assert all(g["lr"] == (5e-4 if g["name"] == "cggm/classifiers" else 1e-3) for g in opt.param_groups)
    metrics = cggm.epoch_metrics()
    assert metrics["cggm/gnorm_after_a/at"] == pytest.approx(0.5 * metrics["cggm/gnorm_before_a/at"])


def test_mixed_batches_balance_over_present_modalities():
    model = net()
    cggm = CGGM.for_model(CGGMConfig(enabled=True, signal="batch", min_sum=0.0), model)
    comb = torch.tensor([0, 3, 3, 0, 4, 3])  # a, at, av: t and a and v present
    forward_loss(model, batch_for(comb), cggm)
    key, factors = cggm._pending
    assert key == MIXED and set(factors) == {"a", "t", "v"}
    comb = torch.tensor([0, 0, 3, 0, 3, 3])  # a, at: v absent everywhere
    _, terms = forward_loss(model, batch_for(comb, seed=1), cggm)
    assert set(cggm._pending[1]) == {"a", "t"} and "cggm_gm" in terms
    metrics = cggm.epoch_metrics()
    assert metrics["cggm/steps/mixed"] == 2.0 and "cggm/cos_t/mixed" in metrics and "cggm/b_mean_v/mixed" in metrics


def test_epoch_monitor_and_warmup():
    model = net()
    monitor = batch_for(6, B=8, seed=3)
    monitor = {**monitor, "mask": monitor["natural"], "lengths": monitor["lengths_natural"], "combination": None}
    with pytest.raises(ValueError, match="monitoring batch"):
        CGGM.for_model(CGGMConfig(signal="epoch_monitor"), model)
    cggm = CGGM.for_model(CGGMConfig(enabled=True, signal="epoch_monitor", warmup_epochs=1), model,
                          monitor_batch=monitor)
    cggm.on_epoch_start(0)
    _, terms = forward_loss(model, batch_for(6), cggm)
    assert set(terms) == {"cggm_cls"} and set(cggm._pending[1].values()) == {1.0}  # warm-up
    cggm.on_epoch_end(model, monitor)
    assert set(cggm.progress.level) == set(COMBINATIONS) and model.training
    with torch.no_grad():
        for p in cggm.classifiers["a"].parameters():
            p.add_(0.5)  # f_a changes between epochs: its monitor score may move
    cggm.on_epoch_end(model, monitor)
    assert set(cggm.progress.held["atv"]) == set("atv")
    cggm.on_epoch_start(1)
    _, terms = forward_loss(model, batch_for(6), cggm)
    assert "cggm_gm" in terms
    metrics = cggm.epoch_metrics()
    assert all(k.startswith("cggm/") and isinstance(v, float) for k, v in metrics.items())
    assert metrics["cggm/steps/atv"] == 2.0 and metrics["cggm/modulated/atv"] == 0.5


def test_saved_model_keys_unchanged():
    base = net()
    model = copy.deepcopy(base)
    holder = torch.nn.Module()  # what the LightningModule does: network and CGGM side by side
    holder.model, holder.cggm = model, CGGM.for_model(CGGMConfig(enabled=True, direction="weight_grad"), model)
    forward_loss(model, batch_for(6), holder.cggm)
    assert list(model.state_dict()) == list(base.state_dict())
    assert any(k.startswith("cggm.classifiers.") for k in holder.state_dict())


def test_config_rejects_bad_settings():
    with pytest.raises(ValueError, match="unknown keys"):
        CGGMConfig.from_dict({"rhoo": 1.0})
    with pytest.raises(ValueError, match="signal"):
        CGGMConfig(signal="nope")
    with pytest.raises(ValueError, match="cls_hidden"):
        CGGM.for_model(CGGMConfig(direction="weight_grad", cls_hidden=5), net())


def test_regression_task_neutral_and_direction():
    base = net(task="regression", n_outputs=1)
    mod = copy.deepcopy(base)
    cggm = CGGM.for_model(CGGMConfig(enabled=True, **NEUTRAL), mod)
    batch = {**batch_for(6), "target": torch.linspace(-3, 3, 6)}

    def loss_of(model, c):
        out = model(batch["features"], batch["lengths"], batch["mask"], 6)
        loss = task_loss(out.prediction, batch["target"], "regression")
        return loss + sum(w * v for w, v in (c.loss_terms(None, out, batch).values() if c else []))

    loss_of(base, None).backward()
    loss_of(mod, cggm).backward()
    assert_same_grads(grads(base), grads(mod))
    gm = CGGM.for_model(CGGMConfig(enabled=True, min_sum=math.inf), base)
    base.zero_grad(set_to_none=True)
    out = base(batch["features"], batch["lengths"], batch["mask"], 6)
    gm.loss_terms(None, out, batch)["cggm_gm"][1].backward()
    assert all(any(p.grad is not None and p.grad.abs().sum() > 0 for p in base.encoders[m].parameters())
               for m in "atv")


def test_coefficient_csv():
    from pipeline.training.cggm_parts import coefficient_csv

    history = [{"epoch": 0, "stage": "main", "cggm/b_mean_a/at": 0.5, "cggm/b_mean_t/at": 1.5},
               {"epoch": 1, "stage": "main", "cggm/b_mean_a/at": 0.75}]
    assert coefficient_csv(history).splitlines() == ["epoch,stage,at_a,at_t", "0,main,0.5,1.5", "1,main,0.75,"]


def test_deterministic_steps():
    def run() -> tuple[list[torch.Tensor], dict]:
        model = net()
        cggm = CGGM.for_model(CGGMConfig(enabled=True, min_sum=0.0), model)
        opt = torch.optim.AdamW(cggm.groups(model, 1e-2, 1e-2))
        for step, comb in enumerate([6, 3, 6, 4, 5, 6]):
            opt.zero_grad(set_to_none=True)
            forward_loss(model, batch_for(comb, seed=step % 2), cggm)[0].backward()
            cggm.before_optimizer_step(opt)
            opt.step()
            cggm.after_optimizer_step()
        return [p.detach().clone() for p in model.parameters()], cggm.epoch_metrics()

    (pa, ma), (pb, mb) = run(), run()
    assert all(torch.equal(x, y) for x, y in zip(pa, pb))
    assert ma.keys() == mb.keys() and all(ma[k] == mb[k] or (math.isnan(ma[k]) and math.isnan(mb[k])) for k in ma)
    assert ma["cggm/guarded/atv"] < 1.0  # the coefficient did move (not the neutral path)


def test_params_yaml_shows_the_defaults():
    from pipeline.core.params import load_params

    assert CGGMConfig.from_dict(load_params("train")["cggm"]) == CGGMConfig()


# ---------------------------------------------------------------- end to end through the trainer
E2E = {"seed": 3, "max_epochs": 2, "patience": 2, "batch_size": 16, "lr": 3e-3,
       "model": {"d_model": 16, "d_fusion": 32, "n_heads": 2}, "dpft": {"monitor_size": 32}}


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    from pipeline.splits import build_splits
    from tests.factories import make_feature_dataset

    root = tmp_path_factory.mktemp("cggm")
    manifest, features = make_feature_dataset(root, n=96, missing_share=0.15, seed=4)
    build_splits(manifest, features, root / "splits", {"seed": 1})
    return manifest, features, root / "splits"


@pytest.mark.parametrize("train, options", [
    ({}, {}),
    ({}, {"signal": "epoch_monitor", "apply": "grad", "direction": "weight_grad"}),
    ({"variant": "plain"}, {"signal": "batch"}),  # mixed batches (modality dropout): key "mixed"
])
def test_training_with_cggm_keeps_the_saved_keys(small_data, tmp_path, train, options):
    import json

    from pipeline.methods import load_model
    from pipeline.train import train_model
    from pipeline.training.data import MultimodalData

    data = MultimodalData.load(*small_data, include=("train", "val"))
    train_model(data, {**E2E, **train}, tmp_path / "base")
    train_model(data, {**E2E, **train, "cggm": {"enabled": True, **options}}, tmp_path / "cggm")
    base, _ = load_model(tmp_path / "base" / "models" / "model.pt")
    mod, _ = load_model(tmp_path / "cggm" / "models" / "model.pt")
    assert list(base.state_dict()) == list(mod.state_dict())
    assert any(not torch.equal(x, y) for x, y in zip(base.state_dict().values(), mod.state_dict().values()))
    history = json.loads((tmp_path / "cggm" / "reports" / "train_history.json").read_text())
    assert len(history) == 2 and all(h["cggm/modulated/all"] > 0 for h in history)
    assert all("train/cggm_cls" in h and "train/cggm_gm" in h for h in history)
    csv = (tmp_path / "cggm" / "reports" / "plots" / "cggm_coeff.csv").read_text().splitlines()
    assert csv[0].startswith("epoch,stage,mixed_a" if train else "epoch,stage,at_a,at_t") and len(csv) == 3
    base_csv = (tmp_path / "base" / "reports" / "plots" / "cggm_coeff.csv").read_text().splitlines()
    assert base_csv == ["epoch,stage"]
