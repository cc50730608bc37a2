"""MPLMMNet invariants (both backbones): absent inputs never read, mixed = per-combination batches,
stage freezing, checkpoint round trip, parameter-count formulas, type prompts that (do not) train.
Training through the trainer: tests/test_mplmm_train.py; the samplers: tests/test_eta_sampler.py."""
from __future__ import annotations

import pytest
import torch

from pipeline.core.modalities import MASKS
from pipeline.methods import MCULoRANet, ModelConfig, load_model, save_model, task_loss
from pipeline.methods.mplmm import MPLMMNet
from pipeline.methods.mplmm_options import DEFAULTS, resolve_options
from pipeline.methods.registry import build_network

DIMS = {"a": 5, "t": 7, "v": 3}
LENS = {"a": 6, "t": 4, "v": 5}
MULT = {"d_model": 8, "n_layers": 1, "mem_layers": 1, "n_heads": 2,
        "dropout": {"attn": 0.0, "relu": 0.0, "res": 0.0, "embed": 0.0, "out": 0.0}}
MIXED = torch.tensor([0, 1, 2, 3, 4, 5, 6, 6])
BACKBONES = ["imer", "mult"]


def tiny_config(backbone: str = "imer", **opts) -> ModelConfig:
    options = {"backbone": backbone, "prompt_length": 3, "mult": MULT, **opts}
    return ModelConfig(input_dims=DIMS, seq_lens=LENS, method="mplmm", n_outputs=3, d_model=8, n_layers=2,
                       n_heads=2, d_fusion=12, dropout=0.0, options=options)


def tiny_net(backbone: str = "imer", seed: int = 0, **opts) -> MPLMMNet:
    torch.manual_seed(seed)
    return build_network(tiny_config(backbone, **opts)).eval()


def make_batch(B: int = 8, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"features": {m: torch.randn(B, LENS[m], DIMS[m], generator=g) for m in "atv"},
            "lengths": {m: torch.randint(1, LENS[m] + 1, (B,), generator=g) for m in "atv"},
            "mask": torch.ones(B, 3, dtype=torch.bool), "target": torch.randint(0, 3, (B,), generator=g)}


