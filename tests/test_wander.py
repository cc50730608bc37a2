"""WanderNet invariants: masking, mixed batches, freezing, checkpoints, counts, live/dead init, cache."""
from __future__ import annotations

import pytest
import torch

from pipeline.core.modalities import MASKS, MODALITY_ORDER
from pipeline.methods import MCULoRANet, ModelConfig, load_model, save_model, task_loss
from pipeline.methods.registry import build_network
from pipeline.methods.backbone_cache import encoder_states
from pipeline.methods.wander import WanderNet

DIMS = {"a": 5, "t": 7, "v": 3}
LENS = {"a": 6, "t": 4, "v": 5}
OPTS = dict(rank=3, cp_rank=2, token_rank=2, out_tokens=3)
MIXED = torch.tensor([0, 1, 2, 3, 4, 5, 6, 6])


def tiny_config(options: dict | None = None, **kw) -> ModelConfig:
    base = dict(input_dims=DIMS, seq_lens=LENS, method="wander", n_outputs=3, d_model=8, n_layers=2, n_heads=2,
                d_fusion=12, dropout=0.0, options={**OPTS, **(options or {})})
    return ModelConfig(**{**base, **kw})


def tiny_net(seed: int = 0, stage: str = "stage2", options: dict | None = None, **kw) -> WanderNet:
    torch.manual_seed(seed)
    net = build_network(tiny_config(options, **kw))
    net.set_stage(stage)
    return net.eval()


def wake(net: WanderNet, seed: int = 3, scale: float = 1.0) -> WanderNet:
    """Give U_up random weights so the adapter actually changes the output (as after training)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        net.up.weight.copy_(torch.randn(net.up.weight.shape, generator=g) * scale)
    return net


def make_batch(B: int = 8, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    feats = {m: torch.randn(B, LENS[m], DIMS[m], generator=g) for m in "atv"}
    lengths = {m: torch.randint(1, LENS[m] + 1, (B,), generator=g) for m in "atv"}
    return {"features": feats, "lengths": lengths, "lengths_natural": dict(lengths),
            "mask": torch.ones(B, 3, dtype=torch.bool), "target": torch.randint(0, 3, (B,), generator=g),
            "index": torch.arange(10, 10 + B)}


def run(net, batch, comb, **kw):
    mask = batch["mask"] & torch.as_tensor(MASKS)[comb]
    return net(batch["features"], batch["lengths"], mask, comb, **kw).prediction


def test_encoder_states_pool_like_the_encoder():
    net, batch = tiny_net(options={"placement": "every_layer"}), make_batch()
    for m in MODALITY_ORDER:
        states, h = encoder_states(net.encoders[m], batch["features"][m], batch["lengths"][m], every_layer=True)
        assert len(states) == 2
        torch.testing.assert_close(h, net.encoders[m](batch["features"][m], batch["lengths"][m])[0], rtol=0, atol=0)


@pytest.mark.parametrize("options", [{}, {"absent": "one"}, {"placement": "every_layer"}])
@pytest.mark.parametrize("comb", range(7))
def test_absent_modality_features_cannot_change_output(options, comb):
    net, batch = wake(tiny_net(options=options)), make_batch()
    ref = run(net, batch, comb)
    noisy = {**batch, "features": dict(batch["features"])}
    for j, m in enumerate(MODALITY_ORDER):
        if not MASKS[comb][j]:
            noisy["features"][m] = torch.randn_like(batch["features"][m]) * 1e3
    torch.testing.assert_close(run(net, noisy, comb), ref, rtol=0, atol=0)
    if MASKS[comb].sum() < 3:  # sanity: a present modality does change it
        changed = {**batch, "features": {m: x * 2 for m, x in batch["features"].items()}}
        assert not torch.allclose(run(net, changed, comb), ref)


@pytest.mark.parametrize("cached", [False, True])
def test_mixed_batch_equals_rows_run_per_combination(cached):
    net, batch = wake(tiny_net()), make_batch()
    if cached:
        net.build_cache([batch])
    kw = {"index": batch["index"]} if cached else {}
    mixed = run(net, batch, MIXED, **kw)
    for c in range(7):
        rows = (MIXED == c).nonzero(as_tuple=True)[0]
        sub = {**batch, "features": {m: x[rows] for m, x in batch["features"].items()},
               "lengths": {m: x[rows] for m, x in batch["lengths"].items()}, "mask": batch["mask"][rows]}
        kw = {"index": batch["index"][rows]} if cached else {}
        torch.testing.assert_close(run(net, sub, c, **kw), mixed[rows], rtol=0, atol=1e-6)


def stage2_step(net: WanderNet, batch: dict, steps: int = 1) -> dict[str, torch.Tensor | None]:
    """`steps` AdamW steps on the trainable parameters, in train mode; returns the last grads."""
    net.train()
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    for _ in range(steps):
        opt.zero_grad()
        out = net(batch["features"], batch["lengths"], batch["mask"], MIXED, index=batch.get("use_index"))
        task_loss(out.prediction, batch["target"], "classification", "l1").backward()
        grads = {n: None if p.grad is None else p.grad.clone() for n, p in net.named_parameters()}
        opt.step()
    return grads


@pytest.mark.parametrize("train_fusion", [True, False])
def test_frozen_parts_get_no_gradient_and_stay_bit_identical(train_fusion):
    net = tiny_net(options={"train_fusion": train_fusion}, dropout=0.3)
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    grads = stage2_step(net, make_batch(), steps=2)
    assert net.training and not any(m.training for m in net.encoders.modules())  # frozen encoders stay in eval
    frozen = [n for n in before if n.startswith("encoders.") or (not train_fusion and n.startswith("fusion."))]
    assert frozen and all(grads[n] is None for n in frozen)
    for n, p in net.named_parameters():
        if n in frozen:
            assert torch.equal(p, before[n]), n
        elif n.startswith(("up.", "head.")) or (train_fusion and n.startswith("fusion.")):
            assert not torch.equal(p, before[n]), n


def test_checkpoint_round_trip(tmp_path):
    net, batch = wake(tiny_net(options={"cp_rank": 3, "absent": "one"})), make_batch()
    save_model(tmp_path / "model.pt", net, {"note": "x"})
    loaded, extra = load_model(tmp_path / "model.pt")
    assert isinstance(loaded, WanderNet) and extra == {"note": "x"}
    assert loaded.options["cp_rank"] == 3 and loaded.options["absent"] == "one"
    torch.testing.assert_close(run(loaded, batch, MIXED), run(net, batch, MIXED), rtol=0, atol=0)


def spec_adapter_count(o: dict, D: int = 8, D_f: int = 12, layers: int = 1, modalities: str = "atv") -> int:
    """The spec's formula, written out independently of the code."""
    R, t, K, r = o["cp_rank"], o["token_rank"], o["out_tokens"], o["rank"]
    per_m = [D * r + r + R * LENS[m] * t + R * K * t + R * r * D + (R * K * D if o.get("absent") != "one" else 0)
             for m in modalities]
    return layers * (sum(per_m) + 2 * D) + D * D_f


