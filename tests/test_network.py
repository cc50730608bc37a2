"""MCULoRANet invariants: no-op adapters, isolation, masking, padding, NaN-safety, freezing, checkpoints."""
from __future__ import annotations

import pytest
import torch

from pipeline.core.modalities import COMBINATIONS, MASKS
from pipeline.methods import MCULoRANet, ModelConfig, load_model, orthogonality_loss, save_model, task_loss

DIMS = {"a": 5, "t": 7, "v": 3}
LENS = {"a": 6, "t": 4, "v": 5}


def tiny_config(**kw) -> ModelConfig:
    base = dict(input_dims=DIMS, seq_lens=LENS, n_outputs=3, d_model=8, n_layers=2, n_heads=2, d_fusion=12,
                dropout=0.0, lora_rank=2, lora_alpha=4.0)
    return ModelConfig(**{**base, **kw})


def tiny_net(seed: int = 0, **kw) -> MCULoRANet:
    torch.manual_seed(seed)
    return MCULoRANet(tiny_config(**kw)).eval()


def make_batch(B: int = 6, seed: int = 0) -> dict:
    """Random features, lengths in 1..T (with some short rows) and full presence."""
    g = torch.Generator().manual_seed(seed)
    feats = {m: torch.randn(B, LENS[m], DIMS[m], generator=g) for m in "atv"}
    lengths = {m: torch.randint(1, LENS[m] + 1, (B,), generator=g) for m in "atv"}
    return {"features": feats, "lengths": lengths, "mask": torch.ones(B, 3, dtype=torch.bool)}