def randomise(net: torch.nn.Module, seed: int = 3) -> None:
    """Non-zero prompts everywhere (fresh signal prompts are zero and would hide mistakes)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.startswith("prompts."):
                p.add_(torch.randn(p.shape, generator=g) * 0.3)


def run(net, batch, comb):
    return net(batch["features"], batch["lengths"], batch["mask"], combination=comb)


@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize("generator", ["attention", "dense"])
@pytest.mark.parametrize("comb", [*range(7), "mixed"])
def test_absent_modality_is_never_read(backbone, generator, comb):
    net = tiny_net(backbone, generator=generator)
    randomise(net)
    batch = make_batch()
    c = MIXED if comb == "mixed" else comb
    ref = run(net, batch, c).prediction
    allowed = torch.as_tensor(MASKS)[c].expand(8, 3)  # (B, 3)
    noisy = {m: f.clone() for m, f in batch["features"].items()}
    for i, m in enumerate("atv"):
        rows = ~allowed[:, i]
        noisy[m][rows] = torch.randn(int(rows.sum()), LENS[m], DIMS[m]) * 100
        noisy[m][rows, 0, 0] = float("nan")
    out = net(noisy, batch["lengths"], batch["mask"], combination=c).prediction
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    # a mask that hides a modality acts like a combination without it
    masked = run(net, {**batch, "mask": allowed.clone()}, None).prediction
    torch.testing.assert_close(masked, ref, rtol=0, atol=0)


@pytest.mark.parametrize("backbone", BACKBONES)
def test_nan_in_absent_features_leaves_gradients_finite(backbone):
    net = tiny_net(backbone)
    net.set_stage("stage2")
    net.train()
    batch = make_batch()
    for i, m in enumerate("atv"):
        batch["features"][m][~torch.as_tensor(MASKS)[MIXED][:, i]] = float("nan")
    task_loss(run(net, batch, MIXED).prediction, batch["target"], "classification").backward()
    assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)


@pytest.mark.parametrize("backbone", BACKBONES)
def test_type_tokens_are_q_times_m_of_each_rows_combination(backbone):
    net = tiny_net(backbone)
    randomise(net)
    bank, seen = net.prompts, []
    original = bank.type_tokens
    bank.type_tokens = lambda comb: seen.append(comb.clone()) or original(comb)  # record what forward asks
    batch = make_batch()
    run(net, batch, MIXED)
    assert torch.equal(seen[0], MIXED)  # each row's effective combination
    mask = torch.as_tensor(MASKS)[MIXED].clone()
    mask[0, 0] = False  # row 0 is "a" under its combination, but its audio is masked: it cannot be
    with pytest.raises(ValueError, match="no modality"):
        net(batch["features"], batch["lengths"], mask, None)
    tokens = original(MIXED)  # (3, B, P, D')
    for b, c in enumerate(MIXED.tolist()):
        M = sum((bank.signal_present[m] if MASKS[c][i] else bank.signal_missing[m]).t() @ bank.type_keys[m]
                for i, m in enumerate("atv"))  # (D, D')
        for j in range(3):
            torch.testing.assert_close(tokens[j, b], bank.type_queries[j] @ M)
    assert not torch.allclose(tokens[:, 0], tokens[:, 6])  # combinations get different prompts


@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize("generator", ["attention", "dense", "none"])
def test_mixed_batch_equals_per_combination(backbone, generator):
    net = tiny_net(backbone, generator=generator)
    randomise(net)
    batch = make_batch()
    mixed = run(net, batch, MIXED).prediction
    for c in MIXED.unique().tolist():
        rows = (MIXED == c).nonzero(as_tuple=True)[0]
        sub = {"features": {m: f[rows] for m, f in batch["features"].items()},
               "lengths": {m: n[rows] for m, n in batch["lengths"].items()}, "mask": batch["mask"][rows]}
        torch.testing.assert_close(mixed[rows], run(net, sub, c).prediction, rtol=1e-5, atol=1e-6)


def train_step(net, batch, comb, opt) -> None:
    opt.zero_grad()
    task_loss(run(net, batch, comb).prediction, batch["target"], "classification").backward()
    opt.step()


@pytest.mark.parametrize("backbone", BACKBONES)
def test_stage2_frozen_parts_get_no_gradient_and_stay_identical(backbone):
    net = tiny_net(backbone)
    net.set_stage("stage2")
    net.train()
    frozen = {n: p.detach().clone() for n, p in net.named_parameters() if not p.requires_grad}
    trained = {n: p.detach().clone() for n, p in net.named_parameters() if p.requires_grad}
    assert frozen and all(net.group_of(n) == "backbone" for n in frozen)
    assert {net.group_of(n) for n in trained} == {"input_proj", "head", "prompts_generative", "prompts_signal",
                                                  "prompts_type"}
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    batch = make_batch()
    for _ in range(2):
        train_step(net, batch, MIXED, opt)
        assert all(p.grad is None for n, p in net.named_parameters() if n in frozen)
    for n, p in net.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    moved = [n for n, p in net.named_parameters() if n in trained and not torch.equal(p, trained[n])]
    assert any("signal_missing" in n for n in moved) and any("generative" in n for n in moved)


@pytest.mark.parametrize("backbone", BACKBONES)
def test_stage1_trains_the_backbone_alone(backbone):
    net = tiny_net(backbone)
    net.set_stage("stage1")
    net.train()
    before = {n: p.detach().clone() for n, p in net.named_parameters() if n.startswith("prompts.")}
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-2)
    train_step(net, make_batch(), MIXED, opt)
    assert all(torch.equal(p, before[n]) and p.grad is None for n, p in net.named_parameters() if n in before)
    assert all(p.grad is not None for n, p in net.named_parameters() if net.group_of(n) == "backbone")


@pytest.mark.parametrize("comb", [*range(7), "mixed"])
def test_imer_stage1_equals_mculora_plain(comb):
    """Stage 1 of the `imer` backbone is MCULoRA's plain network (same state names, h_m = 0 if absent)."""
    net = tiny_net("imer")
    net.set_stage("stage1")
    torch.manual_seed(9)
    plain = MCULoRANet(ModelConfig(input_dims=DIMS, seq_lens=LENS, n_outputs=3, d_model=8, n_layers=2, n_heads=2,
                                   d_fusion=12, dropout=0.0, variant="plain")).eval()
    result = net.load_state_dict(plain.state_dict(), strict=False)
    assert not result.unexpected_keys and all(k.startswith("prompts.") for k in result.missing_keys)
    batch = make_batch()
    c = MIXED if comb == "mixed" else comb
    torch.testing.assert_close(run(net, batch, c).prediction, run(plain, batch, c).prediction, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize("opts", [{}, {"generator": "dense", "signal_prompts": "vector", "readout": "prompt"}])
def test_checkpoint_round_trip(backbone, opts, tmp_path):
    net = tiny_net(backbone, **opts)
    randomise(net)
    save_model(tmp_path / "model.pt", net, {"note": "x"})
    loaded, extra = load_model(tmp_path / "model.pt")
    assert isinstance(loaded, MPLMMNet) and extra == {"note": "x"} and loaded.options == net.options
    batch = make_batch()
    torch.testing.assert_close(run(loaded, batch, MIXED).prediction, run(net, batch, MIXED).prediction,
                               rtol=0, atol=0)


def layer(d: int) -> int:
    """One pre-norm transformer layer of width d with a 4d MLP: 12 d^2 + 13 d."""
    return 12 * d * d + 13 * d


def expected_counts(backbone: str, generator: str, signal: str, P: int = 3) -> dict[str, int]:
    """The spec's formulas, written out independently of the code."""
    D = 8 if backbone == "imer" else MULT["d_model"]
    Dt = D if backbone == "imer" else 2 * D
    caps, gen = LENS, LENS  # gen_tokens null = the cap
    rows = {m: caps[m] if signal == "positional" else 1 for m in "atv"}
    others = {m: [s for s in "atv" if s != m] for m in "atv"}
    g = 3 * P * D + sum(DIMS[s] * D + D for m in "atv" for s in others[m])
    if generator == "attention":
        g += sum(gen[m] * D + 4 * (D * D + D) for m in "atv")
    else:
        g += sum(gen[m] * (P + sum(caps[s] for s in S)) + gen[m] for m in "atv"
                 for S in ([others[m][0]], [others[m][1]], others[m]))
    counts = {"prompts_generative": g, "prompts_signal": 2 * D * sum(rows.values()),
              "prompts_type": 3 * P * D + Dt * sum(rows.values())}
    if backbone == "imer":
        counts["input_proj"] = sum(DIMS[m] * D + D for m in "atv")
        counts["backbone"] = sum(caps[m] * D + 2 * layer(D) + 2 * D for m in "atv") + 3 * D * 12 + 12
        counts["head"] = 12 * 3 + 3
    else:
        n, k = MULT["n_layers"], MULT["mem_layers"]
        counts["input_proj"] = sum(DIMS[m] * D for m in "atv")  # MulT's projections have no bias
        counts["backbone"] = (6 * (n * layer(D) + 2 * D) + 3 * (k * layer(2 * D) + 4 * D)
                              + 2 * (36 * D * D + 6 * D))
        counts["head"] = 6 * D * 3 + 3
    return counts


@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize("generator", ["attention", "dense"])
@pytest.mark.parametrize("signal", ["positional", "vector"])
def test_parameter_counts_match_formulas(backbone, generator, signal):
    net = tiny_net(backbone, generator=generator, signal_prompts=signal)
    counts, want = net.parameter_counts(), expected_counts(backbone, generator, signal)
    assert {k: counts[k] for k in want} == want
    assert counts["total"] == sum(p.numel() for p in net.parameters()) == sum(want.values())
    net.set_stage("stage2")
    assert net.parameter_counts()["trainable"] == counts["total"] - want["backbone"]
    net.set_stage("stage1")
    assert net.parameter_counts()["trainable"] == want["backbone"] + want["input_proj"] + want["head"]


def type_grads(net) -> list[float]:
    return [float(p.grad.abs().sum()) if p.grad is not None else 0.0
            for n, p in net.named_parameters() if net.group_of(n) == "prompts_type"]


@pytest.mark.parametrize("backbone", BACKBONES)
def test_zero_type_prompts_never_train_small_ones_do(backbone):
    batch = make_batch()
    for init in ("zero", "small"):
        net = tiny_net(backbone, type_prompt_init=init)
        net.set_stage("stage2")
        net.train()
        opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-2)
        grads = []
        for _ in range(3):
            train_step(net, batch, MIXED, opt)
            grads.append(type_grads(net))
        if init == "zero":  # Q = K = 0: each one's gradient is proportional to the other
            assert all(g == 0.0 for step in grads for g in step)
            assert all(torch.count_nonzero(p) == 0 for n, p in net.named_parameters()
                       if net.group_of(n) == "prompts_type")
        else:  # step 0: S = 0 so M(c) = 0 and Q gets nothing; once S moved, Q and every K_m do
            assert all(g > 0 for g in grads[1])