@pytest.mark.parametrize("options,layers", [({}, 1), ({"absent": "one", "cp_rank": 4}, 1),
                                            ({"placement": "every_layer"}, 2)])
def test_parameter_counts_match_spec_formulas(options, layers):
    o = {**OPTS, **options}
    net = tiny_net(options=options)
    plain = MCULoRANet(ModelConfig(input_dims=DIMS, seq_lens=LENS, n_outputs=3, d_model=8, n_layers=2, n_heads=2,
                                   d_fusion=12, variant="plain"))
    c = net.parameter_counts()
    assert c["adapter"] == spec_adapter_count(o, layers=layers) == net.expected_adapter_count()
    assert c["fusion"] == 3 * 8 * 12 + 12 and c["head"] == 12 * 3 + 3
    assert c["encoders"] + c["fusion"] + c["head"] == plain.parameter_counts()["total"]
    assert c["trainable"] == c["adapter"] + c["fusion"] + c["head"] and c["frozen"] == c["encoders"]
    net.set_stage("stage1")
    c1 = net.parameter_counts()
    assert c1["trainable"] == c["encoders"] + c["fusion"] + c["head"]


def test_dataset_without_a_modality_builds_no_factors_for_it():
    net = tiny_net(modalities=("a", "t"))
    assert set(net.adapters[0].inp) == {"a", "t"}
    assert net.parameter_counts()["adapter"] == spec_adapter_count(OPTS, modalities="at")
    run(net, make_batch(), 3)  # a, t only


def test_zero_output_projection_starts_stage2_at_stage1():
    net, batch = tiny_net(stage="stage1"), make_batch()
    stage1 = run(net, batch, MIXED)
    net.set_stage("stage2")
    torch.testing.assert_close(run(net.eval(), batch, MIXED), stage1, rtol=0, atol=0)
    # live init: U_up gets gradient at the first step, the factors from the second
    g1 = stage2_step(net, batch, steps=1)
    assert float(g1["up.weight"].abs().sum()) > 0
    assert all(float(v.abs().sum()) == 0 for n, v in g1.items() if n.startswith("adapters.") and v is not None)
    g2 = stage2_step(net, batch, steps=1)
    for key in ("time_u.a", "time_v.t", "feat.v", "inp.a.weight"):
        assert float(g2[f"adapters.0.{key}"].abs().sum()) > 0, key