def randomise_adapters(net: torch.nn.Module, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def run(net, batch, comb, mask=None):
    mask = batch["mask"] if mask is None else mask
    return net(batch["features"], batch["lengths"], mask, combination=comb)


def comb_mask(batch, comb) -> torch.Tensor:
    """Effective presence = natural presence ∧ combination (int or per-sample)."""
    return batch["mask"] & torch.as_tensor(MASKS)[comb]


MIXED = torch.tensor([0, 1, 2, 3, 4, 6])


@pytest.mark.parametrize("variant", ["mculora", "no_specific"])
@pytest.mark.parametrize("comb", [*range(7), "mixed"])
def test_fresh_adapters_equal_plain_model(variant, comb):
    net, plain = tiny_net(variant=variant), tiny_net(seed=5, variant="plain")
    missing = plain.load_state_dict(net.state_dict(), strict=False)
    assert not missing.missing_keys and all("lora_" in k for k in missing.unexpected_keys)
    batch = make_batch()
    c = MIXED if comb == "mixed" else comb
    mask = comb_mask(batch, c)
    torch.testing.assert_close(run(net, batch, c, mask).prediction, run(plain, batch, c, mask).prediction,
                               rtol=0, atol=0)


def adapter_grads(net) -> list[tuple[str, str | None, str, float]]:
    """(param name, modality of its encoder or None, adapter key, |grad| sum) for combination adapters."""
    rows = []
    for name, p in net.named_parameters():
        parts = name.split(".")
        if "lora_A" not in parts and "lora_B" not in parts:
            continue
        key = parts[parts.index("lora_A" if "lora_A" in parts else "lora_B") + 1]
        if key == "shared":
            continue
        modality = parts[1] if parts[0] == "encoders" else None
        rows.append((name, modality, key, 0.0 if p.grad is None else float(p.grad.abs().sum())))
    return rows


@pytest.mark.parametrize("comb", range(7))
def test_only_shared_and_active_combination_train(comb):
    net = tiny_net()
    randomise_adapters(net)
    batch = make_batch()
    out = run(net, batch, comb, comb_mask(batch, comb))
    (out.prediction.sum() + orthogonality_loss(out.r_spec, out.r_com, out.modality_mask)).backward()
    name_c = COMBINATIONS[comb]
    for name, modality, key, g in adapter_grads(net):
        expected = key == name_c and (modality is None or modality in name_c)
        assert (g > 0) == expected, name
    for m in "atv":  # modality encoders outside the combination are never run
        if m not in name_c:
            assert all(p.grad is None for p in net.encoders[m].parameters())


@pytest.mark.parametrize("mixed_mode", ["group", "gather"])
def test_mixed_batch_trains_only_present_combinations(mixed_mode):
    net = tiny_net(mixed_mode=mixed_mode)
    randomise_adapters(net)
    batch = make_batch()
    comb = torch.tensor([3, 3, 6, 3, 6, 6])  # at, atv
    run(net, batch, comb, comb_mask(batch, comb)).prediction.sum().backward()
    for name, modality, key, g in adapter_grads(net):
        expected = key in ("at", "atv") and (modality is None or modality in key)
        assert (g > 0) == expected, name


def test_group_equals_gather_equals_homogeneous_loop():
    net_g, net_b = tiny_net(mixed_mode="group"), tiny_net(mixed_mode="gather")
    randomise_adapters(net_g)
    net_b.load_state_dict(net_g.state_dict())
    batch = make_batch(B=12, seed=3)
    comb = torch.tensor([0, 1, 2, 3, 4, 5, 6, 6, 3, 0, 5, 4])
    batch["mask"][2, 0] = False  # a natural gap too
    mask = comb_mask(batch, comb)
    group = run(net_g, batch, comb, mask).prediction
    gather = run(net_b, batch, comb, mask).prediction
    loop = torch.stack([run(net_g, batch, int(c), mask).prediction[i] for i, c in enumerate(comb)])
    torch.testing.assert_close(group, gather, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(group, loop, rtol=1e-5, atol=1e-5)
    derived = run(net_g, batch, None, mask).prediction  # combination derived from the mask
    assert derived.shape == group.shape and torch.isfinite(derived).all()


@pytest.mark.parametrize("variant", ["mculora", "no_specific", "plain"])
@pytest.mark.parametrize("comb", [0, 3, 5, "mixed"])
def test_masked_out_modality_cannot_change_output(variant, comb):
    net = tiny_net(variant=variant)
    randomise_adapters(net)
    batch = make_batch()
    c = MIXED if comb == "mixed" else comb
    batch["mask"][1, 2] = False  # v naturally missing for sample 1
    mask = comb_mask(batch, c)
    before = run(net, batch, c, mask)
    for i, m in enumerate("atv"):
        batch["features"][m][~mask[:, i]] = torch.randn_like(batch["features"][m][~mask[:, i]]) * 100
    after = run(net, batch, c, mask)
    torch.testing.assert_close(before.prediction, after.prediction, rtol=0, atol=0)
    # a mask that claims a modality outside the combination is still cut by the combination
    if comb != "mixed":
        wider = run(net, batch, c, torch.ones_like(mask))
        assert torch.equal(wider.modality_mask, torch.as_tensor(MASKS[c]).expand_as(mask))  # lengths >= 1


@pytest.mark.parametrize("comb", [6, "mixed"])
def test_padding_beyond_length_cannot_change_output(comb):
    net = tiny_net()
    randomise_adapters(net)
    batch = make_batch()
    c = MIXED if comb == "mixed" else comb
    before = run(net, batch, c, comb_mask(batch, c)).prediction
    for m in "atv":
        T = LENS[m]
        pad = torch.arange(T)[None, :] >= batch["lengths"][m][:, None]  # (B, T)
        batch["features"][m][pad] = float("nan")
    after = run(net, batch, c, comb_mask(batch, c)).prediction
    torch.testing.assert_close(before, after, rtol=0, atol=0)


@pytest.mark.parametrize("mixed_mode", ["group", "gather"])
def test_no_nan_with_single_modality_and_empty_rows(mixed_mode):
    net = tiny_net(mixed_mode=mixed_mode)
    randomise_adapters(net)
    net.train()
    batch = make_batch()
    batch["mask"][0] = torch.tensor([False, True, False])  # only t
    batch["lengths"]["a"][1] = 0  # present per mask but empty
    batch["lengths"]["t"][2] = 0
    batch["mask"][3] = torch.tensor([False, False, False])  # nothing at all (explicit combination)
    for comb in (6, torch.tensor([1, 6, 6, 6, 0, 2])):
        out = run(net, batch, comb, comb_mask(batch, comb))
        loss = task_loss(out.prediction, torch.tensor([0, 1, 2, 0, 1, 2]), "classification")
        loss = loss + orthogonality_loss(out.r_spec, out.r_com, out.modality_mask)
        net.zero_grad()
        loss.backward()
        assert torch.isfinite(out.prediction).all()
        assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)
        assert not out.modality_mask[1, 0] and not out.modality_mask[2, 1] and not out.modality_mask[3].any()
        for m in "atv":
            assert torch.all(out.r_com[m][~out.modality_mask[:, "atv".index(m)]] == 0)


def test_all_missing_row_needs_explicit_combination():
    net = tiny_net()
    batch = make_batch()
    batch["mask"][0] = False
    with pytest.raises(ValueError, match="no modality present"):
        run(net, batch, None)


@pytest.mark.parametrize("variant", ["mculora", "no_specific", "plain"])
def test_freeze_base_leaves_adapters_and_head(variant):
    net = tiny_net(variant=variant)
    counts = net.parameter_counts()
    assert counts["trainable"] == counts["total"] == counts["base"] + counts["adapters"]
    assert counts["adapters"] == counts["adapters_shared"] + counts["adapters_specific"]
    assert (counts["adapters"] > 0) == (variant != "plain")
    assert (counts["adapters_specific"] > 0) == (variant == "mculora")
    net.freeze_base()
    head_base = sum(p.numel() for n, p in net.head.named_parameters() if n.startswith("base."))
    frozen = net.parameter_counts()
    assert frozen["total"] == counts["total"]
    assert frozen["trainable"] == frozen["adapters"] + head_base
    for name, p in net.named_parameters():
        assert p.requires_grad == ("lora_" in name or name.startswith("head.")), name
    net.unfreeze_all()
    assert net.parameter_counts()["trainable"] == counts["total"]


def test_adapt_targets_limit_where_adapters_sit():
    net = tiny_net(adapt_targets=("fusion",))
    names = [n for n, _ in net.named_parameters() if "lora_" in n]
    assert names and all(n.startswith("fusion.") for n in names)


def test_orthogonality_loss_extremes():
    B, D = 4, 6
    e = torch.eye(D)
    com = {m: e[0].expand(B, D) for m in "atv"}
    orth = {m: e[1].expand(B, D) * 3.0 for m in "atv"}
    par = {m: e[0].expand(B, D) * -2.0 for m in "atv"}  # anti-parallel: cos = -1, squared = 1
    mask = torch.ones(B, 3, dtype=torch.bool)
    assert float(orthogonality_loss(orth, com, mask)) == pytest.approx(0.0, abs=1e-7)
    assert float(orthogonality_loss(par, com, mask)) == pytest.approx(1.0, abs=1e-6)
    # only present modalities count: parallel in a, orthogonal in t/v, only a present -> 1
    mixed = {"a": par["a"], "t": orth["t"], "v": orth["v"]}
    only_a = torch.tensor([[True, False, False]] * B)
    assert float(orthogonality_loss(mixed, com, only_a)) == pytest.approx(1.0, abs=1e-6)
    # a present, t present -> per-sample mean (1 + 0) / 2
    assert float(orthogonality_loss(mixed, com, torch.tensor([[True, True, False]] * B))) == pytest.approx(0.5)
    zero = {m: torch.zeros(B, D) for m in "atv"}
    assert float(orthogonality_loss(zero, com, mask)) == 0.0
    assert float(orthogonality_loss(par, com, torch.zeros(B, 3, dtype=torch.bool))) == 0.0


def test_task_losses():
    logits = torch.tensor([[2.0, 0.0], [0.0, 2.0]])
    ce = torch.log1p(torch.exp(torch.tensor(-2.0)))  # -log softmax of the right class
    assert float(task_loss(logits, torch.tensor([0, 1]), "classification")) == pytest.approx(float(ce))
    pred = torch.tensor([[1.0], [-1.0]])
    assert float(task_loss(pred, torch.tensor([0.5, 0.0]), "regression")) == pytest.approx(0.75)  # (.5+1)/2
    assert float(task_loss(pred, torch.tensor([0.5, 0.0]), "regression", "mse")) == pytest.approx(0.625)


@pytest.mark.parametrize("variant", ["mculora", "plain"])
def test_checkpoint_round_trip(tmp_path, variant):
    net = tiny_net(variant=variant, task="regression", n_outputs=1)
    randomise_adapters(net)
    extra = {"classes": None, "feature_hashes": {"a": "abc"}, "best_epoch": 3}
    path = tmp_path / "model.pt"
    save_model(path, net, extra)
    payload = torch.load(path, weights_only=True)
    assert set(payload) == {"format", "method", "config", "state_dict", "extra"}
    assert payload["format"] == "imer-model/2" and payload["method"] == "mculora"
    loaded, got_extra = load_model(path)
    assert got_extra == extra and loaded.config == net.config and not loaded.training
    batch = make_batch()
    comb = torch.tensor([0, 1, 2, 3, 4, 6])
    for c in (6, comb):
        torch.testing.assert_close(run(loaded, batch, c, comb_mask(batch, c)).prediction,
                                   run(net, batch, c, comb_mask(batch, c)).prediction, rtol=0, atol=0)


def test_legacy_mculora_checkpoint_still_loads(tmp_path):
    """Checkpoints written before the method registry (format imer-mculora/1, no `method`) load as MCULoRA."""
    net = tiny_net(variant="mculora")
    randomise_adapters(net)
    config = net.config.to_dict()
    for key in ("method", "options", "modalities"):  # fields the old ModelConfig did not have
        config.pop(key)
    legacy = tmp_path / "legacy.pt"
    torch.save({"format": "imer-mculora/1", "config": config,
                "state_dict": {k: v.detach().clone() for k, v in net.state_dict().items()}, "extra": {"seed": 1}}, legacy)
    loaded, extra = load_model(legacy)
    assert extra == {"seed": 1} and loaded.config.method == "mculora" and type(loaded) is type(net)
    batch = make_batch()
    torch.testing.assert_close(run(loaded, batch, 6, comb_mask(batch, 6)).prediction,
                               run(net, batch, 6, comb_mask(batch, 6)).prediction, rtol=0, atol=0)


def test_load_rejects_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_model(tmp_path / "nope.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="bad.pt"):
        load_model(bad)
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(2)}, other)
    with pytest.raises(ValueError, match="other.pt"):
        load_model(other)