def test_generation_loss_only_when_asked():
    batch = make_batch()
    batch["natural"] = torch.ones(8, 3, dtype=torch.bool)
    for lam in (0.0, 0.1):
        net = tiny_net("imer", lambda_gen=lam)
        net.set_stage("stage2")
        net.train()
        out = net(batch["features"], batch["lengths"], torch.as_tensor(MASKS)[MIXED], combination=None)
        aux = net.auxiliary_losses(out, {**batch, "mask": out.modality_mask})
        if lam == 0.0:
            assert aux == {}
        else:
            weight, value = aux["l_gen"]
            assert weight == 0.1 and float(value) > 0 and value.requires_grad


def test_options_are_validated():
    with pytest.raises(ValueError, match="unknown key"):
        resolve_options({"promt_length": 4})
    with pytest.raises(ValueError, match="dropout needs backbone imer"):
        resolve_options({"backbone": "mult", "stage1_sampler": "dropout"})
    with pytest.raises(ValueError, match="generator"):
        resolve_options({"generator": "gan"})
    assert resolve_options({})["readout"] == "mean" and resolve_options({"backbone": "mult"})["readout"] == "prompt"


def test_params_yaml_shows_the_defaults():
    from pipeline.core.params import load_params

    assert load_params("train")["mplmm"] == DEFAULTS


