"""Training throughput on default-corpus-like sizes (CPU): samples/s, epoch time incl. 7-combination
validation and the DPFT separability pass, and peak RSS.

Synthetic features with the real dims (acoustic 16x50, visual 16x300, textual 32x384), 840 train /
180 val / 180 test utterances. Run: `python benchmarks/bench_training.py [--epochs 5] [--threads 1]`.
"""
from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import pytorch_lightning as pl

from pipeline.training.data import MultimodalData
from pipeline.splits import build_splits
from tests.factories import make_feature_dataset
from pipeline.train import train_model


class EpochTimer(pl.Callback):
    """Wall time of the training part, the validation part and the whole epoch (DPFT included)."""

    def __init__(self) -> None:
        self.rows: list[dict[str, float]] = []

    def on_train_epoch_start(self, trainer, module) -> None:
        self.t0 = time.perf_counter()

    def on_validation_epoch_start(self, trainer, module) -> None:
        self.t1 = time.perf_counter()

    def on_validation_epoch_end(self, trainer, module) -> None:
        self.t2 = time.perf_counter()

    def on_train_epoch_end(self, trainer, module) -> None:
        # Callbacks run before the module's own hook (DPFT); the next epoch start closes that gap.
        self.rows.append({"train": self.t1 - self.t0, "val": self.t2 - self.t1, "start": self.t0})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--variant", default="mculora")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t = time.perf_counter()
        manifest, features = make_feature_dataset(root, n=1200, sessions=20, seq_len={"a": 16, "t": 32, "v": 16},
                                                  dims={"a": 50, "t": 384, "v": 300}, missing_share=0.06, seed=0)
        sessions = [f"Ses{k:02d}" for k in range(1, 21)]
        build_splits(manifest, features, root / "splits",
                     {"seed": 1, "test_sessions": sessions[-3:], "val_sessions": sessions[-6:-3]})
        data = MultimodalData.load(manifest, features, root / "splits", include=("train", "val"))
        print(f"setup (features + splits + load): {time.perf_counter() - t:.1f} s; "
              f"train {len(data.subset('train'))}, val {len(data.subset('val'))}")
        timer = EpochTimer()
        params = {"seed": 0, "max_epochs": args.epochs, "patience": args.epochs + 1, "num_threads": args.threads,
                  "variant": args.variant}
        t = time.perf_counter()
        summary = train_model(data, params, root / "out", extra_callbacks=[timer])
        total = time.perf_counter() - t
    n_train = summary["n_train"]
    starts = [r["start"] for r in timer.rows]
    epoch = np.diff(starts) if len(starts) > 1 else np.array([total])
    train_s = np.array([r["train"] for r in timer.rows[1:]] or [timer.rows[0]["train"]])  # skip warm-up epoch
    val_s = np.array([r["val"] for r in timer.rows[1:]] or [timer.rows[0]["val"]])
    print(f"variant {args.variant}, threads {args.threads}, epochs {summary['epochs_run']}")
    print(f"train throughput: {n_train / train_s.mean():.0f} samples/s ({train_s.mean():.2f} s per training pass)")
    print(f"validation, 7 combinations x {summary['n_val']} samples: {val_s.mean():.2f} s per epoch")
    print(f"epoch time incl. validation + DPFT: {epoch.mean():.2f} s (median of {len(epoch)}: {np.median(epoch):.2f} s)")
    print(f"train_model total: {total:.1f} s; params {summary['parameter_counts']['main']}")
    print(f"peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
