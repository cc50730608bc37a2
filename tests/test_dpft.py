"""DPFT controller (bounds, direction, modes) and the separability statistic."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.spatial.distance import jensenshannon

from pipeline.training.dpft import DPFTController, jsd_softmax, project_to_bounds, rank_weights, separability
from tests.test_network import make_batch, randomise_adapters, tiny_net

Q_MIN, Q_MAX = 0.05, 0.40
finite = st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False)


@settings(max_examples=60, deadline=None)
@given(seps=st.lists(st.lists(finite, min_size=7, max_size=7), min_size=2, max_size=40),
       eta=st.floats(0.01, 5.0), mode=st.sampled_from(["separability", "val_accuracy"]))
def test_bounds_and_sum_hold_under_adversarial_sequences(seps, eta, mode):
    ctl = DPFTController(mode, eta=eta, q_min=Q_MIN, q_max=Q_MAX)
    for s in seps:
        q = ctl.update(sep=np.array(s), val_scores=np.array(s))
        assert q.sum() == pytest.approx(1.0, abs=1e-12)
        assert q.min() >= Q_MIN - 1e-12 and q.max() <= Q_MAX + 1e-12


@settings(max_examples=200, deadline=None)
@given(q=st.lists(st.floats(1e-9, 1e9), min_size=7, max_size=7),
       lo=st.floats(0.0, 1 / 7), hi=st.floats(1 / 7, 1.0))
def test_projection_meets_bounds_and_keeps_order(q, lo, hi):
    q = np.array(q)
    p = project_to_bounds(q, lo, hi)
    assert p.sum() == pytest.approx(1.0, abs=1e-9)
    assert p.min() >= lo - 1e-12 and p.max() <= hi + 1e-12
    order = np.argsort(q, kind="stable")
    assert np.all(np.diff(p[order]) >= -1e-12)  # a larger q never gets a smaller share


def test_single_clip_then_renormalise_would_break_the_bound():
    q = np.array([0.9] + [0.1 / 6] * 6)
    naive = np.clip(q, Q_MIN, Q_MAX)
    naive /= naive.sum()
    assert naive.max() > Q_MAX  # 0.4 / 0.7: why a plain clip+renormalise is not enough
    p = project_to_bounds(q, Q_MIN, Q_MAX)
    assert p[0] == pytest.approx(Q_MAX) and np.allclose(p[1:], 0.6 / 6)


def test_first_update_is_noop_then_least_moved_gains():
    ctl = DPFTController("separability")
    uniform = np.full(7, 1 / 7)
    sep0 = np.array([0.10, 0.20, 0.30, 0.40, 0.50, 0.60, 0.70])
    np.testing.assert_allclose(ctl.update(sep=sep0), uniform)
    moves = np.array([0.05, -0.001, 0.2, 0.01, -0.3, 0.02, 0.1])  # least moved: t; most moved: av
    q = ctl.update(sep=sep0 + moves)
    least, most = int(np.argmin(np.abs(moves))), int(np.argmax(np.abs(moves)))
    assert q[least] > 1 / 7 and q[least] == q.max()
    assert q[most] < 1 / 7 and q[most] == q.min()
    # before clipping, q_c ∝ exp(eta * w_rank(c)): ratios follow the schedule
    assert q[least] / q[most] == pytest.approx(math.exp(0.1 * 2.0))
    assert np.array_equal(np.argsort(-q), np.argsort(np.abs(moves)))


def test_ties_share_weight_and_equal_movement_changes_nothing():
    w = rank_weights(np.array([0.3, 0.1, 0.1, 0.5, 0.2, 0.9, 0.0]), np.array([1, .5, .25, 0, -.25, -.5, -1]))
    assert w[6] == 1 and w[1] == w[2] == pytest.approx(0.375) and w[5] == -1
    ctl = DPFTController("separability")
    ctl.update(sep=np.zeros(7))
    np.testing.assert_allclose(ctl.update(sep=np.full(7, 0.3)), np.full(7, 1 / 7))


def test_uniform_mode_stays_uniform():
    ctl = DPFTController("uniform")
    rng = np.random.default_rng(0)
    for _ in range(20):
        q = ctl.update(sep=rng.normal(size=7), val_scores=rng.normal(size=7))
    np.testing.assert_allclose(q, np.full(7, 1 / 7))


def test_val_accuracy_mode_upweights_least_improved():
    ctl = DPFTController("val_accuracy")
    ctl.update(val_scores=np.full(7, 0.5))
    gains = np.array([0.10, 0.00, 0.05, -0.02, 0.20, 0.01, 0.03])  # av improved most, at got worse
    q = ctl.update(val_scores=0.5 + gains)
    assert q.argmax() == 3 and q.argmin() == 4


def test_missing_statistic_and_nan_are_rejected():
    with pytest.raises(ValueError, match="needs `sep`"):
        DPFTController("separability").update(val_scores=np.zeros(7))
    ctl = DPFTController("separability")
    with pytest.raises(ValueError, match="'tv'"):
        ctl.update(sep=np.array([0, 0, 0, 0, 0, np.nan, 0.0]))
    with pytest.raises(ValueError, match="bounds"):
        DPFTController(q_min=0.2)
    with pytest.raises(ValueError, match="mode"):
        DPFTController("test_accuracy")


def test_state_dict_round_trip_and_sampling():
    ctl = DPFTController("separability", eta=0.5)
    rng = np.random.default_rng(1)
    for _ in range(3):
        ctl.update(sep=rng.normal(size=7))
    other = DPFTController()
    other.load_state_dict(ctl.state_dict())
    s = rng.normal(size=7)
    np.testing.assert_array_equal(ctl.update(sep=s), other.update(sep=s))
    draws = ctl.sample(np.random.default_rng(0), size=20000)
    np.testing.assert_allclose(np.bincount(draws, minlength=7) / 20000, ctl.q, atol=0.015)


def test_jsd_matches_scipy_and_bounds():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(5, 9, generator=g), torch.randn(5, 9, generator=g) * 3
    ours = jsd_softmax(x, y).numpy()
    ref = np.array([jensenshannon(torch.softmax(a, -1).double().numpy(), torch.softmax(b, -1).double().numpy()) ** 2
                    for a, b in zip(x, y)])  # scipy returns the distance (sqrt of the divergence), natural log
    np.testing.assert_allclose(ours, ref, rtol=1e-6)
    assert float(jsd_softmax(x, x).abs().max()) < 1e-12
    far = jsd_softmax(torch.tensor([[0.0, 200.0]]), torch.tensor([[200.0, 0.0]]))
    assert float(far) == pytest.approx(math.log(2), rel=1e-6)  # disjoint supports -> ln 2


def test_separability_on_monitoring_batch():
    net = tiny_net()
    batch = make_batch(B=8)
    assert np.all(separability(net, batch) == 0.0)  # fresh adapters: R_c = R_com = 0 -> equal softmaxes
    randomise_adapters(net)
    net.train()
    sep = separability(net, batch)
    assert net.training  # mode restored
    assert sep.shape == (7,) and np.all(sep > 0) and np.all(sep <= math.log(2))
    np.testing.assert_array_equal(sep, separability(net, batch))  # deterministic (eval mode inside)
    # sep_at reads only a and t: perturbing v leaves it unchanged, but changes sep_v
    batch["features"]["v"] = batch["features"]["v"] + 5.0
    sep2 = separability(net, batch)
    assert sep2[3] == sep[3] and sep2[2] != sep[2]
    # a modality absent from every sample: its single-modality combination is NaN
    batch["mask"][:, 0] = False
    sep3 = separability(net, batch)
    assert np.isnan(sep3[0]) and np.isfinite(sep3[1:]).all()