def test_zero_token_init_is_dead():
    net, batch = tiny_net(options={"init": "zero_token"}), make_batch()
    for steps in (1, 3):
        grads = stage2_step(net, batch, steps=steps)
        adapter = {n: v for n, v in grads.items() if n.startswith(("adapters.", "up."))}
        assert adapter and all(v is not None and float(v.abs().sum()) == 0 for v in adapter.values())
    assert float(net.up.weight.detach().abs().sum()) == 0


def test_loads_a_shared_stage1_model():
    """A plain or an MCULoRA stage-1 state (adapters ignored) starts stage 2 at that model's outputs."""
    torch.manual_seed(7)
    mcu = MCULoRANet(ModelConfig(input_dims=DIMS, seq_lens=LENS, n_outputs=3, d_model=8, n_layers=2, n_heads=2,
                                 d_fusion=12, dropout=0.0, lora_rank=2)).eval()
    net, batch = tiny_net(seed=1), make_batch()
    net.load_backbone_state(mcu.state_dict())
    torch.testing.assert_close(run(net, batch, MIXED), run(mcu, batch, MIXED), rtol=0, atol=0)
    with pytest.raises(ValueError, match="lacks backbone keys"):
        net.load_backbone_state({k: v for k, v in mcu.state_dict().items() if not k.startswith("head.")})


def test_sum_of_products_is_not_the_collapsed_product_of_sums():
    net, batch = tiny_net(), make_batch()
    ad = net.adapters[0]
    states = {m: encoder_states(net.encoders[m], batch["features"][m], batch["lengths"][m], False)[0][0]
              for m in MODALITY_ORDER}
    valid = {m: torch.arange(LENS[m])[None, :] < batch["lengths"][m][:, None] for m in MODALITY_ORDER}
    present = {m: torch.ones(8, dtype=torch.bool) for m in MODALITY_ORDER}
    f = [ad.factor(m, states[m], valid[m]) for m in MODALITY_ORDER]  # (B, R, K, D) each
    g = ad(states, valid, present)
    torch.testing.assert_close(g, ad.norm((f[0] * f[1] * f[2]).sum(1).mean(1)))
    collapsed = ad.norm((f[0].sum(1) * f[1].sum(1) * f[2].sum(1)).mean(1))
    assert not torch.allclose(g, collapsed, atol=1e-3)


@pytest.mark.parametrize("placement", ["last", "every_layer"])
def test_cached_equals_live(placement):
    # U_up ~ N(0, 0.3^2): a trained-like adapter. (At N(0, 1) the float32 gap of row-subset vs whole-batch
    # encoder runs, amplified by the CP product and LayerNorm, reaches ~1.1e-6 for some seeds.)
    net, batch = wake(tiny_net(options={"placement": placement}), scale=0.3), make_batch()
    other = make_batch(B=5, seed=1)
    other["index"] = torch.arange(30, 35)
    report = net.enable_cache([batch, other], probe={**batch, "combination": MIXED})
    assert report["cache_backbone"] and report["cache_probe_max_diff"] <= 1e-6
    assert report["cache_probe_state_diff"] <= 1e-6
    for b in (batch, other):
        for comb in (MIXED[: len(b["index"])], 6, 1):
            # float32: encoders run on row subsets live, on whole batches cached (a few ulps, here logits ~3)
            torch.testing.assert_close(run(net, b, comb, index=b["index"]), run(net, b, comb), rtol=1e-6, atol=1e-6)
    # gradients through the cached path equal the live ones
    live = stage2_step(wake(tiny_net(options={"placement": placement}), scale=0.3), batch)
    cached = stage2_step(net, {**batch, "use_index": batch["index"]})
    for n, v in live.items():
        if v is not None:
            torch.testing.assert_close(cached[n], v, rtol=1e-5, atol=1e-6)


def test_cache_refused_when_probe_disagrees_and_dropped_on_stage_change():
    net, batch = tiny_net(), make_batch()
    assert not net.enable_cache([batch], probe=batch, tolerance=-1.0)["cache_backbone"]
    assert net._cache is None
    assert net.enable_cache([batch], probe=batch)["cache_backbone"]
    net.set_stage("stage2")
    assert net._cache is None
    with pytest.raises(RuntimeError, match="set_stage"):
        tiny_net(stage="stage1").build_cache([batch])


