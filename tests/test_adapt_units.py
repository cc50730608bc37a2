"""Adaptation building blocks: NT-Xent, stable pseudo-label selection, the drop-one view,
which parameters adapt, the label sentinel and the config (no training; milliseconds each)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.adaptation.casp import adaptable_parameters
from pipeline.adaptation.config import AdaptConfig
from pipeline.adaptation.gate import acceptance_gate
from pipeline.adaptation.config import GateConfig
from pipeline.adaptation.ntxent import nt_xent
from pipeline.adaptation.pool import LabelReadError, LabelSentinel, drop_one
from pipeline.adaptation.pseudo import select_classification, select_regression
from pipeline.methods import MCULoRANet, ModelConfig


def _naive_nt_xent(r1: torch.Tensor, r2: torch.Tensor, tau: float) -> torch.Tensor:
    """Row by row, straight from the formula."""
    z = torch.nn.functional.normalize(torch.cat([r1, r2]), dim=-1)
    n2 = z.shape[0]
    total = 0.0
    for i in range(n2):
        p = (i + n2 // 2) % n2
        num = torch.exp(z[i] @ z[p] / tau)
        den = sum(torch.exp(z[i] @ z[k] / tau) for k in range(n2) if k != i)
        total = total - torch.log(num / den)
    return total / n2


@pytest.mark.parametrize("n,d,tau", [(1, 4, 0.5), (3, 8, 0.5), (7, 5, 0.1), (16, 32, 1.0)])
def test_vectorised_nt_xent_equals_naive_reference(n, d, tau):
    g = torch.Generator().manual_seed(n * 31 + d)
    r1, r2 = torch.randn(n, d, generator=g, dtype=torch.float64), torch.randn(n, d, generator=g, dtype=torch.float64)
    assert torch.allclose(nt_xent(r1, r2, tau), _naive_nt_xent(r1, r2, tau), atol=1e-10)


def test_nt_xent_rewards_matching_views():
    r = torch.randn(8, 16, generator=torch.Generator().manual_seed(0))
    assert nt_xent(r, r, 0.5) < nt_xent(r, torch.roll(r, 1, dims=0), 0.5)


def _snapshots(rows: list[list[int]], u: list[float], n_classes: int = 3) -> np.ndarray:
    """(K, n, C): sample i predicts class rows[i][k] at snapshot k with margin moving by u[i]."""
    k = len(rows[0])
    probs = np.full((k, len(rows), n_classes), 0.0)
    for i, (labels, wobble) in enumerate(zip(rows, u)):
        for s, c in enumerate(labels):
            p = np.full(n_classes, (0.4 - wobble * (s % 2)) / (n_classes - 1))
            p[c] = 0.6 + wobble * (s % 2)
            probs[s, i] = p
    return probs


def test_classification_keeps_the_most_stable_per_class_and_never_a_flip():
    rows = [[0, 0, 0]] * 4 + [[1, 1, 1]] * 2 + [[2, 0, 2]] * 3 + [[2, 2, 2]]
    u = [0.01, 0.2, 0.05, 0.3, 0.1, 0.02, 0.0, 0.0, 0.0, 0.15]
    sel = select_classification(_snapshots(rows, u), keep_fraction=0.5)
    assert list(sel.rows) == [0, 2, 5, 9]  # class 0: two lowest-u of four; class 1: one of two; class 2: the only stable one
    assert not sel.eligible[6:9].any()  # argmax flipped: never eligible, however small its u
    assert list(sel.target) == [0, 0, 1, 2]
    assert np.allclose(sel.instability[:4], [0.01, 0.2, 0.05, 0.3], atol=1e-12)


def test_classification_min_confidence_soft_targets_and_unstable_ablation():
    rows = [[0, 0, 0]] * 4 + [[1, 1, 1]] * 2
    u = [0.01, 0.2, 0.05, 0.3, 0.1, 0.02]
    probs = _snapshots(rows, u)
    sel = select_classification(probs, keep_fraction=0.25, soft=True)
    assert sel.target.shape == (2, 3) and np.allclose(sel.target, probs.mean(axis=0)[sel.rows])
    assert list(select_classification(probs, keep_fraction=0.25, keep="unstable").rows) == [3, 4]
    assert len(select_classification(probs, keep_fraction=1.0, min_confidence=0.99).rows) == 0


def test_regression_keeps_lowest_instability():
    preds = np.array([[0.0, 1.0, 2.0, -1.0, 0.5],
                      [0.1, 1.5, 2.0, -3.0, 0.5],
                      [0.0, 1.0, 2.1, -1.0, 0.6]])  # (K=3, n=5)
    sel = select_regression(preds, keep_fraction=0.4)
    assert list(sel.rows) == [2, 4]  # u = [0.1, 0.5, 0.05, 2.0, 0.05]
    assert np.allclose(sel.target, preds.mean(axis=0)[[2, 4]])
    assert np.allclose(sel.instability, [0.1, 0.5, 0.05, 2.0, 0.05])


def test_drop_one_removes_exactly_one_usable_modality():
    rng = np.random.default_rng(0)
    usable = rng.random((4000, 3)) < 0.7
    usable[~usable.any(axis=1), 1] = True
    out = drop_one(usable, rng)
    assert not (out & ~usable).any() and out.any(axis=1).all()
    multi = usable.sum(axis=1) >= 2
    assert (out[multi].sum(axis=1) == usable[multi].sum(axis=1) - 1).all()
    assert (out[~multi] == usable[~multi]).all()
    full = usable.all(axis=1)
    dropped = (usable & ~out)[full].mean(axis=0)
    assert np.allclose(dropped, 1 / 3, atol=0.04)  # uniform among the present modalities


def _net(variant: str = "mculora") -> MCULoRANet:
    cfg = ModelConfig(input_dims={"a": 5, "t": 6, "v": 4}, seq_lens={"a": 3, "t": 3, "v": 3}, variant=variant)
    return MCULoRANet(cfg)


def test_layernorm_group_is_768_weights_at_defaults_and_1152_with_ln_f():
    net = _net()
    ln = adaptable_parameters(net, "layernorm")
    assert sum(p.numel() for p in ln.values()) == 768
    assert all(".ln1." in n or ".ln2." in n for n in ln)
    assert sum(p.numel() for p in adaptable_parameters(net, "layernorm", include_ln_f=True).values()) == 1152


def test_shared_adapters_never_include_per_combination_adapters():
    shared = adaptable_parameters(_net(), "shared_adapters")
    assert shared and all(".shared." in n for n in shared)
    with pytest.raises(ValueError, match="shared_adapters"):
        adaptable_parameters(_net("plain"), "shared_adapters")


def test_label_sentinel_raises_on_any_read():
    s = LabelSentinel(5)
    assert len(s) == 5
    with pytest.raises(LabelReadError):
        s[np.arange(2)]
    with pytest.raises(LabelReadError):
        np.asarray(s)


def test_config_rejects_unknown_keys_and_label_use():
    assert AdaptConfig.from_params({}).snapshot_epochs() == [0, 3, 6, 9, 12, 15]  # K = 6 at the defaults
    with pytest.raises(ValueError, match="unknown keys"):
        AdaptConfig.from_params({"lr_typo": 1})
    with pytest.raises(ValueError, match="labeled_dev"):
        AdaptConfig.from_params({"gate": {"labeled_dev": True}})
    with pytest.raises(ValueError, match="method"):
        AdaptConfig.from_params({"method": "shot"})


def test_gate_catches_collapse_anchor_disagreement_and_forgetting():
    rng = np.random.default_rng(1)
    src = rng.dirichlet(np.ones(4), size=100)  # (100, 4)
    cfg = GateConfig()
    assert acceptance_gate("classification", src, src, 0.6, 0.6, cfg).accepted
    collapsed = np.tile([0.7, 0.1, 0.1, 0.1], (100, 1))
    bad = acceptance_gate("classification", src, collapsed, 0.6, 0.55, cfg)
    assert not bad.accepted and {r.split()[0] for r in bad.reasons} >= {"majority_share", "source_val_drop"}
    scores = rng.normal(0, 1, size=(100, 1))
    assert acceptance_gate("regression", scores, scores, 0.7, 0.7, cfg).accepted
    flat = acceptance_gate("regression", scores, -0.1 * scores, 0.7, 0.7, cfg)
    assert {r.split()[0] for r in flat.reasons} == {"std_ratio", "anchor_agreement"}