@pytest.mark.parametrize("readout", ["mean", "prompt"])
def test_last_layer_equals_the_full_layer_at_the_kept_positions(readout):
    from pipeline.methods.imer_backbone import last_layer

    net = tiny_net("imer")
    layer = net.encoders["t"].layers[-1]
    x, valid = torch.randn(5, 7, 8), torch.arange(7)[None, :] < torch.tensor([[7], [3], [1], [0], [5]])
    keep = slice(0, 4) if readout == "mean" else slice(-1, None)
    torch.testing.assert_close(last_layer(layer, x, valid, keep), layer(x, valid)[:, keep], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize("frozen_dropout", [False, True])
def test_stage2_frozen_backbone_runs_in_eval_mode_unless_asked(backbone, frozen_dropout):
    net = tiny_net(backbone, frozen_dropout=frozen_dropout)
    net.set_stage("stage2")
    net.train()
    frozen = (list(net.encoders["a"].layers.modules()) if backbone == "imer"
              else list(net.mult.memory.modules()) + [net.mult.out_drop])
    assert all(m.training == frozen_dropout for m in frozen)
    assert net.prompts.training and (net.drop if backbone == "imer" else net.mult.proj).training
    net.set_stage("stage1")
    assert all(m.training for m in frozen)  # stage 1 trains the backbone: dropout on
