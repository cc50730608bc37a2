"""MCLALinear invariants: zero-init no-op, gradient isolation per combination, group == gather."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from pipeline.core.modalities import COMBINATIONS
from pipeline.methods.mcla import MCLALinear, active_combination, normalise_combination, set_active_combination

IN, OUT, R = 6, 5, 3


def layer(variant: str = "mculora", mixed_mode: str = "group", seed: int = 0) -> MCLALinear:
    torch.manual_seed(seed)
    return MCLALinear(IN, OUT, variant=variant, rank=R, alpha=6.0, mixed_mode=mixed_mode)


def randomise_adapters(module: nn.Module, seed: int = 1) -> None:
    """Non-zero B so that every adapter (A and B) would receive gradient if it were used."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)


@pytest.mark.parametrize("variant", ["mculora", "no_specific", "plain"])
@pytest.mark.parametrize("comb", [0, 3, 6, "mixed"])
@pytest.mark.parametrize("shape", [(7, IN), (7, 4, IN)])
def test_fresh_adapter_is_noop(variant, comb, shape):
    lin = layer(variant)
    x = torch.randn(*shape)
    lin.set_active(torch.tensor([0, 1, 2, 3, 4, 5, 6]) if comb == "mixed" else comb)
    torch.testing.assert_close(lin(x), lin.base(x), rtol=0, atol=0)
    plain = nn.Linear(IN, OUT)
    plain.load_state_dict({"weight": lin.base.weight, "bias": lin.base.bias})
    torch.testing.assert_close(lin(x), plain(x), rtol=0, atol=0)


def test_variant_adapter_sets():
    assert set(layer("mculora").lora_A) == {"shared", *COMBINATIONS}
    assert set(layer("no_specific").lora_A) == {"shared"}
    assert len(layer("plain").lora_A) == 0 and not list(layer("plain").lora_B.parameters())
    lin = layer("mculora")
    assert lin.lora_A["at"].weight.shape == (R, IN) and lin.lora_B["at"].weight.shape == (OUT, R)
    assert torch.all(lin.lora_B["at"].weight == 0) and torch.any(lin.lora_A["at"].weight != 0)


def _grad_norms(lin: MCLALinear) -> dict[str, float]:
    out = {}
    for name in lin.lora_A:
        gs = [lin.lora_A[name].weight.grad, lin.lora_B[name].weight.grad]
        out[name] = sum(0.0 if g is None else float(g.abs().sum()) for g in gs)
    return out


@pytest.mark.parametrize("comb", range(7))
def test_only_shared_and_active_adapter_get_gradient(comb):
    lin = layer()
    randomise_adapters(lin)
    lin.set_active(comb)
    lin(torch.randn(4, 2, IN)).pow(2).sum().backward()
    norms = _grad_norms(lin)
    assert norms["shared"] > 0 and norms[COMBINATIONS[comb]] > 0
    assert all(v == 0 for k, v in norms.items() if k not in ("shared", COMBINATIONS[comb]))
    untouched = [c for c in COMBINATIONS if c != COMBINATIONS[comb]]
    assert all(lin.lora_A[c].weight.grad is None for c in untouched)  # not even computed


@pytest.mark.parametrize("mixed_mode", ["group", "gather"])
def test_mixed_batch_gradient_only_for_present_combinations(mixed_mode):
    lin = layer(mixed_mode=mixed_mode)
    randomise_adapters(lin)
    comb = torch.tensor([1, 5, 5, 1, 6])
    lin.set_active(comb)
    lin(torch.randn(5, 3, IN)).sum().backward()
    norms = _grad_norms(lin)
    present = {COMBINATIONS[i] for i in comb.tolist()} | {"shared"}
    assert all(norms[c] > 0 for c in present)
    assert all(norms[c] == 0 for c in norms if c not in present)
    # absent adapters get no gradient tensor at all (a zero grad would still move them under Adam)
    assert all(lin.lora_A[c].weight.grad is None for c in COMBINATIONS if c not in present)


@pytest.mark.parametrize("shape", [(9, IN), (9, 4, IN)])
def test_group_equals_gather_equals_homogeneous_loop(shape):
    torch.manual_seed(3)
    x = torch.randn(*shape)
    comb = torch.tensor([0, 6, 3, 3, 2, 5, 4, 1, 6])
    group, gather = layer(mixed_mode="group"), layer(mixed_mode="gather")
    randomise_adapters(group)
    gather.load_state_dict(group.state_dict())
    group.set_active(comb)
    gather.set_active(comb)
    loop = []
    for i, c in enumerate(comb.tolist()):
        group.set_active(c)
        loop.append(group(x[i:i + 1]))
    group.set_active(comb)
    torch.testing.assert_close(group(x), gather(x), rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # the sync-free path that stacks all 7 adapters
        torch.testing.assert_close(group(x), gather(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(group(x), torch.cat(loop), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(group(x), group.base(x))  # the adapters really contributed


def test_branches_are_the_scaled_adapter_terms():
    lin = layer()
    randomise_adapters(lin)
    lin.set_active("tv")
    x = torch.randn(4, IN)
    y, shared, spec = lin.forward_with_branches(x)
    expected_spec = lin.scaling * x @ lin.lora_A["tv"].weight.T @ lin.lora_B["tv"].weight.T
    torch.testing.assert_close(spec, expected_spec)
    torch.testing.assert_close(y, lin.base(x) + shared + spec)
    assert layer("no_specific").forward_with_branches(x)[2] is None
    assert layer("plain").forward_with_branches(x)[1:] == (None, None)


def test_active_state_is_explicit_and_restored():
    net = nn.Sequential(layer(), nn.ReLU(), layer(seed=1))
    with pytest.raises(RuntimeError, match="no active combination"):
        net(torch.randn(2, IN))
    set_active_combination(net, "a")
    with active_combination(net, 6):
        assert all(m.active == 6 for m in net if isinstance(m, MCLALinear))
    assert all(m.active == 0 for m in net if isinstance(m, MCLALinear))


@pytest.mark.parametrize("bad", [7, -1, "x", "ta", torch.tensor([[0]]), torch.tensor([0.5]), torch.tensor([0, 9])])
def test_bad_combinations_are_rejected(bad):
    with pytest.raises(ValueError):
        normalise_combination(bad)


def test_mixed_combination_must_match_batch():
    lin = layer()
    lin.set_active(torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="per-sample combination"):
        lin(torch.randn(3, IN))


@pytest.mark.parametrize("variant", ["mculora", "no_specific"])
@pytest.mark.parametrize("comb", range(7))
def test_merged_weight_path_equals_unmerged(variant, comb):
    lin = layer(variant)
    randomise_adapters(lin)
    lin.set_active(comb)
    x = torch.randn(5, 4, IN)
    assert lin._can_merge()
    torch.testing.assert_close(lin(x), lin.forward_with_branches(x)[0], rtol=1e-5, atol=1e-5)


def test_adapter_dropout_disables_merging_only_in_training():
    torch.manual_seed(0)
    lin = MCLALinear(IN, OUT, rank=R, dropout=0.5)
    randomise_adapters(lin)
    lin.set_active(2)
    x = torch.randn(64, IN)
    assert not lin.train()._can_merge() and lin.eval()._can_merge()
    lin.train()
    delta_train = lin(x) - lin.base(x)  # dropout hits the adapters' input only, never the base term
    assert not torch.allclose(delta_train, lin.eval()(x) - lin.base(x))
