"""Training prints one compact line per epoch (validation mean, per-combination scores, DPFT q, time)."""
from __future__ import annotations

import io
import re

import torch

from pipeline.core.modalities import COMBINATIONS
from pipeline.training.progress import EpochProgress, epoch_line


def test_epoch_line_is_compact_and_complete():
    metrics = {"train/loss": 1.0842, "val/wa/mean": 0.6123, **{f"val/wa/{c}": 0.5 for c in COMBINATIONS}}
    line = epoch_line(3, "main", "wa", metrics, [1 / 7] * 7, 4.23)
    assert line.startswith("epoch   3 main  loss 1.0842  val wa 0.612 | a .500 t .500")
    assert "| q a .14 t .14 v .14 at .14 av .14 tv .14 atv .14 | 4.2s" in line
    assert "\n" not in line and len(line) < 160
    assert epoch_line(0, "s", "mae", {"val/mae/mean": 1.25}, None, 0.0).endswith("val mae 1.250 |  | 0.0s")


def test_callback_prints_one_line_per_epoch_of_a_real_training(tmp_path):
    from pipeline.splits import build_splits
    from pipeline.train import train_model
    from pipeline.training.data import MultimodalData
    from tests.factories import make_feature_dataset

    torch.set_num_threads(1)
    manifest, features = make_feature_dataset(tmp_path, n=80, missing_share=0.15, seed=8)
    build_splits(manifest, features, tmp_path / "splits", {"seed": 1})
    data = MultimodalData.load(manifest, features, tmp_path / "splits", include=("train", "val"))
    out = io.StringIO()
    cfg = {"seed": 5, "max_epochs": 3, "patience": 5, "batch_size": 32,
           "model": {"d_model": 8, "d_fusion": 8, "n_heads": 2}, "dpft": {"monitor_size": 16}}
    train_model(data, cfg, tmp_path / "out", extra_callbacks=[EpochProgress("wa", stream=out)])
    lines = out.getvalue().splitlines()
    assert len(lines) == 3
    for k, line in enumerate(lines):
        assert re.match(rf"epoch +{k} \S+  loss \d+\.\d{{4}}  val wa \d\.\d{{3}} \| a ", line), line
        assert " | q a ." in line and re.search(r"\| \d+\.\ds$", line)
