"""Dialogue context (`train.context: dialogue`): layouts, padding, causality, masking, batching, training."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.core.modalities import COMBINATIONS, MASKS, MODALITY_ORDER
from pipeline.methods import load_model
from pipeline.methods.config import ModelConfig
from pipeline.methods.context import dense_layout, singleton_layout
from pipeline.methods.registry import build_network
from pipeline.methods.routing import route
from pipeline.splits import build_splits
from pipeline.train import train_model
from pipeline.training.data import MultimodalData
from pipeline.training.grouping import batch_rows
from pipeline.training.samplers import make_sampler
from tests.factories import make_feature_dataset

DIMS = {"a": 6, "t": 5, "v": 4}
SEQ = {"a": 5, "t": 4, "v": 3}


def _net(method: str = "mculora", causal: bool = False, **options) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = ModelConfig(input_dims=DIMS, seq_lens=SEQ, method=method, d_model=16, d_fusion=32, n_heads=4,
                      dropout=0.0, context="dialogue", context_options={"causal": causal}, options=options)
    net = build_network(cfg).eval()
    for p in net.parameters():  # non-zero adapters, so every branch matters
        torch.nn.init.normal_(p, std=0.2) if p.ndim > 1 else None
    return net


def _inputs(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    feats = {m: torch.randn(n, SEQ[m], DIMS[m], generator=g) for m in MODALITY_ORDER}
    lens = {m: torch.randint(1, SEQ[m] + 1, (n,), generator=g) for m in MODALITY_ORDER}
    return feats, lens


def _route(net, feats, lens, layout, protocol=None, rows=None):
    n = next(iter(lens.values())).shape[0]
    rows = np.arange(n) if rows is None else np.asarray(rows)
    pick = torch.as_tensor(rows)
    presence = np.ones((len(rows), 3), dtype=bool)
    mask = np.ones(3, dtype=bool) if protocol is None else protocol[rows]
    return route(net, {m: f[pick] for m, f in feats.items()}, {m: l[pick] for m, l in lens.items()},
                 presence, mask, [0.25] * 4, dialogue=None if layout is None else layout.select(pick)).output


def test_dense_layout_orders_turns_and_speakers():
    layout = dense_layout(np.array(["d2", "d1", "d2", "d1", "d2", "x"]), np.array([5, 0, 1, 3, 3, 0]),
                          np.array(["B", "A", "A", "B", "A", "Q"]))
    assert layout.slot.tolist() == [1, 0, 1, 0, 1, 2]
    assert layout.turn.tolist() == [2, 0, 0, 1, 1, 0]  # d2: turns 1, 3, 5 -> 0, 1, 2
    assert layout.speaker.tolist() == [1, 0, 0, 1, 0, 0]  # in d2, A speaks first
    sub = layout.select(torch.tensor([0, 4, 5]))  # drop turn 1 of d2 and all of d1
    assert sub.slot.tolist() == [0, 0, 1] and sub.turn.tolist() == [1, 0, 0]


@pytest.mark.parametrize("method,options", [("mculora", {}), ("mplmm", {}), ("wander", {})])
def test_a_dialogue_batch_equals_each_dialogue_alone(method, options):
    net = _net(method, **options)
    feats, lens = _inputs(11)
    dialogue = np.array(["p"] * 4 + ["q"] * 5 + ["r"] * 2)[[3, 9, 0, 4, 5, 10, 1, 6, 2, 7, 8]]  # interleaved rows
    turn = np.arange(11)
    layout = dense_layout(dialogue, turn, np.where(turn % 2 == 0, "s0", "s1"))
    together = _route(net, feats, lens, layout)
    for name in ("p", "q", "r"):
        rows = np.flatnonzero(dialogue == name)
        alone = _route(net, feats, lens, layout, rows=rows)
        np.testing.assert_allclose(together[rows], alone, atol=1e-5)
    singles = _route(net, feats, lens, None)
    assert np.abs(singles - together).max() > 1e-4  # the context is used


def test_causal_turns_ignore_later_turns():
    net = _net(causal=True)
    feats, lens = _inputs(6)
    layout = dense_layout(np.array(["d"] * 6), np.arange(6), np.array(["a", "b"] * 3))
    before = _route(net, feats, lens, layout)
    changed = {m: f.clone() for m, f in feats.items()}
    for m in MODALITY_ORDER:
        changed[m][4:] = torch.randn_like(changed[m][4:])
    after = _route(net, changed, lens, layout)
    np.testing.assert_allclose(before[:4], after[:4], atol=1e-6)
    assert np.abs(before[4:] - after[4:]).max() > 1e-4
    bidirectional = _net(causal=False)
    assert np.abs(_route(bidirectional, feats, lens, layout)[:4] - _route(bidirectional, changed, lens, layout)[:4]).max() > 1e-4


def test_a_masked_out_utterance_takes_no_part_in_the_context():
    net = _net()
    feats, lens = _inputs(5)
    layout = dense_layout(np.array(["d"] * 5), np.arange(5), np.array(["a", "b"] * 2 + ["a"]))
    protocol = np.ones((5, 3), dtype=bool)
    protocol[2] = False  # utterance 2 loses every modality: it gets the prior
    out = _route(net, feats, lens, layout, protocol)
    np.testing.assert_allclose(out[2], [0.25] * 4)
    changed = {m: f.clone() for m, f in feats.items()}
    for m in MODALITY_ORDER:
        changed[m][2] = torch.randn_like(changed[m][2])
    np.testing.assert_allclose(_route(net, changed, lens, layout, protocol), out, atol=1e-6)
    without = _route(net, feats, lens, layout, rows=[0, 1, 3, 4])  # the dialogue without it
    np.testing.assert_allclose(out[[0, 1, 3, 4]], without, atol=1e-5)


def test_a_missing_modality_reaches_other_utterances_only_through_the_context():
    net = _net()
    feats, lens = _inputs(4)
    layout = dense_layout(np.array(["d"] * 4), np.arange(4), np.array(["a", "b"] * 2))
    states = []
    hook = net.context.register_forward_pre_hook(lambda mod, args: states.append(args[0].detach().clone()))
    protocol = np.ones((4, 3), dtype=bool)
    full = _route(net, feats, lens, layout, protocol)
    protocol[1, 0] = False  # utterance 1 loses its audio
    partial = _route(net, feats, lens, layout, protocol)
    hook.remove()
    before, after = states  # (4, D) per-utterance states entering the context encoder
    rows = [0, 2, 3]
    torch.testing.assert_close(before[rows], after[rows])  # the other utterances' own states are untouched
    assert (before[1] - after[1]).abs().max() > 1e-5
    assert np.abs(full[rows] - partial[rows]).max() > 1e-6  # ... but their contextual states see the change


def test_mixed_combinations_select_adapters_per_utterance():
    net = _net()
    feats, lens = _inputs(6)
    layout = dense_layout(np.array(["d"] * 6), np.arange(6), np.array(["a", "b"] * 3))
    protocol = MASKS[[0, 6, 1, 6, 2, 3]]  # a conversation that loses modalities turn by turn
    mixed = _route(net, feats, lens, layout, protocol)
    net.config.mixed_mode = "gather"
    for layer in net.modules():
        if hasattr(layer, "mixed_mode"):
            layer.mixed_mode = "gather"
    np.testing.assert_allclose(_route(net, feats, lens, layout, protocol), mixed, atol=1e-5)


def test_singleton_layout_is_a_dialogue_of_one():
    net = _net()
    feats, lens = _inputs(3)
    np.testing.assert_allclose(_route(net, feats, lens, singleton_layout(3)), _route(net, feats, lens, None))


def test_whole_dialogue_batches():
    groups = np.array([0, 0, 1, 2, 2, 2, 1, 3])
    batches = batch_rows(len(groups), 3, groups)
    assert sorted(np.concatenate(batches).tolist()) == list(range(8))
    for b in batches:
        for g in set(groups[b].tolist()):
            assert set(np.flatnonzero(groups == g)) <= set(b.tolist())
    natural = np.ones((len(groups), 3), dtype=bool)
    for kind in ("dropout", "homogeneous", "eta", "complete"):
        sampler = make_sampler(kind, natural, 3, seed=1, groups=groups)
        expected = len(sampler)  # the loader asks for the length before each epoch
        keys = list(iter(sampler))
        assert len(keys) == expected
        for key in keys:
            for g in set(groups[key.index].tolist()):
                assert set(np.flatnonzero(groups == g)) <= set(key.index.tolist()), kind
        if kind == "homogeneous":
            assert all(isinstance(k.combination, int) for k in keys)  # one combination per batch of dialogues


@pytest.fixture(scope="module")
def dialogue_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("context")
    manifest, features = make_feature_dataset(root, n=160, missing_share=0.15, seed=3, dialogue_turns=8)
    build_splits(manifest, features, root / "splits", {"seed": 1})
    return manifest, features, root / "splits"


FAST = {"seed": 5, "max_epochs": 2, "patience": 4, "batch_size": 24, "lr": 3e-3, "context": "dialogue",
        "model": {"d_model": 16, "d_fusion": 32, "n_heads": 4}, "dpft": {"monitor_size": 32},
        "mlflow": {"enabled": False}}


def test_dialogue_training_round_trips_and_scores_every_combination(dialogue_data, tmp_path):
    data = MultimodalData.load(*dialogue_data, include=("train", "val"))
    summary = train_model(data, FAST, tmp_path)
    assert set(summary["best_val"]) == set(COMBINATIONS)
    model, _ = load_model(tmp_path / "models" / "model.pt")
    assert model.config.context == "dialogue" and any(k.startswith("context.") for k in model.state_dict())
    assert any(".lora_A." in k for k in model.state_dict() if k.startswith("context."))  # MCLA in the context
    val = data.subset("val")
    local = val.read_batches(1000, by_dialogue=True)[0]
    batch = val.batch(local)
    again, _ = load_model(tmp_path / "models" / "model.pt")
    a = route(model, batch["features"], batch["lengths_natural"], batch["natural"].numpy(), np.ones(3, bool),
              [0.25] * 4, dialogue=batch["dialogue"]).output
    b = route(again, batch["features"], batch["lengths_natural"], batch["natural"].numpy(), np.ones(3, bool),
              [0.25] * 4, dialogue=batch["dialogue"]).output
    np.testing.assert_array_equal(a, b)


def test_utterance_mode_has_no_context_module(dialogue_data, tmp_path):
    data = MultimodalData.load(*dialogue_data, include=("train", "val"))
    train_model(data, {**FAST, "context": "utterance", "max_epochs": 1}, tmp_path)
    model, _ = load_model(tmp_path / "models" / "model.pt")
    assert model.config.context == "utterance" and not hasattr(model, "context")


def test_evaluation_never_splits_a_dialogue(dialogue_data, tmp_path):
    from pipeline.evaluate import evaluate_model

    data = MultimodalData.load(*dialogue_data, include=("train", "val"))
    train_model(data, {**FAST, "max_epochs": 1}, tmp_path)
    full = MultimodalData.load(*dialogue_data)
    small = evaluate_model(tmp_path / "models" / "model.pt", full, dialogue_data[2], batch_size=8)
    large = evaluate_model(tmp_path / "models" / "model.pt", full, dialogue_data[2], batch_size=10_000)
    for key, out in large["predictions"]["test"].items():
        np.testing.assert_allclose(small["predictions"]["test"][key], out, atol=1e-6)