@pytest.mark.parametrize("bad,match", [({"cp_rank": 0}, "cp_rank"), ({"absent": "zero"}, "absent"),
                                       ({"init": "x"}, "init"), ({"placement": "x"}, "placement"),
                                       ({"bogus": 1}, "unknown keys"), ({"cache_backbone": "yes"}, "cache_backbone")])
def test_bad_options_are_refused(bad, match):
    with pytest.raises(ValueError, match=match):
        WanderNet(tiny_config(bad))


# ---- end to end through the trainer (train.method: wander) ------------------------------------------
E2E = {"seed": 5, "method": "wander", "stage1_epochs": 2, "max_epochs": 3, "patience": 3, "batch_size": 32,
       "lr": 3e-3, "model": {"d_model": 16, "d_fusion": 32, "n_heads": 2},
       "wander": {"rank": 4, "cp_rank": 2, "token_rank": 2, "out_tokens": 2}}


@pytest.fixture(scope="module")
def data_paths(tmp_path_factory):
    from pipeline.splits import build_splits
    from tests.factories import make_feature_dataset

    root = tmp_path_factory.mktemp("wander")
    manifest, features = make_feature_dataset(root, n=160, missing_share=0.15, seed=3)
    build_splits(manifest, features, root / "splits", {"seed": 1})
    return manifest, features, root / "splits"


@pytest.fixture(scope="module")
def trained(data_paths, tmp_path_factory):
    """One tiny `train.method: wander` run (stage 1, then stage 2 on the cached frozen backbone)."""
    from pipeline.train import train_model
    from pipeline.training.data import MultimodalData

    out = tmp_path_factory.mktemp("wander_run")
    # out_dir also in the params: the stage cache lives under cfg.out_dir
    summary = train_model(MultimodalData.load(*data_paths, include=("train", "val")), {**E2E, "out_dir": str(out)}, out)
    return summary, out


def test_trains_end_to_end_with_frozen_cached_backbone(trained):
    from pipeline.core.modalities import COMBINATIONS

    summary, out = trained
    assert summary["method"] == "wander" and set(summary["best_val"]) == set(COMBINATIONS)
    assert [s["name"] for s in summary["stages"]] == ["stage1", "stage2"]
    notes = summary["stages"][1]["notes"]
    assert notes["cache_backbone"] and notes["cache_probe_max_diff"] <= 1e-6
    c1, c2 = summary["parameter_counts"]["stage1"], summary["parameter_counts"]["stage2"]
    assert c1["trainable"] == c1["encoders"] + c1["fusion"] + c1["head"]
    assert c2["trainable"] == c2["adapter"] + c2["fusion"] + c2["head"] and c2["frozen"] == c2["encoders"]
    model, extra = load_model(out / "models" / "model.pt")
    assert isinstance(model, WanderNet) and extra["method"] == "wander"
    assert float(model.up.weight.detach().abs().sum()) > 0  # the adapter trained
    # the encoders are exactly the stored stage-1 ones: stage 2 never wrote them
    (stage1_file,) = (out / ".imer" / "stage_cache").glob("*.pt")
    stage1 = torch.load(stage1_file, weights_only=True)["state_dict"]
    enc = {k: v for k, v in model.state_dict().items() if k.startswith("encoders.")}
    assert enc and all(torch.equal(v, stage1[k]) for k, v in enc.items())


@pytest.mark.slow  # ~10 s: a second tiny training run
def test_stage1_from_replaces_stage1(trained, data_paths, tmp_path):
    from pipeline.train import train_model
    from pipeline.training.data import MultimodalData

    _, out = trained
    params = {**E2E, "out_dir": str(tmp_path), "wander": {**E2E["wander"], "cache_backbone": False,
              "stage1_from": str(out / "models" / "model.pt"), "stage2_sampler": "complete"}}
    summary = train_model(MultimodalData.load(*data_paths, include=("train", "val")), params, tmp_path)
    assert [s["name"] for s in summary["stages"]] == ["stage2"] and summary["stages"][0]["sampler"] == "complete"
    assert summary["stages"][0]["notes"]["cache_backbone"] is False
    first, _ = load_model(out / "models" / "model.pt")
    second, _ = load_model(tmp_path / "models" / "model.pt")
    enc = [k for k in first.state_dict() if k.startswith("encoders.")]
    assert all(torch.equal(first.state_dict()[k], second.state_dict()[k]) for k in enc)
    with pytest.raises(ValueError, match="differ from this run"):
        first.load_stage1(str(out / "models" / "model.pt"), {"splits_hash": "other"})


def test_params_yaml_shows_the_wander_defaults():
    from pipeline.core.params import load_params
    from pipeline.methods.wander import DEFAULTS

    assert load_params("train")["wander"] == DEFAULTS