def test_config_validation_and_round_trip():
    cfg = tiny_config()
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="variant"):
        tiny_config(variant="lora")
    with pytest.raises(ValueError, match="divisible"):
        tiny_config(d_model=7)
    with pytest.raises(ValueError, match="unknown keys"):
        ModelConfig.from_dict({**cfg.to_dict(), "bogus": 1})


def test_input_standardisation_is_stored_and_applied(tmp_path):
    """Train-fitted (mean, std) live in buffers: a checkpoint carries them and inputs are standardised."""
    from pipeline.methods import load_model, save_model

    torch.manual_seed(0)
    cfg = ModelConfig(input_dims={"a": 3, "t": 4, "v": 2}, seq_lens={"a": 5, "t": 6, "v": 4}, task="classification",
                      n_outputs=4, d_model=8, n_heads=2, d_fusion=8, dropout=0.0)
    model = MCULoRANet(cfg).eval()
    feats = {m: torch.randn(6, cfg.seq_lens[m], d) * 50 + 100 for m, d in cfg.input_dims.items()}
    lens = {m: torch.full((6,), cfg.seq_lens[m]) for m in cfg.input_dims}
    mask = torch.ones(6, 3, dtype=torch.bool)
    stats = {m: (torch.full((d,), 100.0), torch.full((d,), 50.0)) for m, d in cfg.input_dims.items()}
    stats["v"] = (torch.zeros(2), torch.tensor([2.0, 0.0]))  # a constant feature is centred, not divided by 0
    model.set_input_statistics(stats)
    out = model(feats, lens, mask, 6).prediction
    assert torch.isfinite(out).all()
    raw = MCULoRANet(cfg).eval()
    raw.load_state_dict(model.state_dict())
    for m, d in cfg.input_dims.items():  # identity: the test standardises by hand instead
        raw.encoders[m].set_input_statistics(torch.zeros(d), torch.ones(d))
    pre = {m: (x - 100.0) / 50.0 if m != "v" else x / torch.tensor([2.0, 1.0]) for m, x in feats.items()}
    torch.testing.assert_close(raw(pre, lens, mask, 6).prediction, out)  # same as standardising by hand
    save_model(tmp_path / "m.pt", model, {})
    loaded, _ = load_model(tmp_path / "m.pt")
    torch.testing.assert_close(loaded(feats, lens, mask, 6).prediction, out)
