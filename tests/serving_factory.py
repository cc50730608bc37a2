"""A tiny model trained on REAL extracted features of a tiny generated corpus, for prediction tests.

corpus -> ingest -> extract x3 -> splits -> train (2 epochs), each with its stage's
`run_stage` and tmp paths, so the model's input dims and recipes are the real extractors'.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.corpus_factory import make_tiny_corpus

TRAIN_FAST: dict[str, Any] = {"seed": 3, "max_epochs": 2, "patience": 2, "batch_size": 16, "num_threads": 1,
                              "model": {"d_model": 16, "d_fusion": 32, "n_heads": 2}, "dpft": {"monitor_size": 32}}


def train_tiny_model(root: Path, n: int = 24, mlflow_uri: str | None = None) -> dict[str, Path]:
    """Run the real stages under `root`; returns the paths of the corpus, features and model."""
    from features import stage_acoustic, stage_textual, stage_visual
    from pipeline import ingest, splits, train

    listing = make_tiny_corpus(root / "corpus", n=n)
    manifest, features = root / "manifest.parquet", root / "features"
    ingest.run_stage({"listing": str(listing), "out": str(manifest), "classes": ["neutral", "happy", "sad", "angry"]})
    for name, stage in (("acoustic", stage_acoustic), ("visual", stage_visual), ("textual", stage_textual)):
        stage.run_stage({"manifest": str(manifest), "out": str(features / f"{name}.arrow"), "cache_dir": None,
                         "workers": 1, "progress": False, "max_failure_share": 1.0})
    splits.run_stage({"manifest": str(manifest), "features_dir": str(features), "out_dir": str(root / "splits"),
                      "seed": 1, "strategy": "by_speaker"})
    mlflow = ({"enabled": True, "tracking_uri": mlflow_uri, "artifact_root": str(root / "mlartifacts")}
              if mlflow_uri else {"enabled": False})
    train.run_stage({**TRAIN_FAST, "manifest": str(manifest), "features_dir": str(features),
                     "splits_dir": str(root / "splits"), "out_dir": str(root / "out"), "mlflow": mlflow})
    return {"listing": listing, "corpus": listing.parent, "manifest": manifest, "features": features,
            "model": root / "out" / "models" / "model.pt", "root": root}


def shared_tiny_model(tmp_path_factory: Any) -> dict[str, Path]:
    """`train_tiny_model` once per pytest session (both prediction test modules reuse it)."""
    root = tmp_path_factory.getbasetemp() / "tiny_serving_model"
    done = root / "done"
    if not done.exists():
        train_tiny_model(root)
        done.write_text("ok")
    listing = root / "corpus" / "listing.parquet"
    return {"listing": listing, "corpus": listing.parent, "manifest": root / "manifest.parquet",
            "features": root / "features", "model": root / "out" / "models" / "model.pt", "root": root}


def clip_files(paths: dict[str, Path], index: int = 0) -> dict[str, Path]:
    """The wav / mp4 / txt of the corpus's `index`-th utterance."""
    import pyarrow.parquet as pq

    row = pq.read_table(paths["listing"]).to_pylist()[index]
    return {f: paths["corpus"] / row[f"{f}_path"] for f in ("audio", "video", "text")}
