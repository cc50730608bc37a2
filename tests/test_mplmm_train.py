"""MPLMM through the real trainer: two stages, stage-1 reuse (stage cache, stage1_from), generation loss."""
from __future__ import annotations

import json

import pytest
import torch

from pipeline.core.modalities import COMBINATIONS
from pipeline.methods import load_model
from pipeline.methods.mplmm import MPLMMNet
from tests.test_mplmm import BACKBONES, MULT, tiny_config

@pytest.fixture(scope="module")
def split_data(tmp_path_factory):
    from pipeline.splits import build_splits
    from tests.factories import make_feature_dataset

    root = tmp_path_factory.mktemp("mplmm")
    manifest, features = make_feature_dataset(root, n=160, missing_share=0.1, seed=4)
    build_splits(manifest, features, root / "splits", {"seed": 1})
    return manifest, features, root / "splits"


def train_params(backbone: str, out_dir, **opts) -> dict:
    return {"seed": 3, "method": "mplmm", "max_epochs": 2, "stage1_epochs": 2, "patience": 2, "batch_size": 32,
            "lr": 3e-3, "out_dir": str(out_dir), "mlflow": {"enabled": False},
            "model": {"d_model": 16, "d_fusion": 24, "n_heads": 2},
            "mplmm": {"backbone": backbone, "prompt_length": 4, "mult": MULT, **opts}}


@pytest.mark.parametrize("backbone", BACKBONES)
def test_training_runs_both_stages_and_reuses_stage1(split_data, tmp_path, backbone):
    from pipeline.train import train_model
    from pipeline.training.data import MultimodalData

    data = MultimodalData.load(*split_data, include=("train", "val"))
    params = train_params(backbone, tmp_path, lambda_gen=0.1)
    summary = train_model(data, params, tmp_path)
    assert [s["name"] for s in summary["stages"]] == ["stage1", "stage2"]
    assert [s["sampler"] for s in summary["stages"]] == ["complete", "eta"]
    counts = summary["parameter_counts"]
    assert counts["stage1"]["trainable"] == counts["stage1"]["backbone"] + counts["stage1"]["input_proj"] \
        + counts["stage1"]["head"]
    assert counts["stage2"]["trainable"] == counts["stage2"]["total"] - counts["stage2"]["backbone"]
    assert set(summary["best_val"]) == set(COMBINATIONS) and summary["best_val_mean"] is not None
    history = json.loads((tmp_path / "reports" / "train_history.json").read_text())
    stage2 = [h for h in history if h["stage"] == "stage2"]
    assert stage2 and all(h["train/l_gen"] > 0 for h in stage2)  # the generation loss reached the trainer
    assert all(h["train/draws/atv"] == sum(h[f"train/draws/{c}"] for c in COMBINATIONS)
               for h in history if h["stage"] == "stage1")  # stage 1: complete rows only
    model, extra = load_model(tmp_path / "models" / "model.pt")
    assert isinstance(model, MPLMMNet) and model.options["backbone"] == backbone and extra["method"] == "mplmm"
    # the same run again restores stage 1 from the stage cache and ends with the same weights
    again = train_model(MultimodalData.load(*split_data, include=("train", "val")), params, tmp_path)
    assert again["stages"][0]["restored_from"] and not summary["stages"][0]["restored_from"]
    reloaded, _ = load_model(tmp_path / "models" / "model.pt")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reloaded.state_dict().values()))


def test_stage1_from_a_stored_model_skips_stage1(split_data, tmp_path):
    from pipeline.train import train_model
    from pipeline.training.data import MultimodalData

    load = lambda: MultimodalData.load(*split_data, include=("train", "val"))  # noqa: E731
    train_model(load(), train_params("imer", tmp_path / "a"), tmp_path / "a")
    source, _ = load_model(tmp_path / "a" / "models" / "model.pt")
    params = train_params("imer", tmp_path / "b", stage1_from=str(tmp_path / "a" / "models" / "model.pt"))
    summary = train_model(load(), params, tmp_path / "b")
    assert [s["name"] for s in summary["stages"]] == ["stage2"]
    model, _ = load_model(tmp_path / "b" / "models" / "model.pt")
    frozen = [k for k in model.state_dict() if model.group_of(k) == "backbone" and k in dict(model.named_parameters())]
    assert frozen and all(torch.equal(model.state_dict()[k], source.state_dict()[k]) for k in frozen)
    bad = MPLMMNet(tiny_config("imer"))
    with pytest.raises(ValueError, match="hashes"):
        bad.load_stage1(str(tmp_path / "a" / "models" / "model.pt"), {"splits_hash": "other"})
    stored = torch.load(tmp_path / "a" / "models" / "model.pt", weights_only=True)["extra"]["provenance"]
    with pytest.raises(ValueError, match="no imer backbone of this shape"):
        bad.load_stage1(str(tmp_path / "a" / "models" / "model.pt"), stored)  # d_model 8 vs the stored 16
